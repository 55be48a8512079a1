"""Where an engine step's time goes: prefill and decode steps of a SmolLM2-135M-shaped model (random
weights, so no file is needed) under torch.profiler, on any device.

    python benchmarks/profile_step.py --device cuda          # or cpu
    python benchmarks/profile_step.py --device cuda --rows 8 --steps 64

Prints the wall time per step (prefill of --prompt-tokens, then --steps decode steps of --rows rows) and
the operators that took the most host and device time, so per-step overheads (host syncs, small copies,
Python work between kernels) show beside the model's own work.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from lmforge.device import placement  # noqa: E402
from lmforge.engine import Engine, SamplingParams  # noqa: E402
from lmforge.formats import build_model  # noqa: E402
from lmforge.model import ModelConfig, Transformer  # noqa: E402

SMOLLM2_135M = ModelConfig(family="llama", vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3,
                           head_dim=64, ffn_dim=1536, norm_eps=1e-5, rope_theta=100000.0, tie_embeddings=True,
                           context_length=8192)


def random_weights(cfg: ModelConfig, seed: int = 0):
    """A randomly initialized model's tensors, as a file would stream them."""
    torch.manual_seed(seed)
    model = Transformer(cfg)
    model.init_weights()
    yield from model.state_dict().items()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rows", type=int, default=1, help="sequences decoded together")
    ap.add_argument("--steps", type=int, default=32, help="decode steps profiled")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--top", type=int, default=25, help="operators listed")
    args = ap.parse_args()

    dev, dtype = placement(args.device)
    cfg = SMOLLM2_135M
    model = build_model(cfg, random_weights(cfg), dev, dtype)
    print(f"machine: {machine()}; device {dev}, {dtype}")
    if dev.type == "cuda":
        print(torch.cuda.get_device_name(dev))
    eng = Engine(model, None, max_batch=max(8, args.rows))
    prompt = [int(t) for t in torch.randint(0, cfg.vocab_size, (args.prompt_tokens,))]
    params = SamplingParams(temperature=0, max_tokens=args.steps + 8, ignore_eos=True)

    eng.generate([prompt[:16]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm-up
    seqs = [eng.add(prompt, params) for _ in range(args.rows)]
    sync(dev)
    t = time.perf_counter()
    eng.step()
    sync(dev)
    prefill = time.perf_counter() - t
    for _ in range(3):  # untimed decode steps: allocator and cache settle
        eng.step()
    acts = [torch.profiler.ProfilerActivity.CPU]
    if dev.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    sync(dev)
    times = []
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(args.steps):
            t = time.perf_counter()
            eng.step()
            sync(dev)
            times.append(time.perf_counter() - t)
    assert all(not s.error for s in seqs)
    times.sort()
    med = times[len(times) // 2]
    print(f"prefill {args.rows} x {args.prompt_tokens} tokens: {prefill * 1e3:.1f} ms "
          f"({args.rows * args.prompt_tokens / prefill:,.0f} tok/s)")
    print(f"decode step, {args.rows} rows: median {med * 1e3:.2f} ms, min {times[0] * 1e3:.2f} ms "
          f"({args.rows / med:,.1f} tok/s)")
    key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
    if dev.type == "cuda":
        print(prof.key_averages().table(sort_by=key, row_limit=args.top))


if __name__ == "__main__":
    main()
