"""Adapters exported out of ModelWorks: merged into their base (a Hugging Face folder) or as a GGUF file."""
