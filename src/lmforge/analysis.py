"""Looking at embeddings: cosine similarity, k-means clustering and a 2-D PCA picture (numpy only)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import LMForgeError


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
