"""`make gpu-check`: prove the CUDA paths on a GPU host in a few minutes.

1. The GPU tests (`pytest -m gpu` over the GPU test modules): half-precision weights really are bf16/fp16,
   a mixed-adapter batch agrees with each request alone, diffusion in half precision matches each seed
   alone, and LoRA fine-tuning steps run under autocast.
2. CUDA graphs against the eager path, on a ~0.5B random Llama (Qwen2.5-0.5B-like shape) in bf16: one
   decode step's logits from a captured graph and from the eager packed forward on the same KV, and the
   greedy texts of a batch through an engine with and without graphs.
3. Throughput at batch 1 and 16: the engine eager, the engine with CUDA graphs, and transformers' static
   `generate`, side by side.
4. Chunked prefill: 4 streams decode while a 4,000-token prompt arrives; their largest inter-token gap over
   their median.

`--device cpu --tiny` runs steps 2-4 on a small model on the CPU (graphs replaced by their uncaptured
static plans), to check the script itself.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import threading
import time

import torch

NEW_TOKENS = 64
GPU_TESTS = ["tests/llm/test_gpu.py", "tests/diffusion/test_gpu.py", "tests/finetune/test_training.py"]


def llama_config(tiny: bool, vocab_size: int):
    from transformers import LlamaConfig

    if tiny:
        shape = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4)
        return LlamaConfig(vocab_size=vocab_size, num_key_value_heads=2, max_position_embeddings=8192, **shape)
    return LlamaConfig(  # ~0.48B parameters
        vocab_size=vocab_size,
        hidden_size=1024,
        intermediate_size=5504,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=8192,
    )


def make_engine(model, tokenizer, batch: int, graphs: bool):
    from services.llm.engine import LLMEngine

    engine = LLMEngine(
        model,
        tokenizer,
        model_name="gpu-check",
        eos_token_ids=set(),
        max_batch_size=max(batch, 4),
        max_waiting=64,
        max_prompt_tokens=8192,
        cuda_graphs=graphs,
    )
    engine.start()
    return engine


def run_batch(engine, tokenizer, prompts: list[str], new_tokens: int) -> list[list[int]]:
    """Submit every prompt at once, greedy; their generated ids."""
    from services.llm.engine import Sequence
    from services.llm.params import SamplingConfig

    done = threading.Semaphore(0)
    seqs = []
    for prompt in prompts:
        config = SamplingConfig(max_new_tokens=new_tokens, ignore_eos=True)
        seqs.append(Sequence(tokenizer(prompt)["input_ids"], config, lambda e: e.final and done.release()))
        engine.submit(seqs[-1])
    for _ in prompts:
        assert done.acquire(timeout=600), "the engine did not finish"
    return [seq.output_ids for seq in seqs]


def prompts_of(batch: int) -> list[str]:
    return [f"def function_{i}(x):" for i in range(batch)]


def engine_tokens_per_second(model, tokenizer, batch: int, graphs: bool) -> float:
    engine = make_engine(model, tokenizer, batch, graphs)
    try:
        run_batch(engine, tokenizer, prompts_of(batch), 8)  # warm-up: kernels, allocator, graph capture
        start = time.perf_counter()
        run_batch(engine, tokenizer, prompts_of(batch), NEW_TOKENS)
        _synchronize(model)
        return batch * NEW_TOKENS / (time.perf_counter() - start)
    finally:
        engine.shutdown()


def generate_tokens_per_second(model, tokenizer, batch: int) -> float:
    tokenizer.padding_side = "left"
    inputs = tokenizer(prompts_of(batch), return_tensors="pt", padding=True).to(model.device)
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    _synchronize(model)
    return batch * NEW_TOKENS / (time.perf_counter() - start)


def _synchronize(model) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize()


def graph_logits_agree(model, tokenizer) -> tuple[float, float]:
    """(max |graph - eager| of one decode step's logits, max |eager logit|) on the same KV state."""
    from services.llm.batch import Work, forward, use_slot_attention
    from services.llm.cuda_graphs import StaticDecode
    from services.llm.kv_slots import SlotKV

    use_slot_attention(model)
    prompts = [tokenizer(p)["input_ids"] for p in prompts_of(6)]
    kv = SlotKV(
        model.config,
        dtype=next(model.parameters()).dtype,
        device=model.device,
        budget_bytes=2**34,
        max_rows=8,
        static_buffers=True,
    )
    slots = [kv.reserve(len(p) + 8) for p in prompts]
    kv.ensure()
    logits = forward(model, kv, [], [Work(s, 0, p) for s, p in zip(slots, prompts, strict=True)])
    tokens = logits.argmax(-1).tolist()
    decode = [Work(s, len(p), [t]) for s, p, t in zip(slots, prompts, tokens, strict=True)]
    eager = forward(model, kv, decode, []).float()
    graphs = StaticDecode(model, kv, capture=model.device.type == "cuda")
    graphed = graphs.step(slots[0].capacity, [s.row for s in slots], [len(p) for p in prompts], tokens).float()
    return (graphed - eager).abs().max().item(), eager.abs().max().item()


def gap_ratio(model, tokenizer, prompt_tokens: int) -> tuple[float, float]:
    """4 streams decode; a long prompt arrives. (max gap while it prefills / median gap, its TTFT in s)."""
    from bench.prefill import gaps_while
    from services.llm.engine import Sequence
    from services.llm.params import SamplingConfig

    engine = make_engine(model, tokenizer, 8, graphs=False)
    steps = []  # (decode rows, prompt tokens, seconds) of each engine step, for the trace
    forward = engine._forward

    def traced(decoding, plan):
        started = time.perf_counter()
        forward(decoding, plan)
        steps.append((len(decoding), sum(n for _, n in plan), time.perf_counter() - started))

    engine._forward = traced
    arrivals: list[list[float]] = [[] for _ in range(4)]
    finished = threading.Semaphore(0)
    try:
        run_batch(engine, tokenizer, prompts_of(4), 8)  # warm-up

        def on_event(i):
            def record(event):
                arrivals[i].append(time.perf_counter())
                if event.final:
                    finished.release()

            return record

        for i in range(4):
            config = SamplingConfig(max_new_tokens=400, ignore_eos=True)
            engine.submit(Sequence(tokenizer(f"stream {i}:")["input_ids"], config, on_event(i)))
        while min(len(a) for a in arrivals) < 20:
            time.sleep(0.005)
        first = threading.Event()
        long_prompt = list(range(5, 5 + prompt_tokens))
        start = time.perf_counter()
        engine.submit(Sequence(long_prompt, SamplingConfig(max_new_tokens=1), lambda e: e.final and first.set()))
        assert first.wait(600)
        end = time.perf_counter()
        for _ in range(4):
            assert finished.acquire(timeout=600)
    finally:
        engine.shutdown()
    chunks = [(n, round(t * 1000)) for rows, n, t in steps if rows and n]
    decode_ms = statistics.median(t for rows, n, t in steps if rows and not n) * 1000
    print(f"  trace: decode step {decode_ms:.1f} ms; (chunk tokens, step ms): {chunks}")
    largest, median = gaps_while(arrivals, start, end)
    return largest / median, end - start


def checks(device: str, tiny: bool, only_prefill: bool = False) -> None:
    from transformers import LlamaForCausalLM

    from shared.builtin.tiny_llm import train_tokenizer

    tokenizer = train_tokenizer(4096)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(tiny, len(tokenizer))).to(device=device, dtype=dtype).eval()
    parameters = sum(p.numel() for p in model.parameters()) / 1e9
    print(f"\n## Random Llama, {parameters:.2f}B parameters, {dtype}, {device}\n", flush=True)
    if only_prefill:
        prefill_figure(model, tokenizer, tiny)
        return

    difference, scale = graph_logits_agree(model, tokenizer)
    print(f"- one decode step, graph vs eager logits: max difference {difference:.4g} (logits up to {scale:.3g})")
    texts = {}
    for graphs in (False, True):
        engine = make_engine(model, tokenizer, 16, graphs)
        try:
            texts[graphs] = run_batch(engine, tokenizer, prompts_of(16), NEW_TOKENS)
        finally:
            engine.shutdown()
    same = sum(a == b for a, b in zip(texts[False], texts[True], strict=True))
    parts = [
        next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
        for a, b in zip(*texts.values(), strict=True)
    ]
    print(
        f"- greedy texts, 16 requests x {NEW_TOKENS} tokens: {same}/16 identical with and without graphs"
        f" (first differing token of the others: {[p for p in parts if p is not None]})",
        flush=True,
    )

    generate_tokens_per_second(model, tokenizer, 1)  # warm-up
    print("\n| batch | engine tok/s | engine + graphs tok/s | generate tok/s | graphs / eager | graphs / generate |")
    print("|---|---|---|---|---|---|")
    for batch in (1, 16):
        eager = engine_tokens_per_second(model, tokenizer, batch, graphs=False)
        graphed = engine_tokens_per_second(model, tokenizer, batch, graphs=True)
        static = generate_tokens_per_second(model, tokenizer, batch)
        figures = f"{eager:,.0f} | {graphed:,.0f} | {static:,.0f}"
        print(f"| {batch} | {figures} | {graphed / eager:.2f}x | {graphed / static:.2f}x |", flush=True)
    prefill_figure(model, tokenizer, tiny)


def prefill_figure(model, tokenizer, tiny: bool) -> None:
    prompt_tokens = 400 if tiny else 4000
    ratio, ttft = gap_ratio(model, tokenizer, prompt_tokens)
    print(
        f"\n- chunked prefill: 4 streams decoding, a {prompt_tokens}-token prompt arrives: max gap / median gap "
        f"{ratio:.2f}x; the prompt's first token after {ttft:.2f} s",
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="a small model (to check the script on a CPU)")
    parser.add_argument("--skip-tests", action="store_true", help="only the engine checks and figures")
    parser.add_argument("--only-prefill", action="store_true", help="only the chunked-prefill figure, traced")
    args = parser.parse_args()
    tests_failed = 0
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("no CUDA device: run this on a GPU host (or --device cpu --tiny to check the script)")
            return 2
        print(f"# GPU check on {torch.cuda.get_device_name()}, torch {torch.__version__} (CUDA {torch.version.cuda})")
        if not args.skip_tests:
            command = [sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-p", "no:cacheprovider", *GPU_TESTS]
            tests_failed = subprocess.run(command).returncode  # the figures below are still worth having
    checks(args.device, args.tiny, args.only_prefill)
    return tests_failed


if __name__ == "__main__":
    sys.exit(main())
