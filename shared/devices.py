"""Device and dtype choice: `auto` is bf16 where the device computes it natively (GPUs from Ampere on, CPUs with
AMX or AVX-512 BF16), else fp16 on a GPU and float32 on a CPU (emulated bf16 is slower than either there)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(preference: str = "auto") -> torch.device:
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {preference!r} was asked for, but no CUDA device is available")
    return device


def require_usable_gpu() -> str:
    """Check that a CUDA device can run work; return its name, or raise RuntimeError saying what to fix.

    The GPU image's services call this at start (settings.require_gpu), so a container that lost its GPU
    (no device reservation, no NVIDIA container toolkit, a driver mismatch) fails and says so, instead of
    reporting SERVING while running on the CPU at a hundredth of the speed."""
    if torch.version.cuda is None:
        raise RuntimeError(
            f"require_gpu is set, but this torch ({torch.__version__}) is a CPU build: use the gpu image, or unset "
            "MODELWORKS_REQUIRE_GPU to run on the CPU"
        )
    if not torch.cuda.is_available():
        raise RuntimeError(
            "require_gpu is set, but no CUDA device is usable: check the host's NVIDIA driver (nvidia-smi), the "
            "NVIDIA container toolkit, and the service's GPU reservation (device ids in docker-compose.override.yml); "
            "on a CPU-only host use docker-compose.cpu.yml"
        )
    try:
        torch.zeros(1, device="cuda").add_(1)
        torch.cuda.synchronize()
    except RuntimeError as error:
        raise RuntimeError(f"require_gpu is set, but the CUDA device fails a first operation: {error}") from error
    return torch.cuda.get_device_name(0)


# CPU features (as `torch.cpu.get_capabilities()` names them) with bf16 matrix instructions
BF16_CPU_FEATURES = ("amx_bf16", "avx512_bf16")


def native_bf16_cpu_feature() -> str | None:
    """The feature through which this CPU computes bf16 natively, or None where it would be emulated."""
    capabilities = torch.cpu.get_capabilities()
    return next((feature for feature in BF16_CPU_FEATURES if capabilities.get(feature)), None)


@dataclass(frozen=True)
class DTypeChoice:
    """The dtype a model runs in, and why (for ListModels and the load log)."""

    dtype: torch.dtype
    reason: str


def choose_dtype(preference: str, device: torch.device) -> DTypeChoice:
    """A model entry's `dtype` on `device`: what it sets, or for `auto` the fastest dtype the device computes
    natively (emulated bf16, on older GPUs and most CPUs, is slower than what it replaces)."""
    if preference != "auto":
        dtype = _DTYPES[preference]
        if device.type == "cpu" and dtype == torch.float16:
            raise ValueError("float16 is not supported on the CPU; use float32 or bfloat16")
        return DTypeChoice(dtype, "set in the model entry")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return DTypeChoice(torch.bfloat16, "auto: the GPU computes bfloat16 natively")
        return DTypeChoice(torch.float16, "auto: the GPU has no native bfloat16")
    feature = native_bf16_cpu_feature()
    if feature is not None:
        return DTypeChoice(torch.bfloat16, f"auto: the CPU computes bfloat16 natively ({feature})")
    return DTypeChoice(torch.float32, "auto: the CPU has no native bfloat16 (AMX or AVX-512 BF16)")


def auto_mixed_precision(device: torch.device) -> str:
    """Training's `mixed_precision: auto` on `device`: the autocast dtype `auto` serves in, or "no" (float32)."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(choose_dtype("auto", device).dtype, "no")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# CUDA errors after which the context is unusable ("sticky"): every later call fails too, so the only
# recovery is a new process. Out-of-memory is not among them: it fails one batch and the device lives on.
_FATAL_DEVICE_ERRORS = (
    "device-side assert triggered",
    "an illegal memory access was encountered",
    "unspecified launch failure",
    "misaligned address",
    "an illegal instruction was encountered",
    "hardware stack error",
    "uncorrectable ecc error",
    "cublas_status_execution_failed",
    "cudnn_status_execution_failed",
    "nccl error",
    "cuda driver error",
    "device lost",
)


class FatalDeviceError(RuntimeError):
    """The device is unusable after this error; the process must restart to serve again."""


def is_fatal_device_error(exc: BaseException) -> bool:
    if isinstance(exc, FatalDeviceError):
        return True
    if isinstance(exc, torch.OutOfMemoryError) or not isinstance(exc, RuntimeError):
        return False
    message = str(exc).lower()
    return any(marker in message for marker in _FATAL_DEVICE_ERRORS)
