"""Where an engine step's time goes: `make profile` (`python -m bench.profile_step [--model NAME] [--streams N]
[--adapters K]`).

Runs the LLM engine in process on a built-in model, brings N streams to steady decoding (spread over K
LoRA adapters when asked), then records a few engine steps with torch.profiler and prints the operators
that cost the most (self time on the CPU, and on the GPU when there is one).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from services.llm.adapters import LoraAdapterCache
from services.llm.engine import LLMEngine, Sequence, eos_token_ids
from services.llm.params import SamplingConfig
from shared.adapters import AdapterStore
from shared.loaders import load_causal_lm
from shared.settings import Settings

BUILTIN = {"tiny-llm": "builtin:tiny-llm", "llm-100m": "builtin:llm-100m"}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_step", description=__doc__)
    parser.add_argument("--model", default="llm-100m", help="a built-in model (tiny-llm, llm-100m)")
    parser.add_argument("--streams", type=int, default=16, help="sequences decoding together")
    parser.add_argument("--steps", type=int, default=8, help="engine steps recorded")
    parser.add_argument("--data-dir", type=Path, default=Path("var/bench"))
    parser.add_argument("--top", type=int, default=15, help="operators listed")
    parser.add_argument("--cuda-graphs", action="store_true", help="decode steps replay CUDA graphs (GPU)")
    parser.add_argument("--adapters", type=int, default=0, help="spread the streams over this many LoRA adapters")
    args = parser.parse_args()

    entry = {"name": args.model, "kind": "llm", "source": BUILTIN[args.model]}
    settings = Settings.model_validate({"data_dir": str(args.data_dir.resolve()), "models": [entry]})
    loaded = load_causal_lm(settings.models[0], settings)
    adapters, names = None, [None]
    if args.adapters:
        from bench.llm import make_adapters

        names = [f"bench-{args.model}-{i}" for i in range(args.adapters)]
        make_adapters(settings, settings.models[0], names)
        store = AdapterStore(settings.adapters_dir)
        adapters = LoraAdapterCache(loaded.model, store, args.adapters, args.model, BUILTIN[args.model])
    engine = LLMEngine(
        loaded.model,
        loaded.tokenizer,
        model_name=args.model,
        eos_token_ids=eos_token_ids(loaded.model, loaded.tokenizer),
        max_batch_size=args.streams,
        max_waiting=args.streams,
        max_prompt_tokens=settings.llm.max_prompt_tokens,
        cuda_graphs=args.cuda_graphs,
        adapters=adapters,
    )
    prompt = loaded.tokenizer("def profile(step):")["input_ids"]
    warmup_steps = 20
    # just enough new tokens: a longer reservation could exceed the KV budget (4 GiB on a CPU) and be refused
    config = SamplingConfig(max_new_tokens=warmup_steps + args.steps + 1, ignore_eos=True)
    for i in range(args.streams):
        engine.submit(Sequence(prompt, config, lambda event: None, adapter=names[i % len(names)]))
    # The steps run on this thread (the engine's own thread is not started): the profiler sees all of them.
    for _ in range(warmup_steps):  # admission and prefill behind: steady decoding from here
        engine._step()
    if engine.num_running != args.streams:
        raise SystemExit(f"only {engine.num_running} of {args.streams} streams are decoding: see the log")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as profiler:
        started = time.perf_counter()
        for _ in range(args.steps):
            with record_function("engine step"):
                engine._step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started

    device = "cuda" if torch.cuda.is_available() else "cpu"
    over = f" over {args.adapters} adapters" if args.adapters else ""
    step_ms = elapsed / args.steps * 1000
    print(f"# {args.model}, {args.streams} streams{over} decoding on {device}: {step_ms:.1f} ms a step")
    averages = profiler.key_averages()
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.top))
    if device == "cuda":  # the GPU's own time, and the host calls that wait for it
        print(averages.table(sort_by="self_cuda_time_total", row_limit=args.top))
        waits = [e for e in averages if "Synchronize" in e.key or "Memcpy" in e.key]
        for event in waits:
            print(f"{event.key}: {event.count} calls, {event.cpu_time_total / 1000:.1f} ms")


if __name__ == "__main__":
    main()
