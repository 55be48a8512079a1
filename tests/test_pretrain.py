"""The pretraining loop: the loss falls, checkpoints load everywhere, and resume is bit-exact on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny import train_tokenizer

from lmforge.errors import LMForgeError
from lmforge.formats import load_checkpoint
from lmforge.tokenizer import Tokenizer
from lmforge.train.data import prepare
from lmforge.train.pretrain import TrainConfig, Trainer, learning_rate

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = {"dim": 32, "n_layers": 2, "n_heads": 2, "ffn_dim": 64, "tie_embeddings": True}
TEXT = "".join(f"The {c} fox {v} over the {a} dog number {i}.\n" for i, (c, v, a) in enumerate(
    [("quick", "jumps", "lazy"), ("red", "leaps", "sleepy"), ("brown", "runs", "old")] * 40))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pretrain")
    lines = TEXT.splitlines()
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines), encoding="utf-8")
    tok = Tokenizer(train_tokenizer(), eos_token="<|endoftext|>")
    prepare([root / "corpus.jsonl"], tok, root / "data", val_fraction=0.2, workers=1, progress=False)
    return root / "data"


def _cfg(data: Path, out: Path, **kw: object) -> TrainConfig:
    base = dict(data=str(data), out=str(out), model=MODEL, batch_size=4, block_size=16, max_iters=20, lr=3e-3,
                min_lr=3e-4, warmup_iters=2, eval_interval=10, eval_iters=2, save_interval=10, device="cpu")
    return TrainConfig(**(base | kw))


def test_loss_falls_and_checkpoint_loads(data: Path, tmp_path: Path) -> None:
    trainer = Trainer(_cfg(data, tmp_path / "run", max_iters=60, save_interval=30), log=lambda s: None)
    losses = trainer.fit()
    assert len(losses) == 60
    assert sum(losses[-10:]) / 10 < 0.7 * sum(losses[:5]) / 5
    ckpts = sorted(p.name for p in (tmp_path / "run").glob("step_*"))
    assert ckpts == ["step_0000030", "step_0000060"]
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 60 and '"val_loss"' in metrics[-1] and '"val_bpb"' in metrics[-1]
    ck = load_checkpoint(tmp_path / "run" / "step_0000060", device="cpu", dtype=torch.float32)
    x = torch.randint(0, trainer.model_cfg.vocab_size, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(ck.model(x), trainer.model(x), rtol=0, atol=1e-6)
    assert ck.tokenizer is not None and ck.tokenizer.encode("The quick fox") == trainer.tokenizer.encode("The quick fox")


def test_resume_is_bit_exact(data: Path, tmp_path: Path) -> None:
    full = Trainer(_cfg(data, tmp_path / "full"), log=lambda s: None).fit()
    first = Trainer(_cfg(data, tmp_path / "cut"), log=lambda s: None).fit(until=10)  # "interrupted" at 10
    rest = Trainer(_cfg(data, tmp_path / "cut"), resume=True, log=lambda s: None).fit()
    assert first + rest == full  # exact float equality at every step


def test_bad_inputs(data: Path, tmp_path: Path) -> None:
    with pytest.raises(LMForgeError, match="not divisible by n_heads"):
        Trainer(_cfg(data, tmp_path / "a", model=MODEL | {"n_heads": 3}))
    with pytest.raises(LMForgeError, match="not a prepared data directory"):
        Trainer(_cfg(tmp_path, tmp_path / "b"))
    with pytest.raises(LMForgeError, match="nothing to resume"):
        Trainer(_cfg(data, tmp_path / "c"), resume=True)
    Trainer(_cfg(data, tmp_path / "d", max_iters=10), log=lambda s: None).fit()
    with pytest.raises(LMForgeError, match="model config differs"):
        Trainer(_cfg(data, tmp_path / "d", model=MODEL | {"ffn_dim": 96}), resume=True)
    (tmp_path / "d" / "step_0000010" / "trainer.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(LMForgeError, match="cannot read trainer state"):
        Trainer(_cfg(data, tmp_path / "d"), resume=True)
    assert learning_rate(_cfg(data, tmp_path, warmup_iters=0), 0) == pytest.approx(3e-3)


def test_cli_preset_train_resume_and_generate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lmforge.cli import main

    corpus = tmp_path / "shakespeare.txt"
    corpus.write_text(TEXT * 3, encoding="utf-8")
    small = ["--set", "model.dim=32", "--set", "model.n_layers=1", "--set", "model.n_heads=2",
             "--set", "model.ffn_dim=64", "--set", "eval_iters=2", "--set", "eval_interval=4",
             "--set", "save_interval=4", "--set", "block_size=16", "--device", "cpu"]
    out = tmp_path / "run"
    assert main(["train", "--preset", "shakespeare-char", "--data", str(corpus), "--out", str(out),
                 "--set", "max_iters=4", *small]) == 0
    assert "val_loss" in capsys.readouterr().out
    assert main(["train", "--preset", "shakespeare-char", "--out", str(out), "--resume",
                 "--set", "max_iters=8", *small]) == 0
    assert (out / "step_0000008" / "model.safetensors").exists()
    assert main(["generate", str(out / "step_0000008"), "The", "--max-tokens", "5", "--seed", "1"]) == 0
    assert main(["train", "--preset", "shakespeare-char", "--out", str(out), "--set", "bogus=1",
                 "--data", str(out / "data")]) == 1
    assert "unknown training settings: bogus" in capsys.readouterr().err


def test_sigint_saves_a_checkpoint(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT * 3, encoding="utf-8")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "lmforge.cli", "train", "--preset", "shakespeare-char", "--data", str(corpus),
           "--out", str(out), "--device", "cpu", "--set", "max_iters=100000", "--set", "save_interval=100000",
           "--set", "model.dim=32", "--set", "model.n_layers=1", "--set", "model.n_heads=2",
           "--set", "model.ffn_dim=64", "--set", "block_size=16"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    saved = sorted(out.glob("step_*"))
    assert len(saved) == 1 and (saved[0] / "trainer.pt").exists() and (saved[0] / "model.safetensors").exists()
    assert int(saved[0].name.removeprefix("step_")) >= 3
    assert f"saved {saved[0]}" in err


def test_plot_writes_a_png(data: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from lmforge.cli import main

    Trainer(_cfg(data, tmp_path / "run", max_iters=10, eval_interval=5), log=lambda s: None).fit()
    assert main(["plot", str(tmp_path / "run")]) == 0
    png = (tmp_path / "run" / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert main(["plot", str(tmp_path)]) == 1  # not a run directory
