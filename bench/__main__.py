"""`python -m bench [--data-dir DIR]`: run every benchmark and print its table."""

from __future__ import annotations

import argparse
import logging
import platform
from pathlib import Path

import torch

from bench import llm


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--data-dir", type=Path, default=Path("var/bench"), help="built models and adapters go here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(f"# ModelWorks benchmarks on {platform.node()}: {device}, torch {torch.__version__}\n")
    print("## LLM service\n")
    llm.print_table(llm.run(args.data_dir.resolve()))


if __name__ == "__main__":
    main()
