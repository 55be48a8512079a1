"""Text embeddings: pooling of hidden states (as sentence-transformers configures it) and batching.

Encoders use their sentence-transformers pooling files when present (modules.json, 1_Pooling/config.json,
a Normalize module, sentence_bert_config.json's max_seq_length); other models get mean pooling.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import LMForgeError
from ..fsutil import read_json
from ..model import Transformer
from ..tokenizer import Tokenizer

POOLING_MODES = ("mean", "cls", "max", "last", "mean_sqrt_len", "pooler")
# sentence-transformers' 1_Pooling/config.json flags -> our modes
_ST_FLAGS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
             "pooling_mode_lasttoken": "last", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len"}


@dataclass
class Pooling:
    mode: str = "mean"
    normalize: bool = False
    max_length: int | None = None  # tokens per text (longer texts are truncated); None: the context length

    def __post_init__(self) -> None:
        if self.mode not in POOLING_MODES:
            raise LMForgeError(f"unknown pooling {self.mode!r} (supported: {', '.join(POOLING_MODES)})")


def read_pooling(path: str | Path) -> Pooling:
    """A model's pooling: its sentence-transformers config if it has one, else mean pooling."""
    path = Path(path)
    modules_file = path / "modules.json" if path.is_dir() else None
    if modules_file is None or not modules_file.exists():
        return Pooling("mean", False, None)
    modules = read_json(modules_file)
    mode, normalize = "mean", False
    for m in modules:
        kind = str(m.get("type", "")).rsplit(".", 1)[-1]
        if kind == "Pooling":
            pc = read_json(path / m.get("path", "") / "config.json")
            if isinstance(pc.get("pooling_mode"), str):  # newer sentence-transformers write one name
                chosen = [{"mean_tokens": "mean", "cls_token": "cls", "max_tokens": "max", "lasttoken": "last"}
                          .get(pc["pooling_mode"], pc["pooling_mode"])]
            else:
                chosen = [ours for flag, ours in _ST_FLAGS.items() if pc.get(flag)]
            if len(chosen) != 1:
                raise LMForgeError(f"{path}: pooling config must select exactly one mode, got {chosen or 'none'}")
            mode = chosen[0]
        elif kind == "Normalize":
            normalize = True
        elif kind not in ("Transformer", ""):
            raise LMForgeError(f"{path}: unsupported sentence-transformers module {m.get('type')!r}")
    max_length = None
    if (path / "sentence_bert_config.json").exists():
        max_length = read_json(path / "sentence_bert_config.json").get("max_seq_length")
    return Pooling(mode, normalize, max_length)


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str, model: Transformer | None = None) -> torch.Tensor:
    """hidden [b, T, d], mask [b, T] (1 = real token, rows right-padded) -> [b, d]."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    if mode in ("mean", "mean_sqrt_len"):
        total, n = (hidden * m).sum(1), m.sum(1).clamp(min=1e-9)
        return total / (n if mode == "mean" else n.sqrt())
    if mode == "max":
        return hidden.masked_fill(m == 0, -1e9).max(1).values
    if mode == "cls":
        return hidden[:, 0]
    if mode == "last":
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), mask.sum(1).long() - 1]
    if mode == "pooler":
        if model is None:
            raise LMForgeError("pooler pooling needs the model")
        return model.pooled(hidden)
    raise LMForgeError(f"unknown pooling {mode!r}")


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token rows: ids [b, T] and the attention mask [b, T]."""
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), t), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids.to(device), mask.to(device)


def encode_texts(tok: Tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids for embedding or classification, truncated to max_length; empty results are refused."""
    rows = tok.encode_batch(list(texts), max_length=max_length)
    for i, r in enumerate(rows):
        if not r:
            raise LMForgeError(f"text {i + 1} is empty (no tokens to embed)")
    return rows


def pad_id(tok: Tokenizer) -> int:
    pid = tok.token_to_id(tok.pad_token) if tok.pad_token else None
    return pid if pid is not None else 0  # padded positions are masked out, so any id does


def embed(model: Transformer, tok: Tokenizer, texts: Sequence[str], pooling: Pooling, batch_size: int = 32,
          progress: bool = False) -> np.ndarray:
    """Embed texts -> float32 array [n, dim]. Texts are batched by length so little padding is computed."""
    if isinstance(texts, str):
        texts = [texts]
    if not texts:
        raise LMForgeError("no texts to embed")
    max_len = min(pooling.max_length or model.cfg.context_length, model.cfg.context_length)
    return embed_ids(model, encode_texts(tok, texts, max_len), pad_id(tok), pooling, batch_size, progress)


def embed_ids(model: Transformer, rows: Sequence[Sequence[int]], pad: int, pooling: Pooling, batch_size: int = 32,
              progress: bool = False) -> np.ndarray:
    """Embed token rows (already within the context) -> float32 array [n, dim]; the server's path too."""
    from tqdm import tqdm

    if batch_size < 1:
        raise LMForgeError(f"batch size must be positive, got {batch_size}")
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    dev = next(model.parameters()).device
    out = np.zeros((len(rows), model.cfg.dim), dtype=np.float32)
    with torch.inference_mode(), tqdm(total=len(rows), desc="embedding", unit=" texts", disable=not progress,
                                      leave=False) as bar:
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            ids, mask = pad_batch([rows[i] for i in idx], pad, dev)
            vec = pool(model(ids, attn_mask=mask, return_hidden=True), mask, pooling.mode, model).float()
            if pooling.normalize:
                vec = torch.nn.functional.normalize(vec, dim=-1)
            out[idx] = vec.cpu().numpy()
            bar.update(len(idx))
    return out
