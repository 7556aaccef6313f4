"""`python -m bench [--only NAME ...] [--data-dir DIR]`: run the benchmarks and print their tables."""

from __future__ import annotations

import argparse
import logging
import platform
from pathlib import Path

import torch

from bench import (
    cpu_paths,
    dataset_limits,
    diffusion,
    finetune,
    gateway,
    key_limits,
    llm,
    openai_api,
    prefill,
    quantization,
    realmodel,
    robustness,
    structured,
    training_data,
)
from bench.report import print_table
from shared.allocator import keep_freed_memory_for_reuse

BENCHMARKS = {
    "llm": ("LLM service", llm),
    "prefill": ("LLM prefill: chunked and prefix-cached", prefill),
    "realmodel": ("The default chat model (SmolLM2-135M-Instruct)", realmodel),
    "cpu_paths": ("The CPU's matmul and dtype choices for the default chat model", cpu_paths),
    "quantization": ("Quantized bases (NF4, int8) and QLoRA training memory", quantization),
    "structured": ("Structured output, logprobs and embeddings", structured),
    "diffusion": ("Diffusion service", diffusion),
    "finetune": ("Fine-tuning service", finetune),
    "training_data": ("The training data path: DataLoader workers against the training thread", training_data),
    "gateway": ("The web app (gateway) over the LLM service", gateway),
    "openai": ("The OpenAI-compatible HTTP API over gRPC and against vLLM", openai_api),
    "robustness": ("Robustness: fuzzing and load", robustness),
    "dataset_limits": ("Dataset validation: memory and time against hostile uploads", dataset_limits),
    "key_limits": ("Per-key limits: a second client while one key floods the LLM service", key_limits),
}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--only", choices=sorted(BENCHMARKS), action="append", help="run only these")
    parser.add_argument("--data-dir", type=Path, default=Path("var/bench"), help="built models and adapters go here")
    args = parser.parse_args()
    keep_freed_memory_for_reuse()  # as every service does: baselines in this process get the same allocator
    logging.basicConfig(level=logging.WARNING)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(f"# ModelWorks benchmarks on {platform.node()}: {device}, torch {torch.__version__}\n")
    for key in args.only or list(BENCHMARKS):
        title, module = BENCHMARKS[key]
        print(f"## {title}\n", flush=True)
        print_table(module.run(args.data_dir.resolve()), module.NOTE)


if __name__ == "__main__":
    main()
