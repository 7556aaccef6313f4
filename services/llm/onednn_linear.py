"""On the CPU, the model's linear layers run through oneDNN's matmul instead of torch's default BLAS call.

A decode step's linears are skinny products (one row per decoding sequence against each weight), where
oneDNN's kernels beat the BLAS path `F.linear` takes on the CPU; the weights stay the dense tensors they were
(no second, packed copy), so LoRA, DoRA and tied embeddings see the very same parameters. Figures in
`docs/llm.md`. Only inference goes through it: the engine runs under `inference_mode`.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn
from torch.nn import functional as F

log = logging.getLogger(__name__)

DTYPES = (torch.float32, torch.bfloat16)


class OneDnnLinear(nn.Linear):
    """An `nn.Linear` (same parameters, same state dict) whose forward calls oneDNN's matmul."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():  # the op has no backward: anything that trains gets the default path
            return F.linear(x, self.weight, self.bias)
        rows = x.reshape(-1, self.in_features)
        y = torch.ops.mkldnn._linear_pointwise(rows, self.weight, self.bias, "none", [], "")
        return y.view(*x.shape[:-1], self.out_features)


@functools.cache  # a property of this process's torch and CPU: probed once per dtype
def onednn_usable(dtype: torch.dtype) -> bool:
    """oneDNN is built in, takes `dtype`, and agrees with `F.linear` on a probe (else: torch's default)."""
    if dtype not in DTYPES or not torch.backends.mkldnn.is_available():
        return False
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 64, generator=generator).to(dtype)
    probe = nn.Linear(64, 48, dtype=dtype)
    with torch.no_grad():
        probe.weight.copy_(torch.randn(48, 64, generator=generator))
        probe.bias.copy_(torch.randn(48, generator=generator))
    with torch.inference_mode():
        expected = probe(x)
        probe.__class__ = OneDnnLinear
        try:
            got = probe(x)
        except (RuntimeError, AttributeError, NotImplementedError):
            return False
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    return got.shape == expected.shape and torch.allclose(got.float(), expected.float(), atol=tolerance, rtol=tolerance)


def use_onednn_linears(model: nn.Module) -> int:
    """Route every plain `nn.Linear` of a CPU model through oneDNN (idempotent); returns how many now do.
    Nothing changes on other devices, or where oneDNN cannot take the model's dtype."""
    linears = [module for module in model.modules() if type(module) in (nn.Linear, OneDnnLinear)]
    dtypes = {module.weight.dtype for module in linears}
    on_cpu = all(module.weight.device.type == "cpu" for module in linears)
    if not linears or not on_cpu or not all(onednn_usable(dtype) for dtype in dtypes):
        log.info("linear layers stay on torch's default matmul", extra={"dtypes": sorted(map(str, dtypes))})
        return 0
    for module in linears:
        module.__class__ = OneDnnLinear
    log.info("linear layers run through oneDNN", extra={"linears": len(linears)})
    return len(linears)
