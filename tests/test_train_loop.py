"""The shared training loop driving an objective and a data source of its own: what a new kind of run
(an RL or seq2seq loop, say) plugs in, and what the loop does for it."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import LMForgeError
from lmforge.train.distributed import DistInfo
from lmforge.train.loop import OptimConfig, TrainLoop, make_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")

TRUE_W = torch.tensor([[1.0], [-2.0], [0.5], [3.0]])


class Regression:
    """An Objective: mean squared error, with a logged value and a held-out evaluation."""

    def __init__(self) -> None:
        x = torch.randn(32, 4, generator=torch.Generator().manual_seed(99))
        self.val = (x, x @ TRUE_W)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        x, y = batch
        pred = model(x)
        return F.mse_loss(pred, y), {"mean_pred": float(pred.detach().mean())}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {"val_loss": float(F.mse_loss(model(self.val[0]), self.val[1]))}


class Draws:
    """A DataSource: fresh random examples from a seeded generator, whose state resumes the stream."""

    def __init__(self, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(8, 4, generator=self.gen)
        return x, x @ TRUE_W

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"data_rng": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.gen.set_state(state["data_rng"])


class ToyRun(TrainLoop):
    def __init__(self, out: Path | None, resume: bool = False, interrupt_at: int | None = None) -> None:
        self.optim = OptimConfig(lr=0.5, max_iters=20, min_lr=0.05, warmup_iters=2, grad_accum=2, eval_every=5,
                                 save_every=5, keep_last=1)
        self.out, self.dist, self.device, self.progress = out, DistInfo(), torch.device("cpu"), False
        self.logs: list[str] = []
        self.log = self.logs.append
        torch.manual_seed(0)
        self.module = self.train_model = nn.Linear(4, 1)
        self.opt = make_optimizer(self.module, self.optim, self.device)
        self.objective, self.data = Regression(), Draws(1)
        self.interrupt_at = interrupt_at
        self.start(resume)

    def batch_loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        if self.step == self.interrupt_at:  # a real SIGINT arriving mid-step
            signal.raise_signal(signal.SIGINT)
        return super().batch_loss(batch)

    def write_checkpoint(self, tmp: Path, weights: object) -> None:
        torch.save(self.module.state_dict(), tmp / "weights.pt")

    def restore(self, path: Path, state: dict) -> None:
        self.module.load_state_dict(torch.load(path / "weights.pt", weights_only=True))
        self.opt.load_state_dict(state["optimizer"])


def test_a_new_objective_trains_logs_and_resumes_bit_for_bit(tmp_path: Path) -> None:
    full = ToyRun(tmp_path / "full").fit()
    assert len(full) == 20 and sum(full[-3:]) < 0.05 * sum(full[:3])
    first = ToyRun(tmp_path / "cut").fit(until=7)  # stops after step 7; the last checkpoint is step 5
    rest = ToyRun(tmp_path / "cut", resume=True).fit()
    assert first[:5] + rest == full  # exact float equality: weights, optimizer and data order resumed
    records = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 21))  # steps 6-7 of the cut run were forgotten
    assert [r["loss"] for r in records] == full
    assert all("mean_pred" in r for r in records)
    assert [r["step"] for r in records if "val_loss" in r] == [5, 10, 15, 20]
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == ["metrics.jsonl", "step_0000020"]


def test_a_signal_saves_the_step_just_finished(tmp_path: Path) -> None:
    run = ToyRun(tmp_path / "run", interrupt_at=2)
    with pytest.raises(KeyboardInterrupt):
        run.fit()
    assert run.step == 3 and (tmp_path / "run" / "step_0000003" / "trainer.pt").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is given back
    again = ToyRun(tmp_path / "run", resume=True)
    assert again.step == 3 and len(again.fit()) == 17


def test_a_run_without_a_run_directory_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    run = ToyRun(None)
    losses = run.fit()
    assert len(losses) == 20 and run.last_eval["val_loss"] < 0.05 * losses[0]
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(LMForgeError, match="no run directory"):
        run.save()
