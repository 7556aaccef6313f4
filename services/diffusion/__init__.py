"""Diffusion sampling service: `modelworks.diffusion.v1.DiffusionService` on diffusers' pipelines."""
