"""Checkpoints survive kill -9 and power loss: nothing half-written or half-deleted is left behind or
mistaken for a checkpoint, and a resumed run continues bit for bit."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import make_tiny_llama_dir, train_tokenizer

from lmforge.finetune.sft import FinetuneConfig, FinetuneRun
from lmforge.fsutil import atomic_dir
from lmforge.tokenizer import Tokenizer
from lmforge.train.data import prepare
from lmforge.train.pretrain import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = {"dim": 32, "n_layers": 2, "n_heads": 2, "ffn_dim": 64, "tie_embeddings": True}
TEXT = "".join(f"The {c} fox {v} over the {a} dog number {i}.\n" for i, (c, v, a) in enumerate(
    [("quick", "jumps", "lazy"), ("red", "leaps", "sleepy"), ("brown", "runs", "old")] * 40))
CHECKPOINT_FILES = {"config.json", "model.safetensors", "trainer.pt", "train_config.json"}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ckpt")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXT.splitlines()), encoding="utf-8")
    prepare([corpus], Tokenizer(train_tokenizer(), eos_token="<|endoftext|>"), root / "data", val_fraction=0.2,
            workers=1, progress=False)
    return root / "data"


def _cfg(data: Path, out: Path) -> dict:
    return dict(data=str(data), out=str(out), model=MODEL, batch_size=4, block_size=16, max_iters=30, lr=3e-3,
                min_lr=3e-4, warmup_iters=2, eval_interval=10, eval_iters=2, save_interval=10, keep_last=1,
                samples=0, device="cpu")


@pytest.fixture(scope="module")
def reference(data: Path, tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    """The losses of the same run, never interrupted."""
    return Trainer(TrainConfig(**_cfg(data, tmp_path_factory.mktemp("ref"))), log=lambda s: None).fit()


# Trains in a fresh process and SIGKILLs it at a chosen point of its second checkpoint.
KILLER = """
import json, os, shutil, signal, sys
import torch
from lmforge.train import pretrain

torch.set_num_threads(1)
where, cfg = sys.argv[1], json.loads(sys.argv[2])
saves = []
real_write_hf, real_rmtree = pretrain.write_hf, shutil.rmtree

def write_hf(*args, **kw):  # the weights are staged, the trainer state is not yet
    real_write_hf(*args, **kw)
    saves.append(1)
    if where == "staging" and len(saves) == 2:
        os.kill(os.getpid(), signal.SIGKILL)

def rmtree(path, *args, **kw):  # delete one file of the pruned checkpoint, then die
    if where == "pruning" and os.path.isdir(path):
        for root, _, files in os.walk(path):
            if "model.safetensors" in files:
                os.remove(os.path.join(root, "model.safetensors"))
                os.kill(os.getpid(), signal.SIGKILL)
    real_rmtree(path, *args, **kw)

pretrain.write_hf, shutil.rmtree = write_hf, rmtree
pretrain.Trainer(pretrain.TrainConfig(**cfg), log=lambda s: None).fit()
"""


def _kill_mid_checkpoint(where: str, data: Path, out: Path) -> None:
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", KILLER, where, json.dumps(_cfg(data, out))], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


@pytest.mark.parametrize(("where", "survivor"), [("staging", "step_0000010"), ("pruning", "step_0000020")])
def test_kill_9_mid_checkpoint_leaves_nothing_and_resume_is_exact(
        where: str, survivor: str, data: Path, reference: list[float], tmp_path: Path) -> None:
    out = tmp_path / "run"
    _kill_mid_checkpoint(where, data, out)
    assert len(list(out.iterdir())) > 2  # the kill left debris: staging, or a half-pruned checkpoint
    logs: list[str] = []
    trainer = Trainer(TrainConfig(**_cfg(data, out)), resume=True, log=logs.append)
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl", survivor]  # debris gone on start
    assert any("leftover" in s for s in logs)
    assert CHECKPOINT_FILES <= {p.name for p in (out / survivor).iterdir()}
    step = int(survivor.removeprefix("step_"))
    assert trainer.step == step
    assert trainer.fit() == reference[step:]  # exact float equality: resume is bit for bit
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl", "step_0000030"]


def test_leftovers_are_removed_on_a_fresh_start(data: Path, tmp_path: Path) -> None:
    """Exactly what a killed save or prune leaves; a new run (not only a resume) clears it."""
    out = tmp_path / "run"
    staging = out / ".step_0000020.tmp-k3x_9q"
    staging.mkdir(parents=True)
    (staging / "model.safetensors").write_bytes(b"\0" * 64)
    trash = out / ".step_0000010.trash-a1b2c3" / "x"
    trash.mkdir(parents=True)
    (trash / "trainer.pt").write_bytes(b"\0" * 64)
    half_pruned = out / "step_0000005"  # pruned in place by earlier versions: trainer state already gone
    half_pruned.mkdir()
    (half_pruned / "config.json").write_text("{}")
    (out / ".metrics.jsonl.tmp-zz9").write_text("")
    keep = out / "notes.txt"  # not ours: left alone
    keep.write_text("mine")
    Trainer(TrainConfig(**_cfg(data, out)), log=lambda s: None)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_an_interrupted_swap_restores_the_previous_directory(tmp_path: Path) -> None:
    """A replacement killed between its two renames: the previous version comes back, the new one goes."""
    from lmforge.fsutil import sweep_leftovers

    target = tmp_path / "final"
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("old")
    held = tmp_path / ".final.old-abc123"
    held.mkdir()
    os.replace(target, held / "x")
    staged = tmp_path / ".final.tmp-def456"
    staged.mkdir()
    (staged / "weights").write_text("new, never published")
    assert sorted(p.name for p in sweep_leftovers(tmp_path)) == [".final.old-abc123", ".final.tmp-def456"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    assert (target / "weights").read_text() == "old"


def test_checkpoint_files_and_directories_are_synced_before_the_rename(
        data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    trainer = Trainer(TrainConfig(**(_cfg(data, out) | {"max_iters": 1, "save_interval": 1})), log=lambda s: None)
    trainer.fit()
    synced: list[tuple[str, bool]] = []  # (path of the fd, whether the checkpoint was in place yet)
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), (out / "step_0000001").exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    shutil.rmtree(out / "step_0000001")
    trainer.save()
    files = {p.name for p in (out / "step_0000001").iterdir()}
    assert CHECKPOINT_FILES <= files
    before = {Path(p) for p, placed in synced if not placed}
    staged = {p.parent for p in before if p.parent.name.startswith(".step_0000001.tmp-")}
    assert len(staged) == 1  # every write went through one staging directory...
    assert {p.name for p in before if p.parent in staged} == files  # ...whose files were all synced
    assert staged <= before  # and the staging directory itself, before it was renamed
    assert (str(out.resolve()), True) in synced  # the rename into the run directory is synced too


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama_dir(tmp_path_factory.mktemp("m"), context=64)


def test_finetune_start_clears_leftovers_and_resumes(tiny_dir: Path, tmp_path: Path) -> None:
    rows = [{"instruction": f"say {w}", "input": "", "output": f"{w} {w} the cat"}
            for w in ("red", "blue", "green", "pink", "gold", "gray", "teal", "lime", "navy", "plum")]
    (tmp_path / "sft.json").write_text(json.dumps(rows), encoding="utf-8")
    cfg = FinetuneConfig(max_steps=8, lr=3e-3, batch_size=4, val_fraction=0.2, eval_every=4, save_every=4,
                         samples=0, seed=1)
    out = tmp_path / "run"
    FinetuneRun(tiny_dir, tmp_path / "sft.json", out, cfg, log=lambda s: None).fit(until=4)
    staging = out / ".step_0000008.tmp-q7w8e9"
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"\0" * 64)
    (out / ".final.tmp-r5t6y7").mkdir()
    (out / "step_0000002").mkdir()  # half-pruned in place
    run = FinetuneRun(tiny_dir, tmp_path / "sft.json", out, cfg, resume=True, log=lambda s: None)
    assert run.step == 4
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl", "step_0000004"]
    assert torch.isfinite(torch.tensor(run.fit())).all()
