"""Fail an image build whose torch is not the variant asked for: `python docker/check_torch.py gpu|cpu`.

The gpu image must hold a CUDA build (a CPU build would serve on the CPU at a fraction of the speed, and
say nothing); the cpu image must not (a CUDA build is gigabytes of libraries it never uses).
"""

from __future__ import annotations

import sys


def main(variant: str) -> int:
    import torch

    cuda = torch.version.cuda
    if variant == "gpu" and not cuda:
        print(f"the gpu image needs a CUDA build of torch, but it got {torch.__version__} (no CUDA)", file=sys.stderr)
        return 1
    if variant == "cpu" and cuda:
        print(f"the cpu image got a CUDA build of torch ({torch.__version__}, CUDA {cuda})", file=sys.stderr)
        return 1
    print(f"torch {torch.__version__}" + (f", CUDA {cuda}" if cuda else " (CPU)"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
