"""What a training step holds in memory, counted from its tensors: the frozen base, the trainable weights,
their gradients and optimizer state, and the activations autograd keeps for the backward pass.

On a GPU `torch.cuda.max_memory_allocated` tells the peak; on a CPU the process's resident size mixes in
what the allocator kept from loading, so the breakdown is counted here from the tensors themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from shared.quantization import weight_bytes


@dataclass(frozen=True)
class StepMemory:
    frozen: int  # the base's weights (quantized or not), scales included
    trainable: int  # the adapter's weights
    gradients: int
    optimizer: int  # its state (AdamW: two moments a weight; 8-bit AdamW: a quarter of that)
    activations: int  # kept for the backward pass of one micro-batch

    @property
    def total(self) -> int:
        return self.frozen + self.trainable + self.gradients + self.optimizer + self.activations


def activations_kept(model: torch.nn.Module, forward: Callable[[], torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves while `forward()` runs, besides `model`'s own weights
    (a linear layer saves its weight to backpropagate through it, but that memory is the model's); its loss is
    then backpropagated, so the saved tensors are freed. A checkpointed layer keeps only its inputs."""
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = forward()
    loss.backward()
    return sum(saved.values())


def step_memory(model: torch.nn.Module, optimizer: torch.optim.Optimizer, activations: int) -> StepMemory:
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable_bytes = sum(p.nbytes for p in trainable)
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    return StepMemory(
        frozen=weight_bytes(model) - trainable_bytes,
        trainable=trainable_bytes,
        gradients=trainable_bytes,  # one float32 gradient a trainable weight
        optimizer=sum(t.nbytes for t in state),
        activations=activations,
    )
