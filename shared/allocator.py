"""Keep freed memory for reuse instead of handing it back to the kernel after every tensor.

glibc serves large blocks with mmap and returns them with munmap, and trims the heap whenever 128 KiB sit
free at its top; a CPU forward or backward pass allocates and frees its activations every step, so it
page-faults them in every step. Raising the mmap threshold to glibc's maximum (32 MiB on 64-bit) and the
trim threshold to 512 MiB lets those blocks be reused. Measured on this project's 2-core CPU hosts: a
200-step LoRA job on tiny-llm ran in 2.9 s instead of 5.0 s. The cost is RSS that stays at its high-water
mark (bounded by the trim threshold above it). GPU memory is unaffected (PyTorch's caching allocator).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024
TRIM_THRESHOLD = 512 * 1024 * 1024


def keep_freed_memory_for_reuse() -> bool:
    """Tune glibc's malloc for this process (a no-op elsewhere); call once, early. True if applied."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        applied = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
        applied = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and applied
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    return applied
