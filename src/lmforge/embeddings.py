"""Text embeddings: pooling of hidden states (as sentence-transformers configures it), batching,
cosine similarity, k-means clustering and a 2-D PCA picture.

Encoders use their sentence-transformers pooling files when present (modules.json, 1_Pooling/config.json,
a Normalize module, sentence_bert_config.json's max_seq_length); other models get mean pooling.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import LMForgeError
from .fsutil import read_json
from .model import Transformer
from .tokenizer import Tokenizer

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


# -- using embeddings -------------------------------------------------------------------------------
def cosine_matrix(a: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """Pairwise cosine similarities between the rows of a and b (default: a with itself)."""
    def unit(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

    ua = unit(a)
    return ua @ (ua if b is None else unit(b)).T


def kmeans(x: np.ndarray, k: int, iters: int = 100, seed: int = 0, cosine: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """k-means (k-means++ seeding) -> (labels [n], centroids [k, d]). ``cosine`` clusters unit vectors."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    if not 1 <= k <= n:
        raise LMForgeError(f"cannot make {k} clusters from {n} texts (need 1 <= k <= {n})")
    if cosine:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    rng = np.random.default_rng(seed)
    centroids = [x[rng.integers(n)]]
    for _ in range(1, k):
        d2 = np.min(((x[:, None, :] - np.array(centroids)[None]) ** 2).sum(-1), axis=1)
        p = d2 / d2.sum() if d2.sum() > 0 else np.full(n, 1 / n)
        centroids.append(x[rng.choice(n, p=p)])
    c = np.array(centroids)
    labels = np.full(n, -1)
    for _ in range(iters):
        new = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
        if np.array_equal(new, labels):
            break
        labels = new
        for j in range(k):
            if (labels == j).any():  # an emptied cluster keeps its old centre
                c[j] = x[labels == j].mean(0)
    return labels, c.astype(np.float32)


def pca_2d(x: np.ndarray) -> np.ndarray:
    """Project rows onto their two principal components (SVD of the centred data) -> [n, 2]."""
    x = np.asarray(x, dtype=np.float64)
    centred = x - x.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    out = centred @ vt[:2].T
    if out.shape[1] < 2:  # one text, or one dimension: pad so the plot still works
        out = np.pad(out, ((0, 0), (0, 2 - out.shape[1])))
    return out.astype(np.float32)


def plot_embeddings(x: np.ndarray, texts: Sequence[str], out: str | Path, labels: np.ndarray | None = None) -> Path:
    """Write a PNG of the texts' 2-D PCA projection, coloured by cluster when labels are given."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LMForgeError("plotting needs matplotlib: pip install 'lmforge[plot]'") from None
    from .fsutil import atomic_file

    xy = pca_2d(x)
    fig, ax = plt.subplots(figsize=(8, 6))
    ax.scatter(xy[:, 0], xy[:, 1], c=labels if labels is not None else "tab:blue", cmap="tab10", s=30)
    for (px, py), t in zip(xy, texts):
        ax.annotate(t if len(t) <= 40 else t[:37] + "...", (px, py), fontsize=7, alpha=0.8,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(f"{len(xy)} texts, 2-D PCA of the embeddings")
    fig.tight_layout()
    out = Path(out).expanduser()
    with atomic_file(out) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return out
