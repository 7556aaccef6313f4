#!/bin/sh
# Install torch VERSION of the given variant into the active environment, then prove it is that variant
# (docker/check_torch.py fails the build otherwise):
#   gpu: a CUDA build (PyPI's Linux x86_64 wheel).
#   cpu: the CPU build: a wheel in /wheels when one is there (offline builds), else PyTorch's CPU index.
set -eu
variant="$1"
version="$2"
case "$variant" in
  gpu)
    pip install "torch==$version"
    ;;
  cpu)
    wheel=$(ls /wheels/torch-"$version"+cpu-*.whl 2>/dev/null | head -n 1 || true)
    if [ -n "$wheel" ]; then
      pip install "$wheel"
    else
      pip install --index-url https://download.pytorch.org/whl/cpu "torch==$version"
    fi
    ;;
  *)
    echo "TORCH_VARIANT must be gpu or cpu, not '$variant'" >&2
    exit 2
    ;;
esac
python "$(dirname "$0")/check_torch.py" "$variant"
