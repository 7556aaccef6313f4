"""The optimizer a job asked for: torch's AdamW, or bitsandbytes' 8-bit AdamW (its moments in 8-bit blocks, a
quarter of AdamW's state) and the paged variant, whose state pages out to host memory when the GPU fills."""

from __future__ import annotations

import torch

from services.finetune.training.errors import TrainingInputError


def make_optimizer(
    name: str, parameters: list[torch.nn.Parameter], learning_rate: float, weight_decay: float, device: torch.device
) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay)
    if name == "paged_adamw_8bit" and device.type != "cuda":
        raise TrainingInputError(
            "optimizer paged_adamw_8bit pages its state between GPU and host memory, and this worker trains on "
            f"{device}; use adamw_8bit or adamw"
        )
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise TrainingInputError(f"optimizer {name} needs the bitsandbytes package, which this worker lacks") from None
    if name == "adamw_8bit":
        return bnb.optim.AdamW8bit(parameters, lr=learning_rate, weight_decay=weight_decay)
    if name == "paged_adamw_8bit":
        return bnb.optim.PagedAdamW8bit(parameters, lr=learning_rate, weight_decay=weight_decay)
    raise TrainingInputError(f"unknown optimizer {name!r}; use adamw, adamw_8bit or paged_adamw_8bit")
