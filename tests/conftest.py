"""Shared pytest fixtures."""

from __future__ import annotations

import getpass
import os
import tempfile
from pathlib import Path

# torch.compile's kernel cache is not keyed on ATEN_CPU_CAPABILITY: kernels cached under one setting give
# NaN or abort under another. The suite runs under both (native and avx2), so each gets its own cache.
if os.environ.get("ATEN_CPU_CAPABILITY") and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_{os.environ['ATEN_CPU_CAPABILITY']}")

import pytest  # noqa: E402
import torch  # noqa: E402

# Captured at import, before any test patches LMFORGE_HOME, so the real model is cached in a
# persistent place and reused across test sessions.
_PERSISTENT_HOME = os.environ.get("LMFORGE_HOME") or str(Path("~/.cache/lmforge").expanduser())


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """Path to the real SmolLM2-135M-Instruct GGUF, pulled once into the persistent cache."""
    from lmforge import registry

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMFORGE_HOME", _PERSISTENT_HOME)
        path = registry.resolve(registry.DEFAULT_MODEL, quiet=True)
    return path.resolve()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster single-threaded: thread wake-ups cost more than their matmuls."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """Path to the real all-MiniLM-L6-v2 sentence embedder, pulled once into the persistent cache."""
    from lmforge import registry

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMFORGE_HOME", _PERSISTENT_HOME)
        path = registry.resolve("all-minilm-l6-v2", quiet=True)
    return path.resolve()
