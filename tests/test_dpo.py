"""Preference tuning: data parsing (incl. HH-RLHF), the DPO loss and loop, LoRA references, reward models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from numerics import assert_close_scaled
from tiny import make_tiny_llama_dir

from lmforge.errors import LMForgeError
from lmforge.finetune.data import IGNORE, build_pairs, parse_hh, read_records, to_pair
from lmforge.finetune.dpo import DPORun, RewardModel, RewardRun, dpo_loss, score, sequence_logps
from lmforge.finetune.sft import FinetuneConfig

pytestmark = pytest.mark.usefixtures("one_thread")

HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-base_test.jsonl.gz"
WORDS = ["hello", "world", "fox", "dog", "mat", "fish", "text", "token", "cat", "tiny", "brown", "lazy"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_llama_dir(tmp_path_factory.mktemp("m"), context=64)


@pytest.fixture
def prefs(tmp_path) -> Path:
    rows = [{"prompt": f"say {w}", "chosen": f"{w} the cat", "rejected": f"no {w} stop"} for w in WORDS]
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    return path


def _cfg(**kw) -> FinetuneConfig:
    base = dict(max_steps=16, lr=1e-3, batch_size=4, val_fraction=0.25, eval_every=8, save_every=8, samples=0, seed=2)
    return FinetuneConfig(**(base | kw))


def test_parse_hh_transcript():
    text = "\n\nHuman: hi there\n\nAssistant: Hello!\n\n1. one\n\nHuman: and?\n\nAssistant: done"
    assert parse_hh(text) == [{"role": "user", "content": "hi there"},
                              {"role": "assistant", "content": "Hello!\n\n1. one"},  # a blank line stays inside
                              {"role": "user", "content": "and?"}, {"role": "assistant", "content": "done"}]
    pair = to_pair({"chosen": text, "rejected": text.replace("done", "no")}, "x")
    assert [m["content"] for m in pair.prompt] == ["hi there", "Hello!\n\n1. one", "and?"]
    assert pair.chosen == [{"role": "assistant", "content": "done"}]
    assert pair.rejected == [{"role": "assistant", "content": "no"}]
    assert to_pair({"chosen": text, "rejected": text}, "x") is None  # nothing to prefer
    with pytest.raises(LMForgeError, match="HH-RLHF"):
        to_pair({"chosen": "plain", "rejected": "text"}, "x")
    with pytest.raises(LMForgeError, match="needs chosen and rejected"):
        to_pair({"prompt": "p", "chosen": "c"}, "x")


@pytest.mark.skipif(not HH.exists(), reason="shared HH-RLHF sample not present")
def test_hh_rlhf_file_splits_into_prompt_and_replies():
    records = read_records(HH)
    assert len(records) == 2312
    pairs = [to_pair(r, "hh") for r in records[:200]]
    assert sum(p is not None for p in pairs) >= 190
    p = pairs[0]
    assert p.prompt[0]["role"] == "user" and p.prompt[-1]["role"] == "user"
    assert p.prompt[-1]["content"] == "okay some of these do not have anything to do with pens"
    assert p.chosen[0]["content"].startswith("No, sorry!") and p.rejected[0]["content"].startswith("There are lots")
    # Rebuilding the transcripts from the split gives back the original strings.
    def hh(msgs):
        return "".join(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in msgs)
    assert hh(p.prompt + p.chosen) == records[0]["chosen"]


def test_message_list_preferences(tiny_dir, tmp_path):
    from lmforge.formats import load_tokenizer

    tok = load_tokenizer(tiny_dir)
    user = {"role": "user", "content": "say fox"}
    rows = [{"prompt": [user], "chosen": [{"role": "assistant", "content": "fox"}],
             "rejected": [{"role": "assistant", "content": "dog"}]},
            {"chosen": [user, {"role": "assistant", "content": "fox"}],  # implicit prompt: the shared prefix
             "rejected": [user, {"role": "assistant", "content": "dog"}]},
            {"prompt": "say fox", "chosen": [user, {"role": "assistant", "content": "fox"}],
             "rejected": [user, {"role": "assistant", "content": "dog"}]}]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    pairs, stats = build_pairs(tok, path, 64)
    assert stats.kept == 3
    for p in pairs:
        assert p.chosen.ids == pairs[0].chosen.ids and p.rejected.ids == pairs[0].rejected.ids
        trained = [i for i, lab in zip(p.chosen.ids, p.chosen.labels) if lab != IGNORE]
        assert tok.decode(trained, skip_special_tokens=False) == "fox<|im_end|>"


def test_dpo_loss_formula():
    pc, pr, rc, rr = (torch.tensor([x]) for x in (-3.0, -5.0, -4.0, -4.0))
    loss, st = dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert float(loss) == pytest.approx(math.log1p(math.exp(-0.5 * (1.0 - (-1.0)))))
    assert st["reward_chosen"] == pytest.approx(0.5) and st["reward_rejected"] == pytest.approx(-0.5)
    assert st["reward_margin"] == pytest.approx(1.0) and st["reward_accuracy"] == 1.0


def test_sequence_logps_sum_only_the_reply():
    logits = torch.randn(1, 4, 5)
    labels = torch.tensor([[IGNORE, IGNORE, 3, 1]])
    lp = torch.log_softmax(logits, -1)
    assert float(sequence_logps(logits, labels)) == pytest.approx(float(lp[0, 1, 3] + lp[0, 2, 1]), rel=1e-6)


def test_dpo_starts_at_log2_and_learns_the_preference(tiny_dir, prefs, tmp_path):
    run = DPORun(tiny_dir, prefs, tmp_path / "dpo", _cfg(), log=lambda s: None)
    start = run.evaluate()
    assert start["val_loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference
    loss, st = run.batch_loss(run.train_set[:4])
    assert float(loss.detach()) == pytest.approx(math.log(2), abs=1e-5) and st["reward_margin"] == pytest.approx(0, abs=1e-4)
    losses = run.fit()
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)
    assert losses[-1] < 0.3
    assert run.last_eval["val_reward_accuracy"] == 1.0 and run.last_eval["val_reward_margin"] > 0.5
    records = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert {"reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy"} <= set(records[-1])
    assert (tmp_path / "dpo" / "final" / "model.safetensors").exists()


def test_dpo_resume_keeps_the_original_reference(tiny_dir, prefs, tmp_path):
    straight = DPORun(tiny_dir, prefs, tmp_path / "a", _cfg(), log=lambda s: None)
    full = straight.fit()
    part = DPORun(tiny_dir, prefs, tmp_path / "b", _cfg(), log=lambda s: None)
    part.fit(until=8)
    rest = DPORun(tiny_dir, prefs, tmp_path / "b", _cfg(), resume=True, log=lambda s: None)
    assert [p.ref_chosen for p in rest.train_set] == [p.ref_chosen for p in straight.train_set]
    assert rest.fit() == full[8:]


def test_dpo_with_lora_uses_the_disabled_adapter_reference(tiny_dir, prefs, tmp_path):
    pytest.importorskip("lmforge.finetune.lora")
    from lmforge.finetune.lora import adapters_disabled

    run = DPORun(tiny_dir, prefs, tmp_path / "lora", _cfg(method="lora", lr=1e-2), log=lambda s: None)
    assert run.evaluate()["val_loss"] == pytest.approx(math.log(2), abs=1e-5)
    losses = run.fit()
    assert losses[-1] < losses[0] - 0.2
    batch = run.train_set[:4]
    with torch.no_grad():
        with adapters_disabled(run.model):
            ref_c, ref_r = run.policy_logps(batch)  # the base under disabled adapters is still the reference
        pc, _ = run.policy_logps(batch)
    assert torch.allclose(ref_c, torch.tensor([p.ref_chosen for p in batch]), atol=1e-4)
    assert torch.allclose(ref_r, torch.tensor([p.ref_rejected for p in batch]), atol=1e-4)
    assert not torch.allclose(pc, ref_c, atol=1e-3)  # while the adapted policy has moved
    assert (tmp_path / "lora" / "final" / "adapter_model.safetensors").exists()


def test_reward_model_learns_and_reloads(tiny_dir, prefs, tmp_path):
    run = RewardRun(tiny_dir, prefs, tmp_path / "rm", _cfg(max_steps=24), log=lambda s: None)
    before = run.evaluate()
    run.fit()
    assert run.last_eval["val_accuracy"] == 1.0 and run.last_eval["val_accuracy"] >= before["val_accuracy"]
    assert run.last_eval["val_loss"] < before["val_loss"]
    out = tmp_path / "rm" / "final"
    loaded = RewardModel.load(out)
    pairs = [(p.chosen.prompt[-1]["content"], w) for p in run.val_set
             for w in (p.chosen.prompt[-1]["content"].removeprefix("say ") + " the cat",)]
    rejected = [(q, "no " + q.removeprefix("say ") + " stop") for q, _ in pairs]
    good, bad = score(loaded, pairs), score(out, rejected)
    assert all(g > b for g, b in zip(good, bad))
    # the saved scores equal the in-memory model's
    run.reward.eval()
    with torch.no_grad():
        ids = torch.tensor([run.val_set[0].chosen.ids])
        assert_close_scaled(float(run.reward(ids, torch.tensor([ids.shape[1]]))), good[0], 1e-4)
    with pytest.raises(LMForgeError, match="not a reward model"):
        RewardModel.load(tiny_dir)


def test_cli_dpo_and_reward(tiny_dir, prefs, tmp_path, capsys):
    from lmforge.cli import main

    for cmd in ("dpo", "reward"):
        out = tmp_path / cmd
        extra = ["--beta", "0.2"] if cmd == "dpo" else []
        rc = main(["finetune", cmd, str(tiny_dir), "--data", str(prefs), "--out", str(out), "--max-steps", "2",
                   "--batch-size", "4", "--eval-every", "2", "--device", "cpu", *extra])
        assert rc == 0
        assert "trained 2 steps; val_loss" in capsys.readouterr().out
        assert (out / "final" / "config.json").exists()
    assert (tmp_path / "reward" / "final" / "reward.json").exists()
