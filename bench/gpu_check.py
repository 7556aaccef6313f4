"""`make gpu-check`: prove the CUDA paths on a GPU host in a few minutes.

1. The GPU tests (`pytest -m gpu`): half-precision weights really are bf16/fp16, a mixed-adapter batch
   agrees with each request alone (first-step logits and greedy texts), and diffusion in half precision
   through `DiffusionEngine` matches each seed alone.
2. A throughput figure: a ~0.5B random Llama (Qwen2.5-0.5B-like shape) in bf16 through `LLMEngine` at
   batch 1 and 16, next to transformers' static `generate` at the same batch sizes.

`--device cpu --tiny` runs step 2 on a small model on the CPU, to check the script itself.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time

import torch

NEW_TOKENS = 64


def llama_config(tiny: bool, vocab_size: int):
    from transformers import LlamaConfig

    if tiny:
        shape = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4)
        return LlamaConfig(vocab_size=vocab_size, num_key_value_heads=2, max_position_embeddings=4096, **shape)
    return LlamaConfig(  # ~0.48B parameters
        vocab_size=vocab_size,
        hidden_size=1024,
        intermediate_size=5504,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=4096,
    )


def engine_tokens_per_second(model, tokenizer, batch: int) -> float:
    from services.llm.engine import LLMEngine, Sequence
    from services.llm.params import SamplingConfig

    engine = LLMEngine(
        model,
        tokenizer,
        model_name="gpu-check",
        eos_token_ids=set(),
        max_batch_size=max(batch, 1),
        max_waiting=64,
        max_prefill_tokens=8192,
    )
    engine.start()
    done = threading.Semaphore(0)

    def on_event(event):
        if event.final:
            done.release()

    try:
        start = time.perf_counter()
        for i in range(batch):
            prompt = tokenizer(f"def function_{i}(x):")["input_ids"]
            engine.submit(Sequence(prompt, SamplingConfig(max_new_tokens=NEW_TOKENS, ignore_eos=True), on_event))
        for _ in range(batch):
            assert done.acquire(timeout=600)
        _synchronize(model)
        return batch * NEW_TOKENS / (time.perf_counter() - start)
    finally:
        engine.shutdown()


def generate_tokens_per_second(model, tokenizer, batch: int) -> float:
    tokenizer.padding_side = "left"
    prompts = [f"def function_{i}(x):" for i in range(batch)]
    inputs = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    _synchronize(model)
    return batch * NEW_TOKENS / (time.perf_counter() - start)


def _synchronize(model) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize()


def throughput(device: str, tiny: bool) -> None:
    from transformers import LlamaForCausalLM

    from shared.builtin.tiny_llm import train_tokenizer

    tokenizer = train_tokenizer(4096)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(tiny, len(tokenizer))).to(device=device, dtype=dtype).eval()
    parameters = sum(p.numel() for p in model.parameters()) / 1e9
    print(f"\n## Throughput: random Llama, {parameters:.2f}B parameters, {dtype}, {device}, {NEW_TOKENS} new tokens\n")
    generate_tokens_per_second(model, tokenizer, 1)  # warm-up (kernels, allocator)
    engine_tokens_per_second(model, tokenizer, 1)
    print("| batch | engine tok/s | generate tok/s | engine / generate |")
    print("|---|---|---|---|")
    for batch in (1, 16):
        engine = engine_tokens_per_second(model, tokenizer, batch)
        static = generate_tokens_per_second(model, tokenizer, batch)
        print(f"| {batch} | {engine:,.0f} | {static:,.0f} | {engine / static:.2f}x |", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="a small model (to check the script on a CPU)")
    args = parser.parse_args()
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("no CUDA device: run this on a GPU host (or --device cpu --tiny to check the script)")
            return 2
        print(f"# GPU check on {torch.cuda.get_device_name()}, torch {torch.__version__} (CUDA {torch.version.cuda})")
        tests = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-p", "no:cacheprovider"])
        if tests.returncode != 0:
            return tests.returncode
    throughput(args.device, args.tiny)
    return 0


if __name__ == "__main__":
    sys.exit(main())
