"""Encoder-decoder training: supervised source -> target pairs (translation, summarization) and T5's
span-corruption denoising, through the shared training loop.

Both objectives feed the model the same batch: padded source ids and their mask, the target shifted
right behind the decoder start token (teacher forcing), and the target ids as labels (-100 on
padding), with optional label smoothing. `Seq2SeqTrainer` is a fresh model's run (`lmforge train
--objective seq2seq | span-corruption`); `finetune seq2seq` reuses the batches and the loss.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LMForgeError
from ..model import ModelConfig
from ..model.seq2seq import EncoderDecoder
from ..tokenizer import Tokenizer
from .batching import ExampleStream, sorted_batches
from .corpus import expand_inputs, open_text
from .distributed import mean_over_ranks, parallelize, setup_distributed
from .loop import autocast, make_optimizer, use_bf16
from .pretrain import TrainConfig, Trainer

Pair = tuple[str, str]
IdPair = tuple[list[int], list[int]]


# -- T5's task prefixes ----------------------------------------------------------------------------------------
LANGUAGES = {"en": "English", "de": "German", "fr": "French", "ro": "Romanian", "es": "Spanish", "it": "Italian",
             "pt": "Portuguese", "nl": "Dutch", "ru": "Russian", "zh": "Chinese", "ja": "Japanese", "cs": "Czech"}
SUMMARIZE_PREFIX = "summarize: "


def translation_prefix(source_lang: str, target_lang: str) -> str:
    """T5's prefix for a translation, from language codes: "translate English to German: "."""
    for code in (source_lang, target_lang):
        if code not in LANGUAGES:
            raise LMForgeError(f"unknown language code {code!r} (known: {', '.join(LANGUAGES)})")
    return f"translate {LANGUAGES[source_lang]} to {LANGUAGES[target_lang]}: "


def declared_task(prefix: str) -> dict[str, Any]:
    """The HF `task_specific_params` entry a training prefix declares (translation_en_to_de, summarization),
    or nothing for another prefix."""
    names = {v: k for k, v in LANGUAGES.items()}
    words = prefix.strip().removesuffix(":").split(" ")
    if len(words) == 4 and words[0] == "translate" and words[2] == "to" and words[1] in names and words[3] in names:
        return {f"translation_{names[words[1]]}_to_{names[words[3]]}": {"prefix": prefix}}
    return {"summarization": {"prefix": prefix}} if prefix == SUMMARIZE_PREFIX else {}


def declare_task(cfg: ModelConfig, prefix: str) -> None:
    """Record in the model's config (config.json's task_specific_params) the task its training prefix names."""
    task = declared_task(prefix)
    if task:
        cfg.extra["task_specific_params"] = {**cfg.extra.get("task_specific_params", {}), **task}


# -- reading pairs ------------------------------------------------------------------------------------------
def read_pairs(data: str | Path, target_data: str | Path | None = None, source_field: str = "source",
               target_field: str = "target") -> list[Pair]:
    """Source/target pairs from two line-aligned text files (`data` the sources, `target_data` the
    targets), a TSV file (the first two columns), or JSON Lines with `source_field` and `target_field`
    (.gz and .bz2 read as they are)."""
    (path,) = expand_inputs([data])
    if target_data is not None:
        (tpath,) = expand_inputs([target_data])
        src, tgt = _lines(path), _lines(tpath)
        if len(src) != len(tgt):
            raise LMForgeError(f"{path} has {len(src)} lines but {tpath} has {len(tgt)}: line-aligned files "
                               "must have one target line per source line")
        pairs = list(zip(src, tgt))
    elif path.name.lower().removesuffix(".gz").removesuffix(".bz2").endswith((".jsonl", ".json")):
        pairs = _jsonl_pairs(path, source_field, target_field)
    else:
        pairs = []
        for n, line in enumerate(_lines(path), 1):
            if not line.strip():
                continue
            cols = line.split("\t")
            if len(cols) < 2:
                raise LMForgeError(f"{path}:{n}: expected a source and a target separated by a tab")
            pairs.append((cols[0], cols[1]))
    pairs = [(s.strip(), t.strip()) for s, t in pairs if s.strip() and t.strip()]
    if not pairs:
        raise LMForgeError(f"{path}: no source/target pairs")
    return pairs


def _lines(path: Path) -> list[str]:
    with open_text(path) as f:
        return [line.rstrip("\r\n") for line in f]


def _jsonl_pairs(path: Path, source_field: str, target_field: str) -> list[Pair]:
    with open_text(path) as f:
        text = f.read()
    if path.name.lower().removesuffix(".gz").removesuffix(".bz2").endswith(".json"):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise LMForgeError(f"{path}: not valid JSON ({e})") from None
        numbered = list(enumerate(rows if isinstance(rows, list) else [rows], 1))
    else:
        numbered = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    numbered.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise LMForgeError(f"{path}:{n}: not valid JSON ({e})") from None
    pairs = []
    for n, row in numbered:
        for field in (source_field, target_field):
            if not isinstance(row, dict) or not isinstance(row.get(field), str):
                raise LMForgeError(f"{path}:{n}: no text field {field!r} (set --source-field/--target-field)")
        pairs.append((row[source_field], row[target_field]))
    return pairs


def encode_pairs(tok: Tokenizer, pairs: Sequence[Pair], prefix: str = "", max_source: int = 0,
                 max_target: int = 0) -> list[IdPair]:
    """Token ids of each pair (each ending with the tokenizer's end token), the source behind `prefix`;
    longer sides are cut to max_source / max_target tokens, keeping the end token."""
    src = tok.encode_batch([prefix + s for s, _ in pairs])
    tgt = tok.encode_batch([t for _, t in pairs])
    return [(cut_keeping_end(s, max_source), cut_keeping_end(t, max_target)) for s, t in zip(src, tgt)]


def pair_length(pair: IdPair) -> int:
    return len(pair[0]) + len(pair[1])


def cut_keeping_end(ids: list[int], n: int) -> list[int]:
    """The first n ids, the last of them the sequence's own end token (no cut when n is 0 or enough)."""
    return ids if not n or len(ids) <= n else ids[: n - 1] + ids[-1:]


# -- span corruption ----------------------------------------------------------------------------------------
def sentinel_ids(tok: Tokenizer) -> list[int]:
    """The ids of <extra_id_0>, <extra_id_1>, ... as the tokenizer has them."""
    out = []
    while (i := tok.token_to_id(f"<extra_id_{len(out)}>")) is not None:
        out.append(i)
    return out


def _segments(total: int, parts: int, gen: torch.Generator) -> list[int]:
    """`total` items cut into `parts` non-empty runs at random points."""
    cuts = sorted(torch.randperm(total - 1, generator=gen)[: parts - 1].add(1).tolist())
    return [b - a for a, b in zip([0, *cuts], [*cuts, total])]


def span_corrupt(ids: Sequence[int], density: float, mean_span: float, sentinels: Sequence[int], eos: int,
                 gen: torch.Generator) -> IdPair:
    """T5's denoising example from a token window: about `density` of the tokens, in spans of mean length
    `mean_span`, are dropped from the input and each span replaced by one sentinel; the target lists
    each dropped span behind its sentinel (the kept spans become sentinels there). Both end with `eos`."""
    n = len(ids)
    noise = min(max(1, round(n * density)), n - 1)
    spans = max(1, min(round(noise / mean_span), n - noise, len(sentinels) // 2))
    kept, dropped = _segments(n - noise, spans, gen), _segments(noise, spans, gen)
    src: list[int] = []
    tgt: list[int] = []
    pos = 0
    for i, (k, d) in enumerate(zip(kept, dropped)):  # kept then dropped, as T5 interleaves them
        src += [*ids[pos:pos + k], sentinels[i]]
        tgt += [sentinels[i], *ids[pos + k:pos + k + d]]
        pos += k + d
    return src + [eos], tgt + [sentinels[spans], eos]


# -- batches ------------------------------------------------------------------------------------------------
def collate(rows: Sequence[IdPair], pad: int, start: int, device: torch.device
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(source ids, source mask, decoder input, labels), padded: the decoder input is the target behind
    the start token, the labels the target with -100 on padding."""
    s_len, t_len = max(len(s) for s, _ in rows), max(len(t) for _, t in rows)
    src = torch.full((len(rows), s_len), pad, dtype=torch.long)
    dec = torch.full((len(rows), t_len), pad, dtype=torch.long)
    labels = torch.full((len(rows), t_len), -100, dtype=torch.long)
    for r, (s, t) in enumerate(rows):
        src[r, : len(s)] = torch.tensor(s)
        dec[r, : len(t)] = torch.tensor([start, *t[:-1]])
        labels[r, : len(t)] = torch.tensor(t)
    mask = (torch.arange(s_len)[None] < torch.tensor([len(s) for s, _ in rows])[:, None]).long()
    return src.to(device), mask.to(device), dec.to(device), labels.to(device)


class SpanBatches:
    """Random token windows of a prepared corpus, span-corrupted into (source, target) pairs."""

    def __init__(self, tokens: np.ndarray, cfg: TrainConfig, sentinels: list[int], eos: int, seed: int,
                 rank: int = 0, world: int = 1) -> None:
        if len(tokens) <= cfg.block_size:
            raise LMForgeError(f"the split has {len(tokens)} tokens, fewer than block_size = {cfg.block_size}")
        self.tokens, self.cfg, self.sentinels, self.eos = tokens, cfg, sentinels, eos
        self.rank, self.world = rank, world
        self.gen = torch.Generator().manual_seed(seed)

    def next_batch(self) -> list[IdPair]:
        """This rank's rows of the next global batch (every rank draws all of it, so the draws agree)."""
        b, t = self.cfg.batch_size, self.cfg.block_size
        starts = torch.randint(len(self.tokens) - t, (b * self.world,), generator=self.gen).tolist()
        rows = [span_corrupt(self.tokens[s:s + t].tolist(), self.cfg.noise_density, self.cfg.mean_noise_span,
                             self.sentinels, self.eos, self.gen) for s in starts]
        return rows[self.rank * b:(self.rank + 1) * b]

    def state_dict(self) -> dict[str, Any]:
        return {"data_rng": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["data_rng"])


# -- the loss -----------------------------------------------------------------------------------------------
@dataclass
class Seq2SeqLoss:
    """Teacher-forced cross-entropy of the target tokens (with label smoothing in training), on batches of
    id pairs; evaluated as the plain per-token loss and perplexity over fixed validation batches."""

    pad: int
    start: int  # the decoder start token
    device: torch.device
    bf16: bool
    val_batches: list[list[IdPair]]
    label_smoothing: float = 0.0

    def token_loss(self, model: nn.Module, rows: list[IdPair], smoothing: float, reduction: str = "mean"
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss and the labels of a batch of pairs."""
        src, mask, dec, labels = collate(rows, self.pad, self.start, self.device)
        with autocast(self.device, self.bf16):
            logits = model(src, dec, mask)
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                               label_smoothing=smoothing, reduction=reduction), labels

    def loss(self, model: nn.Module, batch: list[IdPair]) -> tuple[torch.Tensor, dict[str, float]]:
        return self.token_loss(model, batch, self.label_smoothing)[0], {}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        if not self.val_batches:
            return {}
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for batch in self.val_batches:
            loss, labels = self.token_loss(model, batch, 0.0, reduction="sum")
            total[0] += loss.double()
            total[1] += (labels != -100).sum()
        total = mean_over_ranks(total)
        loss = float(total[0] / total[1])
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}


# -- a fresh model's run ------------------------------------------------------------------------------------
class Seq2SeqTrainer(Trainer):
    """A fresh encoder-decoder trained on pairs (objective seq2seq) or span-corrupted text (objective
    span-corruption); checkpoints, resume and metrics as pretraining's."""

    def __init__(self, cfg: TrainConfig, tokenizer: Tokenizer, resume: bool = False,
                 log: Callable[[str], None] = print) -> None:
        cfg.validate()
        self.cfg, self.optim, self.tokenizer = cfg, cfg.optim(), tokenizer
        self.dist, self.device = setup_distributed(cfg.device)
        self.log = log if self.dist.main else (lambda s: None)
        self.progress = self.dist.main
        model = {"family": "t5", **cfg.model}
        self.model_cfg = ModelConfig.from_dict({"vocab_size": tokenizer.vocab_size,
                                                "context_length": cfg.block_size, **model})
        if self.model_cfg.decoder_layers < 1:
            raise LMForgeError(f"objective {cfg.objective} trains an encoder-decoder: set model.family=t5 and "
                               "model.decoder_layers (see the t5-multi30k preset)")
        declare_task(self.model_cfg, cfg.source_prefix)
        self.bf16 = use_bf16(cfg.precision, self.device, self.model_cfg.dim)
        self.out = Path(cfg.out)
        eos, pad = self._special("eos_token"), self._special("pad_token")
        torch.manual_seed(cfg.seed)
        self.model: Any = EncoderDecoder(self.model_cfg).to(self.device)
        self.model.init_weights()
        self.module = self.model
        self.train_model = parallelize(self.model, self.dist, self.device, False)
        self.opt = make_optimizer(self.model, self.optim, self.device)
        self.tokens_in_step = 0
        rank, world = self.dist.rank, self.dist.world
        val_batches: list[list[IdPair]] = []
        if cfg.objective == "seq2seq":
            pairs = encode_pairs(tokenizer, read_pairs(cfg.data, cfg.target_data, cfg.source_field,
                                                       cfg.target_field), cfg.source_prefix, cfg.block_size,
                                 cfg.max_target_length or cfg.block_size)
            n_val = int(len(pairs) * cfg.val_fraction)  # the first pairs: the same split on every run
            train, val = pairs[n_val:], pairs[:n_val]
            self.meta = {"pairs": len(train), "val_pairs": len(val)}
            self.data: Any = ExampleStream(train, [len(s) + len(t) for s, t in train], cfg.batch_size, cfg.seed,
                                           cfg.grad_accum, rank, world)
            val_batches = sorted_batches(val[rank::world], pair_length, cfg.batch_size)
        else:
            from .data import load_split

            sentinels = sentinel_ids(tokenizer)
            if len(sentinels) < 2:
                raise LMForgeError("objective span-corruption needs <extra_id_N> sentinel tokens in the tokenizer "
                                   "(`lmforge tokenizer train --model unigram --sentinels 100`)")
            self.meta = json.loads((Path(cfg.data) / "metadata.json").read_text(encoding="utf-8"))
            self.data = SpanBatches(load_split(cfg.data, "train"), cfg, sentinels, eos, cfg.seed, rank, world)
            val_tokens = load_split(cfg.data, "val")
            if len(val_tokens) > cfg.block_size:  # fixed windows and spans: the same batches every time
                vb = SpanBatches(val_tokens, cfg, sentinels, eos, 0, rank, world)
                val_batches = [vb.next_batch() for _ in range(cfg.eval_iters)]
        self.objective = Seq2SeqLoss(pad, pad, self.device, self.bf16, val_batches, cfg.label_smoothing)
        self.start(resume)

    def _special(self, name: str) -> int:
        token = getattr(self.tokenizer, name, None)
        i = self.tokenizer.token_to_id(token) if token else None
        if i is None:
            raise LMForgeError(f"the tokenizer has no {name.removesuffix('_token')} token, which an encoder-decoder "
                               "needs (train one with `lmforge tokenizer train --model unigram`)")
        return i

    def batch_loss(self, batch: list[IdPair]) -> tuple[torch.Tensor, dict[str, float]]:
        self.tokens_in_step += sum(map(pair_length, batch))
        return super().batch_loss(batch)

    def fit(self, until: int | None = None) -> list[float]:
        return super(Trainer, self).fit(until)  # no MFU: pairs are of varying length

    def step_metrics(self, seconds: float) -> dict[str, float]:
        tokens, self.tokens_in_step = self.tokens_in_step * self.dist.world, 0
        return {"tokens_per_s": tokens / max(seconds, 1e-9)}

    def postfix(self, record: dict[str, Any]) -> dict[str, str]:
        return {"loss": f"{record['loss']:.3f}", "tok_s": f"{record['tokens_per_s']:.0f}",
                **{k: f"{v:.3f}" for k, v in self.last_eval.items()}}

    def eval_samples(self) -> list[Any]:
        return []

    def run_state(self) -> dict[str, Any]:
        return {"model_config": dataclasses.asdict(self.model_cfg)}
