"""Train tokenizers with HF `tokenizers` from text/JSONL corpora: byte-level BPE, SentencePiece-style
Unigram (T5's layout) or character-level.

The output directory loads with `transformers.AutoTokenizer`, `PreTrainedTokenizerFast` and
`lmforge.tokenizer.Tokenizer.from_dir`, and it is written atomically: built next to the target and
swapped in only once complete.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from ..errors import LMForgeError
from ..fsutil import atomic_dir
from ..tokenizer import CHATML_TEMPLATE, GPT4_SPLIT, SPACE, Tokenizer
from .corpus import iter_texts

# The document boundary first; ChatML and tool-call markers for chat tuning; a mask for masked-LM pretraining.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>", "<|mask|>"]
MASK_TOKEN = "<|mask|>"
CHAR_UNK = "<unk>"  # char-level only: characters never seen in training
# Unigram tokenizers follow T5: padding (also the decoder's start token) 0, end of sequence 1, unknown 2.
UNIGRAM_SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]
MODEL_MAX_LENGTH = 2048
_MAX_HELD_OUT_CHARS = 8 << 20  # held-out text kept in memory for evaluation


def _split_held_out(texts: Iterator[str], fraction: float, sink: list[str] | None) -> Iterator[str]:
    """Yield the training documents; every k-th document (k = 1/fraction) goes to `sink` instead."""
    if not 0 <= fraction <= 0.5:
        raise LMForgeError(f"held-out fraction must be between 0 and 0.5, got {fraction}")
    k = round(1 / fraction) if fraction else 0
    kept = 0
    for i, text in enumerate(texts):
        if k and i % k == k - 1:
            if sink is not None and kept < _MAX_HELD_OUT_CHARS:
                sink.append(text)
                kept += len(text)
        else:
            yield text


# -- writing -------------------------------------------------------------------------------------------
def _write_atomic(hf: HFTokenizer, out_dir: str | Path, unk_token: str | None = None,
                  named: dict[str, Any] | None = None, chat_template: str | None = CHATML_TEMPLATE) -> Path:
    """Write tokenizer.json with its config; `named` overrides the special-token roles (bos_token, ...)."""
    eos = SPECIAL_TOKENS[0]
    if named is None:
        named = {"bos_token": eos, "eos_token": eos, "mask_token": MASK_TOKEN,
                 **({"unk_token": unk_token} if unk_token else {})}
    with atomic_dir(out_dir, marker="tokenizer.json") as tmp:
        hf.save(str(tmp / "tokenizer.json"))
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": None, **named,
               "model_max_length": MODEL_MAX_LENGTH, "clean_up_tokenization_spaces": False,
               **({"chat_template": chat_template} if chat_template else {})}
        (tmp / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")
        (tmp / "special_tokens_map.json").write_text(json.dumps(named, indent=2, ensure_ascii=False) + "\n",
                                                     encoding="utf-8")
    return Path(out_dir).expanduser()


def _special(extra: Iterable[str] = (), base: Iterable[str] = SPECIAL_TOKENS) -> list[AddedToken]:
    return [AddedToken(t, special=True, normalized=False) for t in dict.fromkeys([*base, *extra])]


# -- training ------------------------------------------------------------------------------------------
def train_bpe(inputs: Iterable[str | Path], vocab_size: int, out_dir: str | Path, text_field: str = "text",
              min_frequency: int = 2, progress: bool = True, held_out: float = 0.0,
              held_out_texts: list[str] | None = None, special_tokens: Iterable[str] = ()) -> Path:
    """Train a GPT-4-style byte-level BPE tokenizer; returns the output directory.

    With `held_out` > 0, every (1/held_out)-th document is left out of training (and appended to
    `held_out_texts` when given, for evaluation). `special_tokens` are added after the built-in ones.
    """
    special = _special(special_tokens)
    floor = 256 + len(special)
    if vocab_size <= floor:
        raise LMForgeError(f"vocab size {vocab_size} is too small: byte-level BPE needs more than {floor} "
                           f"(256 bytes + {len(special)} special tokens)")
    texts = _split_held_out(iter_texts(inputs, text_field), held_out, held_out_texts)
    hf = HFTokenizer(models.BPE(fuse_unk=False, byte_fallback=False))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GPT4_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=progress)
    hf.train_from_iterator(texts, trainer)
    return _write_atomic(hf, out_dir)


def train_char(inputs: Iterable[str | Path], out_dir: str | Path, text_field: str = "text",
               held_out: float = 0.0, held_out_texts: list[str] | None = None,
               special_tokens: Iterable[str] = ()) -> Path:
    """A character-level tokenizer: special tokens, `<unk>`, then one token per distinct character seen."""
    chars: set[str] = set()
    for text in _split_held_out(iter_texts(inputs, text_field), held_out, held_out_texts):
        chars.update(text)
    special = _special([*special_tokens, CHAR_UNK])
    vocab = {t: i for i, t in enumerate(dict.fromkeys([*(t.content for t in special), *sorted(chars)]))}
    hf = HFTokenizer(models.WordLevel(vocab=vocab, unk_token=CHAR_UNK))
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    hf.decoder = decoders.Fuse()
    hf.add_special_tokens(special)
    return _write_atomic(hf, out_dir, unk_token=CHAR_UNK)


def sentinel_tokens(n: int) -> list[str]:
    """T5's span-corruption sentinels `<extra_id_0>` .. `<extra_id_{n-1}>`."""
    return [f"<extra_id_{i}>" for i in range(n)]


def train_unigram(inputs: Iterable[str | Path], vocab_size: int, out_dir: str | Path, text_field: str = "text",
                  sentinels: int = 0, special_tokens: Iterable[str] = (), progress: bool = True,
                  held_out: float = 0.0, held_out_texts: list[str] | None = None) -> Path:
    """Train a SentencePiece-style Unigram tokenizer laid out as T5's; returns the output directory.

    `<pad>` 0, `</s>` 1 (appended to every encoded text), `<unk>` 2 (characters never seen in training),
    then `special_tokens`, the learned pieces (NFKC-normalised text, spaces as `▁`, a `▁` prepended) and
    last the `sentinels` `<extra_id_N>`, numbered down from the end as T5's are. `vocab_size` counts all.
    """
    if sentinels < 0:
        raise LMForgeError(f"sentinels must be 0 or more, got {sentinels}")
    special = _special(special_tokens, base=UNIGRAM_SPECIAL_TOKENS)
    floor = len(special) + sentinels
    if vocab_size <= floor:
        raise LMForgeError(f"vocab size {vocab_size} is too small: Unigram needs more than {floor} "
                           f"({len(special)} special tokens + {sentinels} sentinels)")
    texts = _split_held_out(iter_texts(inputs, text_field), held_out, held_out_texts)
    hf = HFTokenizer(models.Unigram())
    hf.normalizer = normalizers.NFKC()
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always", split=True)
    hf.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="always", split=True)
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size - sentinels, special_tokens=special,
                                      unk_token="<unk>", show_progress=progress)
    hf.train_from_iterator(texts, trainer)
    hf.add_special_tokens(_special(reversed(sentinel_tokens(sentinels)), base=()))
    eos = UNIGRAM_SPECIAL_TOKENS[1]
    hf.post_processor = processors.TemplateProcessing(
        single=["$A:0", f"{eos}:0"], pair=["$A:0", f"{eos}:0", "$B:1", f"{eos}:1"],
        special_tokens=[(eos, hf.token_to_id(eos))])
    named: dict[str, Any] = {"eos_token": eos, "unk_token": "<unk>", "pad_token": "<pad>"}
    extra = [t.content for t in special if t.content not in UNIGRAM_SPECIAL_TOKENS] + sentinel_tokens(sentinels)
    if extra:
        named["additional_special_tokens"] = extra
    return _write_atomic(hf, out_dir, named=named, chat_template=None)


def bytes_per_token(tok: Tokenizer, texts: list[str]) -> float:
    """UTF-8 bytes per token over `texts` (no special tokens added): higher means better compression."""
    n_tokens = sum(len(ids) for ids in tok.encode_batch(texts, add_special_tokens=False))
    if not n_tokens:
        raise LMForgeError("no text to measure bytes per token on")
    return sum(len(t.encode("utf-8")) for t in texts) / n_tokens
