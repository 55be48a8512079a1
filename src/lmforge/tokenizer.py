"""Tokenizers (HF `tokenizers` objects), chat templates (sandboxed jinja2) and streaming detokenization."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from .errors import LMForgeError
from .fsutil import read_json

# Turn-ending tokens across common chat formats; generation stops on any that the vocab has.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Pre-tokenizer split patterns, keyed by GGUF `tokenizer.ggml.pre`.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# lmforge's own trained tokenizers split as GPT-4 does: Llama 3's pattern with possessive quantifiers.
GPT4_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)
_SPLITS = {"llama-bpe": LLAMA3_SPLIT, "llama3": LLAMA3_SPLIT, "llama-v3": LLAMA3_SPLIT,
           "smaug-bpe": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT, "deepseek-r1-qwen": QWEN2_SPLIT}
GGUF_PRE_TOKENIZERS = ("gpt-2", "default", "smollm", *_SPLITS)


# What transformers' T5 tokenizer assumes when a directory names no special tokens.
_T5_SPECIAL_TOKENS = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
_CONTINUE_MARK = "\u2063lmforge-continue\u2063"  # invisible separators: no template or text writes these


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _gguf_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre in ("gpt-2", "default"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        # SmolLM splits every digit on its own before the GPT-2 split (as its tokenizer.json does).
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        )
    if pre in _SPLITS:
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    raise LMForgeError(f"unsupported GGUF pre-tokenizer {pre!r} (supported: {', '.join(GGUF_PRE_TOKENIZERS)})")


# `tokenizer.ggml.model` values lmforge rebuilds.
GGUF_TOKENIZER_MODELS = {"gpt2": "byte-level BPE", "llama": "SentencePiece BPE", "t5": "SentencePiece Unigram"}
# Architectures whose SentencePiece GGUF vocabularies are spelled or merged differently from Llama's.
_SPM_OTHER_SPELLINGS = ("gemma", "gemma2", "gemma3", "gemma3n", "phi3")
SPACE = "\u2581"  # SentencePiece's visible space


def _gguf_byte_level(meta: dict[str, Any], tokens: list[str], types: list[int]) -> HFTokenizer:
    alphabet = _byte_alphabet()
    spelled = set(alphabet.values())

    def spell(t: str) -> str:  # tokens outside the byte alphabet are stored as raw text
        return t if set(t) <= spelled else "".join(alphabet[b] for b in t.encode("utf-8"))

    vocab = {spell(t): i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    hf.pre_tokenizer = _gguf_pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"))
    hf.decoder = decoders.ByteLevel()
    # Control tokens (type 3) are special; user-defined ones (type 4) must still match whole.
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types)
                           if ty == 3 and set(t) <= spelled])
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == 4]
    if user:
        hf.add_tokens(user)
    return hf


def spm_merges(tokens: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """The BPE merges a SentencePiece vocabulary implies: every split of a piece into two pieces, ranked by
    the piece's score (best first), then by the lengths of the halves, as transformers derives them."""
    vocab = {t: i for i, t in enumerate(tokens)}
    ranked: list[tuple[str, str, float]] = []
    for piece, score in dict(zip(tokens, scores)).items():
        halves = [(piece[:k], piece[k:], score) for k in range(1, len(piece))
                  if piece[:k] in vocab and piece[k:] in vocab]
        ranked.extend(sorted(halves, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    ranked.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)  # stable: ties keep vocab order
    return [(a, b) for a, b, _ in ranked]


def _gguf_sentencepiece(meta: dict[str, Any], tokens: list[str], types: list[int],
                        named: list[str]) -> HFTokenizer:
    """SentencePiece BPE as llama.cpp's `llama` vocabulary describes it, built as transformers builds it
    (`LlamaTokenizer`): merges from the scores, byte fallback to `<0xNN>`, `▁` for spaces."""
    arch = meta.get("general.architecture")
    if arch in _SPM_OTHER_SPELLINGS:
        raise LMForgeError(f"unsupported GGUF tokenizer: SentencePiece vocabulary of architecture {arch!r}")
    if "tokenizer.ggml.merges" in meta:
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    else:
        scores = meta.get("tokenizer.ggml.scores")
        if scores is None or len(scores) != len(tokens):
            raise LMForgeError("GGUF SentencePiece tokenizer: tokenizer.ggml.scores is missing or does not match "
                               f"the {len(tokens)} tokens")
        merges = spm_merges(tokens, scores)
    vocab = {t: i for i, t in enumerate(tokens)}
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True))
    # add_space_prefix: "hi" is read as " hi" (only at the start of the text, as transformers does).
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="first" if prefix else "never",
                                                split=False)
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    hf.decoder = decoders.Sequence([*steps, decoders.Strip(" ", 1, 0)] if prefix else steps)
    # Unknown (2) and control (3) tokens, and the ones the file names (BOS, EOS, ...), are special;
    # user-defined ones (4) are matched whole in the text but kept when decoding.
    special = [t for t, ty in zip(tokens, types) if ty in (2, 3)]
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t in dict.fromkeys([*special, *named])])
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == 4]
    if user:
        hf.add_tokens(user)
    return hf


def _t5_sentinels(tokens: list[str], types: list[int]) -> tuple[list[str], list[int]]:
    """llama.cpp's converter writes T5's 100 sentinels as unused ``[PAD{id}]`` placeholders; they are
    named back, ``<extra_id_99>`` first, as special tokens (as transformers reads such files)."""
    if any(t.startswith("<extra_id_") for t in tokens):
        return tokens, types
    blanks = [i for i, t in enumerate(tokens) if re.fullmatch(r"\[PAD\d+\]", t)][:100]
    tokens, types = list(tokens), list(types)
    for n, i in enumerate(blanks):
        tokens[i], types[i] = f"<extra_id_{99 - n}>", 3
    return tokens, types


def _gguf_unigram(meta: dict[str, Any], tokens: list[str], types: list[int], named: list[str]) -> HFTokenizer:
    """SentencePiece Unigram as llama.cpp's `t5` vocabulary describes it, built as transformers builds T5's
    tokenizer: the precompiled charsmap as the normalizer, whitespace split, `▁` prepended to each word."""
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise LMForgeError("GGUF Unigram tokenizer: tokenizer.ggml.scores is missing or does not match "
                           f"the {len(tokens)} tokens")
    if not meta.get("tokenizer.ggml.remove_extra_whitespaces", True):
        raise LMForgeError("unsupported GGUF Unigram tokenizer: tokenizer.ggml.remove_extra_whitespaces = false")
    unk = meta.get("tokenizer.ggml.unknown_token_id", next((i for i, t in enumerate(types) if t == 2), None))
    if not isinstance(unk, int) or not 0 <= unk < len(tokens):
        raise LMForgeError("GGUF Unigram tokenizer: no unknown token (tokenizer.ggml.unknown_token_id)")
    hf = HFTokenizer(models.Unigram([(t, float(s)) for t, s in zip(tokens, scores)], unk_id=unk, byte_fallback=False))
    charsmap = meta.get("tokenizer.ggml.precompiled_charsmap")
    if charsmap:
        try:
            hf.normalizer = normalizers.Precompiled(bytes(charsmap))
        except Exception as e:  # tokenizers raises a bare Exception on a charsmap it cannot parse
            raise LMForgeError(f"unsupported GGUF tokenizer.ggml.precompiled_charsmap ({str(e).splitlines()[0]})"
                               ) from None
    scheme = "always" if meta.get("tokenizer.ggml.add_space_prefix", True) else "never"
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme=scheme)])
    hf.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme=scheme)
    special = [t for t, ty in zip(tokens, types) if ty in (2, 3)]
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys([*special, *named])])
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == 4]
    if user:
        hf.add_tokens(user)
    return hf


def _compile_template(template: str) -> Any:
    """Compile a chat template the way transformers does: sandboxed, with its helpers."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise LMForgeError(f"invalid chat template: {e.message} (line {e.lineno})") from None


def read_chat_template(path: Path, tokenizer_config: dict[str, Any]) -> str | None:
    """An HF directory's chat template: chat_template.jinja, else tokenizer_config.json's entry."""
    if (path / "chat_template.jinja").exists():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: take the default
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


class Tokenizer:
    """An HF `tokenizers` object plus the special tokens and chat template a model ships with."""

    def __init__(
        self,
        hf: HFTokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        chat_template: str | None = None,
        extra_stop_ids: Sequence[int] = (),
    ) -> None:
        self.hf = hf
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.chat_template = chat_template
        self._template: Any = None
        stops = {self.token_to_id(t) for t in (eos_token, *END_OF_TURN_TOKENS) if t}
        stops.update(extra_stop_ids)
        stops.discard(None)
        self.stop_token_ids: list[int] = sorted(stops)  # type: ignore[arg-type]

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """An HF directory: tokenizer.json, tokenizer_config.json, chat_template.jinja, generation_config.json."""
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.exists():
            raise LMForgeError(f"{path}: no tokenizer.json")
        try:
            hf = HFTokenizer.from_file(str(tj))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise LMForgeError(f"{tj}: cannot parse tokenizer ({str(e).splitlines()[0]})") from None
        # Some files (BERT exports) carry fixed padding/truncation; transformers ignores them unless asked.
        hf.no_padding()
        hf.no_truncation()
        cfg: dict[str, Any] = {}
        if (path / "tokenizer_config.json").exists():
            cfg = read_json(path / "tokenizer_config.json")
        template = read_chat_template(path, cfg)
        extra: list[int] = []
        if (path / "generation_config.json").exists():
            eos = read_json(path / "generation_config.json").get("eos_token_id")
            extra = [eos] if isinstance(eos, int) else list(eos or [])

        # Special tokens: tokenizer_config.json, else special_tokens_map.json, else the tokenizer class's
        # defaults (T5 directories often ship tokenizer.json alone).
        smap = read_json(path / "special_tokens_map.json") if (path / "special_tokens_map.json").exists() else {}
        model_type = read_json(path / "config.json").get("model_type") if (path / "config.json").exists() else None
        t5 = model_type == "t5" or str(cfg.get("tokenizer_class", "")).startswith("T5")
        defaults = _T5_SPECIAL_TOKENS if t5 else {}

        def tok(name: str) -> str | None:
            v = cfg[name] if name in cfg else smap.get(name)
            if v is None and name not in cfg and hf.token_to_id(defaults.get(name, "")) is not None:
                v = defaults[name]
            return v.get("content") if isinstance(v, dict) else v

        return cls(hf, bos_token=tok("bos_token"), eos_token=tok("eos_token"), pad_token=tok("pad_token"),
                   unk_token=tok("unk_token"), chat_template=template, extra_stop_ids=extra)

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> Tokenizer:
        """Rebuild the tokenizer from `tokenizer.ggml.*` metadata: byte-level BPE (`gpt2`), SentencePiece
        BPE (`llama`: tokens, scores and types, byte fallback, the `▁` space) or Unigram (`t5`)."""
        kind = meta.get("tokenizer.ggml.model")
        if kind not in GGUF_TOKENIZER_MODELS:
            raise LMForgeError(f"unsupported GGUF tokenizer model {kind!r} "
                               f"(supported: {', '.join(f'{k} ({v})' for k, v in GGUF_TOKENIZER_MODELS.items())})")
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        if kind == "t5":
            tokens, types = _t5_sentinels(tokens, types)

        def tok(key: str) -> str | None:
            i = meta.get(f"tokenizer.ggml.{key}")
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        named = {k: tok(f"{k}_token_id") for k in ("bos", "eos", "padding", "unknown")}
        if kind == "gpt2":
            hf = _gguf_byte_level(meta, tokens, types)
        elif kind == "t5":
            hf = _gguf_unigram(meta, tokens, types, [t for t in named.values() if t is not None])
        else:
            hf = _gguf_sentencepiece(meta, tokens, types, [t for t in named.values() if t is not None])
        # llama.cpp (and transformers) add BOS to a SentencePiece-BPE vocabulary and EOS to a Unigram (T5) one
        # unless the file says otherwise.
        default = {"llama": "bos", "t5": "eos"}.get(kind)
        add = {k: tokens[i] for k in ("bos", "eos")
               if meta.get(f"tokenizer.ggml.add_{k}_token", k == default)
               and (i := meta.get(f"tokenizer.ggml.{k}_token_id")) is not None and 0 <= i < len(tokens)}
        if add:
            def template(seq: str, type_id: int) -> list[str]:
                return [f"{t}:{type_id}" for t in [add.get("bos"), f"${seq}", add.get("eos")] if t]

            hf.post_processor = processors.TemplateProcessing(
                single=template("A", 0), pair=template("A", 0) + template("B", 1),
                special_tokens=[(t, meta[f"tokenizer.ggml.{k}_token_id"]) for k, t in add.items()])
        elif kind == "gpt2":
            hf.post_processor = processors.ByteLevel(trim_offsets=False)
        extra = [meta["tokenizer.ggml.eot_token_id"]] if "tokenizer.ggml.eot_token_id" in meta else []
        return cls(hf, bos_token=named["bos"], eos_token=named["eos"], pad_token=named["padding"],
                   unk_token=named["unknown"], chat_template=meta.get("tokenizer.chat_template"),
                   extra_stop_ids=extra)

    # -- encode / decode ---------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True,
                     max_length: int | None = None) -> list[list[int]]:
        """Ids of several texts; ``max_length`` truncates each, keeping the special tokens (e.g. [SEP])."""
        if max_length is None:
            return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=add_special_tokens)]
        room = max_length - (self.hf.num_special_tokens_to_add(False) if add_special_tokens else 0)
        if room < 1:
            raise LMForgeError(f"max_length {max_length} leaves no room for text")
        out = []
        for enc in self.hf.encode_batch(texts, add_special_tokens=False):
            enc.truncate(room)
            out.append(self.hf.post_process(enc, None, add_special_tokens).ids)
        return out

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    @property
    def mask_token(self) -> str | None:
        """The masked-LM mask token, if the vocabulary has one (ours, BERT's or RoBERTa's spelling)."""
        return next((t for t in ("<|mask|>", "[MASK]", "<mask>") if self.hf.token_to_id(t) is not None), None)

    def id_to_token(self, i: int) -> str | None:
        return self.hf.id_to_token(i)

    # -- chat ----------------------------------------------------------------------------------------
    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        continue_final_message: bool = False,
        **kwargs: Any,
    ) -> str:
        """Render a conversation exactly as transformers' ``apply_chat_template(tokenize=False)`` does.

        ``continue_final_message``: the text ends with the last message's content, without its end of turn,
        so that generation continues that message (prefill); ``add_generation_prompt`` must then be false."""
        import jinja2

        if self._template is None:
            self._template = _compile_template(self.chat_template or CHATML_TEMPLATE)
        if continue_final_message:
            if add_generation_prompt:
                raise LMForgeError("continue_final_message and add_generation_prompt cannot both be true")
            if not messages or not isinstance(messages[-1].get("content"), str):
                raise LMForgeError("continue_final_message needs a final message with text content")
            # A marker after the final text shows where the template's end of turn begins, whatever the
            # template writes around it (an empty message included).
            messages = [*messages[:-1], {**messages[-1], "content": messages[-1]["content"] + _CONTINUE_MARK}]
        try:
            text = self._template.render(
                messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                unk_token=self.unk_token or "", pad_token=self.pad_token or "", **kwargs,
            )
        except jinja2.exceptions.TemplateError as e:
            raise LMForgeError(f"chat template error: {e}") from None
        if continue_final_message:
            cut = text.rfind(_CONTINUE_MARK)
            if cut == -1:
                raise LMForgeError("continue_final_message: the chat template does not write the final message's "
                                   "text as given, so it cannot be continued")
            text = text[:cut]
        return text

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any) -> list[int]:
        # The template writes any BOS itself, so no special tokens are added on top.
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs), add_special_tokens=False)

    def decoder(self, prompt_ids: Sequence[int] = ()) -> IncrementalDecoder:
        return IncrementalDecoder(self, prompt_ids)


class IncrementalDecoder:
    """Turns a growing token list into text deltas without ever emitting half a UTF-8 character.

    It re-decodes a short window of recent tokens and only releases text once it no longer ends in
    U+FFFD (an incomplete byte sequence); a few prompt tokens seed the window so that tokenizers which
    strip a leading space at the start of a decode still produce the right spacing.
    """

    def __init__(self, tok: Tokenizer, prompt_ids: Sequence[int] = ()) -> None:
        self.tok = tok
        self.ids: list[int] = list(prompt_ids[-4:])
        self.prefix = 0
        self.read = len(self.ids)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.tok.decode(self.ids[self.prefix:self.read])
        after = self.tok.decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is left at the end (an incomplete character decodes as U+FFFD)."""
        before = self.tok.decode(self.ids[self.prefix:self.read])
        after = self.tok.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):]
