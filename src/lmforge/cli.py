"""The `lmforge` command line. Sampling flags mirror the OpenAI API's parameter names in kebab-case."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .errors import LMForgeError


def _add_sampling(p: argparse.ArgumentParser) -> None:
    from .engine import SamplingParams

    d = SamplingParams()  # the defaults, defined once
    g = p.add_argument_group("sampling (OpenAI parameter names)")
    g.add_argument("--max-tokens", type=int, default=d.max_tokens,
                   help=f"most tokens to generate (default {d.max_tokens})")
    g.add_argument("--min-tokens", type=int, default=d.min_tokens,
                   help=f"tokens generated before end-of-turn or a stop string may end the output "
                        f"(default {d.min_tokens})")
    g.add_argument("--temperature", type=float, default=d.temperature,
                   help=f"0 is greedy (default {d.temperature:g}, as in the OpenAI API)")
    g.add_argument("--top-p", type=float, default=d.top_p, help=f"nucleus sampling mass (default {d.top_p})")
    g.add_argument("--top-k", type=int, default=d.top_k, help="keep the k most likely tokens; 0 disables (default)")
    g.add_argument("--min-p", type=float, default=d.min_p, help="drop tokens below min-p x the top probability")
    g.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty,
                   help="multiplicative penalty (1.0 = off)")
    g.add_argument("--presence-penalty", type=float, default=d.presence_penalty,
                   help="additive penalty on used tokens")
    g.add_argument("--frequency-penalty", type=float, default=d.frequency_penalty, help="additive penalty per use")
    g.add_argument("--logit-bias", action="append", default=[], metavar="TOKEN_ID=BIAS",
                   help="add BIAS to a token's logit (repeatable)")
    g.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    g.add_argument("--stop", action="append", default=[], help="stop string, not emitted (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep going past end-of-turn tokens")
    g.add_argument("--num-beams", type=int, default=d.num_beams, help="beam search (encoder-decoders; 1: off)")


def _add_model_opts(p: argparse.ArgumentParser, optional: bool = False) -> None:
    from .registry import DEFAULT_MODEL

    if optional:
        p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                       help=f"registry name, .gguf file or HF directory (default {DEFAULT_MODEL})")
    else:
        p.add_argument("model", help="registry name, .gguf file or HF directory")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")


_SIZE_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str, flag: str) -> int:
    """Bytes from a size such as ``512M``, ``1.5G``, ``512MiB`` or ``1073741824`` (K, M, G, T are powers of 1024)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1:] if t[-1:] in _SIZE_UNITS else ""
    try:
        n = float(t[: len(t) - len(unit)]) * _SIZE_UNITS[unit]
    except ValueError:
        n = float("nan")
    if not n >= 1 or n == float("inf"):
        raise LMForgeError(f"{flag} must be a size such as 512M, 2G or a number of bytes, got {text!r}")
    return int(n)


def _add_adapter(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="apply a LoRA adapter directory (from `lmforge finetune sft`, or PEFT's)")


def _sampling(args: argparse.Namespace) -> Any:
    from .engine import SamplingParams

    bias = {}
    for item in args.logit_bias:
        tok, sep, val = item.partition("=")
        try:
            bias[int(tok)] = float(val)
        except ValueError:
            raise LMForgeError(f"--logit-bias expects TOKEN_ID=BIAS, got {item!r}") from None
        if not sep:
            raise LMForgeError(f"--logit-bias expects TOKEN_ID=BIAS, got {item!r}")
    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, logit_bias=bias or None, seed=args.seed, stop=args.stop,
        ignore_eos=args.ignore_eos, min_tokens=args.min_tokens, logprobs=getattr(args, "logprobs", False),
        top_logprobs=getattr(args, "top_logprobs", 0), num_beams=args.num_beams,
    )


def _load(args: argparse.Namespace) -> Any:
    from .api import load

    return load(args.model, device=args.device, progress=sys.stderr.isatty(), adapter=getattr(args, "adapter", None))


# -- commands ------------------------------------------------------------------------------------------
def cmd_pull(args: argparse.Namespace) -> int:
    from .registry import pull

    for name in args.models:
        path = pull(name, force=args.force)
        print(path)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from .registry import MODELS, list_local

    local = {name: (path, size) for name, path, size in list_local()}
    print(f"{'NAME':<24} {'SIZE':>9}  {'STATUS':<10} DESCRIPTION")
    for name, spec in MODELS.items():
        if name in local:
            size, status = f"{local[name][1] / 2**20:.0f} MB", "pulled"
        else:
            size, status = "-", "available"
        if args.all or name in local:
            print(f"{name:<24} {size:>9}  {status:<10} {spec.description}")
    if not local and not args.all:
        print("(no models pulled yet: `lmforge pull NAME`, or `lmforge list --all` to see what is available)")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .formats.inspect import describe, describe_system
    from .registry import resolve

    if args.model is None and not args.system:
        raise LMForgeError("info needs a model, or --system")
    info = (describe_system() if args.system else {}) | (describe(resolve(args.model)) if args.model else {})
    for key, value in info.items():
        if key == "chat template" and value and not args.template:
            value = f"{len(value)} chars (show it with --template)"
        print(f"{key}:\n{value}" if isinstance(value, str) and "\n" in value else f"{key}: {value}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    params = _sampling(args)
    lm = _load(args)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    generation = lm.start(prompt, params)
    for delta in generation:
        if args.stream:
            print(delta, end="", flush=True)
    seq = generation.sequence
    if seq.error is not None:
        raise LMForgeError(f"generation failed: {seq.error}")
    print() if args.stream else print(seq.text)
    if args.logprobs:
        tok = lm.tokenizer
        for lp in seq.logprobs:
            alts = ", ".join(f"{tok.decode([i], skip_special_tokens=False)!r}:{v:.3f}" for i, v in lp.top)
            print(f"{tok.decode([lp.token_id], skip_special_tokens=False)!r}\t{lp.logprob:.4f}\t{alts}",
                  file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .chat import load_tools, run_chat

    params = _sampling(args)
    tools = load_tools(args.tools, args.tool_choice) if args.tools or args.tool_choice else None
    return run_chat(_load(args), params, system=args.system, interactive=sys.stdin.isatty(), tools=tools)


def cmd_serve(args: argparse.Namespace) -> int:
    from .api import load
    from .serve import ServerConfig, model_name_for, serve

    if args.max_batch < 1 or args.max_queue < 0:
        raise LMForgeError("--max-batch must be at least 1 and --max-queue at least 0")
    if args.ctx is not None and args.ctx < 2:
        raise LMForgeError(f"--ctx must be at least 2, got {args.ctx}")
    if args.stream_interval_ms < 0:
        raise LMForgeError(f"--stream-interval-ms must be 0 or more, got {args.stream_interval_ms}")
    if args.draft_tokens is not None and (args.draft_tokens < 0 or (args.draft_model and args.draft_tokens == 0)):
        raise LMForgeError(f"--draft-tokens must be at least {1 if args.draft_model else 0}, got {args.draft_tokens}")
    if not 0 <= args.port <= 65535:
        raise LMForgeError(f"--port must be between 0 and 65535, got {args.port}")
    kv_memory = None if args.kv_memory is None else parse_size(args.kv_memory, "--kv-memory")
    from .serve.gate import check_api_keys

    env_keys = os.environ.get("LMFORGE_API_KEYS")
    if args.api_key:
        keys = check_api_keys(args.api_key, "--api-key")
    else:  # a variable that is set must hold keys: an empty one would silently serve without any
        keys = [] if env_keys is None else check_api_keys(env_keys.split(","), "LMFORGE_API_KEYS")
    # Loaded on a thread that then ends: torch ops on the main thread would leave an OpenMP pool there beside
    # the one the scheduler thread's kernels start, and with more OpenMP threads than cores libgomp stops
    # spin-waiting at barriers (single-stream decode measured 2x slower).
    with ThreadPoolExecutor(1) as pool:  # its thread ends when the block does
        lm = pool.submit(load, args.model, device=args.device, max_batch=1, progress=sys.stderr.isatty(),
                         adapter=args.adapter).result()
        draft = pool.submit(load, args.draft_model, device=args.device, max_batch=1).result() \
            if args.draft_model else None
    cfg = ServerConfig(model_name=model_name_for(args.model), api_keys=keys, max_batch=args.max_batch,
                       max_queue=args.max_queue, ctx=args.ctx, kv_memory=kv_memory, draft_tokens=args.draft_tokens,
                       stream_interval=args.stream_interval_ms / 1000)
    print(f"serving {cfg.model_name} on http://{args.host}:{args.port} (web chat at /, API at /v1)",
          file=sys.stderr)
    serve(lm, cfg, host=args.host, port=args.port, draft=draft)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from .finetune.lora import merge_to_hf

    print(f"wrote {merge_to_hf(args.model, args.adapter, args.out, device=args.device)}")
    return 0


def _texts(args: argparse.Namespace) -> list[str]:
    """Texts from the command line and/or --input files (JSONL records' --text-field, or text paragraphs)."""
    from .train.corpus import iter_texts

    texts = list(args.texts)
    if args.input:
        texts += [t.strip() for t in iter_texts(args.input, args.text_field)]
    if not texts:
        raise LMForgeError("no texts: pass them as arguments or with --input FILE.jsonl")
    return texts


def cmd_embed(args: argparse.Namespace) -> int:
    import numpy as np

    from .analysis import kmeans, plot_embeddings
    from .fsutil import atomic_file

    texts = _texts(args)
    if args.clusters is not None and args.clusters < 1:
        raise LMForgeError(f"--clusters must be at least 1, got {args.clusters}")
    lm = _load(args)
    vecs = lm.embed(texts, batch_size=args.batch_size, progress=bool(args.input) or sys.stderr.isatty())
    labels = kmeans(vecs, args.clusters)[0] if args.clusters else None
    if args.out:
        with atomic_file(args.out) as tmp, open(tmp, "wb") as f:
            np.save(f, vecs)
        print(f"wrote {vecs.shape[0]} x {vecs.shape[1]} embeddings to {args.out}", file=sys.stderr)
    if args.plot:
        print(f"wrote {plot_embeddings(vecs, texts, args.plot, labels)}", file=sys.stderr)
    if labels is not None:
        for c, t in zip(labels, texts):
            print(f"{c}\t{t}")
    elif not (args.out or args.plot):
        for t, v in zip(texts, vecs):
            print(json.dumps({"text": t, "embedding": [round(float(x), 7) for x in v]}))
    return 0


def cmd_similarity(args: argparse.Namespace) -> int:
    from .analysis import cosine_matrix

    texts = _texts(args)
    if len(texts) < 2:
        raise LMForgeError("similarity needs at least two texts")
    sim = cosine_matrix(_load(args).embed(texts, batch_size=args.batch_size))
    if len(texts) == 2:
        print(f"{sim[0, 1]:.4f}")
        return 0
    print("\t".join(["", *(str(i + 1) for i in range(len(texts)))]))
    for i, t in enumerate(texts):
        print("\t".join([str(i + 1), *(f"{x:.4f}" for x in sim[i])]) + f"\t{t[:60]}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .formats.export import export_model

    fmt, out = args.to
    r = export_model(args.model, fmt, out, args.quant, progress=sys.stderr.isatty())
    types = ", ".join(f"{n} {t}" for t, n in sorted(r.tensor_types.items()))
    print(f"wrote {r.path} ({r.format}, {r.size / 2**20:.1f} MB, {r.tensors} tensors: {types})")
    return 0


# -- entry point -----------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line, like every other lmforge error, instead of argparse's usage dump.
        self.exit(2, f"lmforge: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .engine.speculative import DRAFT_TOKENS
    from .serve.scheduler import STREAM_INTERVAL

    parser = _Parser(prog="lmforge", description="Run, chat with and inspect language models.")
    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("pull", help="download registry models into the local cache")
    p.add_argument("models", nargs="+", metavar="NAME")
    p.add_argument("--force", action="store_true", help="download again even if present")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("list", help="show local models")
    p.add_argument("--all", action="store_true", help="also show registry models not pulled yet")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("info", help="a model's architecture, size, tensor types, context and template; --system")
    p.add_argument("model", nargs="?", help="registry name, .gguf file or HF directory")
    p.add_argument("--template", action="store_true", help="print the full chat template")
    p.add_argument("--system", action="store_true", help="this machine: CPU features, compute paths, devices")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("generate", help="complete a prompt")
    _add_model_opts(p)
    p.add_argument("prompt", nargs="?", default=None, help="the prompt (default: read stdin)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--logprobs", action="store_true", help="print per-token logprobs to stderr")
    p.add_argument("--top-logprobs", type=int, default=0, help="alternatives per token with --logprobs")
    _add_adapter(p)
    _add_sampling(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="chat (interactive or piped stdin; encoder-decoders: each message alone)")
    _add_model_opts(p, optional=True)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--tools", default=None, metavar="FILE.json",
                   help="tools the model may call: a JSON list of OpenAI tool definitions")
    p.add_argument("--tool-choice", default=None, metavar="auto|none|required|NAME",
                   help="whether the model may (auto), must not (none) or must (required, or a function's "
                        "name) call a tool; default auto with --tools")
    _add_adapter(p)
    _add_sampling(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with a web chat page")
    _add_model_opts(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="require `Authorization: Bearer KEY` (repeatable; default: $LMFORGE_API_KEYS, comma-separated)")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together (default 16)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="sequences that may wait for a slot before requests get 429 (default 64)")
    p.add_argument("--ctx", type=int, default=None, help="context window in tokens (default: the model's)")
    p.add_argument("--kv-memory", default=None, metavar="SIZE",
                   help="memory for the KV cache, all slots together, e.g. 512M, 2G or bytes (default: 512M, or one "
                        "full-context sequence if that is more); requests that do not fit wait, and the context "
                        "shrinks to what it holds")
    p.add_argument("--draft-tokens", type=int, default=None, metavar="N",
                   help="speculative decoding: the most tokens guessed a step and verified together (default "
                        f"{DRAFT_TOKENS}, by prompt lookup, where the model runs the packed CPU kernels; 0: off)")
    p.add_argument("--draft-model", default=None, metavar="MODEL",
                   help="guess with this small model (same vocabulary) instead of prompt lookup")
    p.add_argument("--stream-interval-ms", type=float, default=STREAM_INTERVAL * 1000, metavar="MS",
                   help="the least time between two streamed chunks of a choice; text decoded in between goes "
                        f"out together (default {STREAM_INTERVAL * 1000:g}; 0: a chunk every step)")
    _add_adapter(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("merge", help="fold a LoRA adapter into its base model and write an HF directory")
    _add_model_opts(p)
    p.add_argument("--adapter", required=True, metavar="DIR", help="the adapter directory")
    p.add_argument("--out", required=True, metavar="DIR", help="output HF directory (replaced atomically)")
    p.set_defaults(func=cmd_merge)

    from .train.commands import add_parsers as add_training_parsers

    add_training_parsers(sub)

    def add_texts(p: argparse.ArgumentParser) -> None:
        p.add_argument("texts", nargs="*", metavar="TEXT", help="texts (or use --input)")
        p.add_argument("--input", nargs="+", default=None, metavar="PATH",
                       help="JSONL files (one text per record) or text files (one text per paragraph)")
        p.add_argument("--text-field", default="text", help="JSONL field holding the text (default text)")

    p = sub.add_parser("embed", help="embed texts (JSON lines, .npy, k-means clusters or a 2-D PCA plot)")
    _add_model_opts(p)
    add_texts(p)
    p.add_argument("--out", default=None, metavar="FILE.npy", help="save the embeddings as a .npy array")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="draw a 2-D PCA projection of the texts")
    p.add_argument("--clusters", type=int, default=None, metavar="K", help="k-means: print each text's cluster")
    p.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default 32)")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("similarity", help="pairwise cosine similarity of texts")
    _add_model_opts(p)
    add_texts(p)
    p.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default 32)")
    p.set_defaults(func=cmd_similarity)

    from .encoders.commands import add_classify_parser, add_finetune_parser

    add_classify_parser(sub, _add_model_opts, add_texts, _texts)

    p = sub.add_parser("finetune", help="fine-tune a model for a task")
    fsub = p.add_subparsers(dest="finetune_command", metavar="COMMAND", required=True)
    add_finetune_parser(fsub, _add_model_opts)
    from .finetune.commands import add_parsers as add_finetune_parsers

    add_finetune_parsers(fsub)

    from .agent.commands import add_parsers as add_agent_parsers
    from .retrieval.commands import add_parsers as add_retrieval_parsers
    from .translate import add_parsers as add_translate_parsers

    add_retrieval_parsers(sub, _add_sampling, _sampling)
    add_agent_parsers(sub)
    add_translate_parsers(sub, _add_model_opts, _add_sampling, _sampling, _load)

    from .eval.commands import add_parsers as add_eval_parsers

    add_eval_parsers(sub, _add_model_opts, _load)  # `eval` and `solve`

    p = sub.add_parser("export", help="write a model as an HF directory or a GGUF file (llama.cpp, Ollama)")
    p.add_argument("model", help="registry name, .gguf file or HF directory (e.g. a training checkpoint)")
    p.add_argument("--to", nargs=2, required=True, metavar=("FORMAT", "PATH"),
                   help="`hf DIR` or `gguf FILE.gguf` (replaced atomically)")
    p.add_argument("--quant", default=None, help="GGUF matrix type: f16 (default), bf16, q8_0, q4_1 or f32")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except LMForgeError as e:
        print(f"lmforge: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
