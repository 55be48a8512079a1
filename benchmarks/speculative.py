"""Speculative decoding (prompt lookup) against plain decoding, on tasks grounded in a given passage.

Each task hands SmolLM2-135M-Instruct a passage (TinyStories stories) and asks it to quote it or to
retell it; a control task gives no passage. Every prompt is decoded greedily twice in this process, once
plainly and once with prompt-lookup speculation (the engine's default on CPU), and the benchmark checks
that the two outputs are the same token for token. llama-cpp-python's own prompt-lookup decoding
(`LlamaPromptLookupDecoding`) runs the same prompts when it is installed.

    python benchmarks/speculative.py [--passages 4] [--max-tokens 256] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from common import machine

ROOT = Path(__file__).resolve().parents[1]
TASKS = {
    "quote": "Repeat the following story exactly, word for word.\n\n{passage}",
    "retell": "Here is a story.\n\n{passage}\n\nRetell this story in your own words.",
    "control (no passage)": "Write a short story about a {topic}.",
}
TOPICS = ["dragon who is afraid of the dark", "boy who finds a map", "cat that learns to swim", "lost balloon"]


def passages(data: Path, n: int) -> list[str]:
    text = (data / "tinystories/tinystories.txt").read_text()
    stories = [s.strip() for s in text.split("\n\n\n") if 600 <= len(s.strip()) <= 1400]
    if len(stories) < n:  # paragraphs, when the file separates stories differently
        stories = [s.strip() for s in text.split("\n\n") if 400 <= len(s.strip()) <= 1400]
    return stories[:n]


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data"))
    ap.add_argument("--passages", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--engines", default="lmforge,llama.cpp")
    args = ap.parse_args()

    import lmforge
    from lmforge.engine import SamplingParams
    from lmforge.engine.speculative import PromptLookup

    lm = lmforge.load(args.model)
    print(f"machine: {machine()}")
    texts = passages(Path(args.data), args.passages)
    prompts: dict[str, list[list[int]]] = {}
    for task, template in TASKS.items():
        fill = [{"topic": t} for t in TOPICS[: args.passages]] if "{topic}" in template else \
            [{"passage": p} for p in texts]
        prompts[task] = [lm.chat_prompt(template.format(**f)) for f in fill]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    eng = lm.engine
    eng.generate([prompts["quote"][0][:64]], SamplingParams(temperature=0, max_tokens=8))  # warm-up
    rows = []
    totals = {"plain": [0, 0.0], "spec": [0, 0.0]}
    for task, batch in prompts.items():
        res: dict[str, list] = {"plain": [], "spec": []}
        secs = {"plain": 0.0, "spec": 0.0}
        for ids in batch:  # one request at a time: the single-stream latency a chat user sees
            for mode in ("plain", "spec"):
                eng.speculate(PromptLookup() if mode == "spec" else None)
                dt, (seq,) = timed(eng.generate, [ids], params)
                secs[mode] += dt
                res[mode].append(seq)
        n = sum(len(s.output_ids) for s in res["plain"])
        same = [a.output_ids == b.output_ids for a, b in zip(res["plain"], res["spec"])]
        kept = sum(s.spec.accepted for s in res["spec"] if s.spec)
        guessed = sum(s.spec.proposed for s in res["spec"] if s.spec)
        if not task.startswith("control"):
            for mode in totals:
                totals[mode][0] += n
                totals[mode][1] += secs[mode]
        rows.append((task, len(batch), n, n / secs["plain"], n / secs["spec"], secs["plain"] / secs["spec"],
                     f"{kept}/{guessed}", f"{sum(same)}/{len(same)}"))
    print("\n| task | prompts | tokens | plain tok/s | speculative tok/s | speedup | guesses kept | identical |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.1f} | {r[4]:.1f} | **{r[5]:.2f}x** | {r[6]} | {r[7]} |")
    (n, tp), (_, ts) = totals["plain"], totals["spec"]
    print(f"\ngrounded tasks together: plain {n / tp:.1f} tok/s, speculative {n / ts:.1f} tok/s, {tp / ts:.2f}x")

    if "llama.cpp" in args.engines.split(","):
        try:
            from llama_cpp import Llama
            from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
        except ImportError:
            print("llama.cpp not measured: llama-cpp-python is not installed")
            return
        threads = int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))
        out = {}
        for name, draft in (("plain", None), ("prompt lookup", LlamaPromptLookupDecoding(num_pred_tokens=10))):
            llm = Llama(str(lm.path), n_ctx=2048, n_threads=threads, verbose=False, draft_model=draft)
            n = secs = 0
            for task in (t for t in TASKS if not t.startswith("control")):
                for ids in prompts[task]:
                    llm.reset()
                    dt, res = timed(llm.create_completion, ids, max_tokens=args.max_tokens,
                                    temperature=0.0)
                    n += res["usage"]["completion_tokens"]
                    secs += dt
            out[name] = n / secs
            del llm
        print(f"llama.cpp, grounded tasks: plain {out['plain']:.1f} tok/s, prompt lookup "
              f"{out['prompt lookup']:.1f} tok/s ({out['prompt lookup'] / out['plain']:.2f}x); "
              f"lmforge speculative / llama.cpp prompt lookup: {(totals['spec'][0] / ts) / out['prompt lookup']:.2f}x")


if __name__ == "__main__":
    main()
