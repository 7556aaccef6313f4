"""dtype `auto`: bf16 where the device computes it natively, float32 on other CPUs, and the reason said.

The CPU's features are what torch reports (`torch.cpu.get_capabilities`); the tests set them, since one
machine has one CPU."""

from __future__ import annotations

import pytest
import torch

from shared import devices

CPU = torch.device("cpu")


@pytest.fixture
def cpu_features(monkeypatch):
    def set_features(**features: bool) -> None:
        reported = {**torch.cpu.get_capabilities(), "amx_bf16": False, "avx512_bf16": False, **features}
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: reported)

    return set_features


@pytest.mark.parametrize(
    ("features", "dtype", "reason"),
    [
        ({"avx512_bf16": True}, torch.bfloat16, "natively (avx512_bf16)"),
        ({"amx_bf16": True, "avx512_bf16": True}, torch.bfloat16, "natively (amx_bf16)"),
        ({}, torch.float32, "no native bfloat16"),
    ],
)
def test_auto_on_the_cpu_follows_its_bf16_instructions(cpu_features, features, dtype, reason):
    cpu_features(**features)
    choice = devices.choose_dtype("auto", CPU)
    assert choice.dtype == dtype and reason in choice.reason and choice.reason.startswith("auto: ")
    assert devices.auto_mixed_precision(CPU) == ("bf16" if dtype == torch.bfloat16 else "no")


def test_a_dtype_the_entry_sets_is_kept_whatever_the_cpu(cpu_features):
    cpu_features(avx512_bf16=True)
    assert devices.choose_dtype("float32", CPU) == devices.DTypeChoice(torch.float32, "set in the model entry")
    cpu_features()
    assert devices.choose_dtype("bfloat16", CPU).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="float16 is not supported on the CPU"):
        devices.choose_dtype("float16", CPU)
