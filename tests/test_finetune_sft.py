"""Instruction tuning: data formats, assistant-only labels, the SFT loop, exact resume and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from numerics import assert_close_scaled
from tiny import CHATML_TEMPLATE, make_tiny_llama_dir, train_tokenizer

from lmforge.errors import LMForgeError
from lmforge.finetune.data import (
    IGNORE,
    build_sft_examples,
    encode_conversation,
    load_conversations,
    render_segments,
)
from lmforge.finetune.sft import FinetuneConfig, FinetuneRun, collate, sft_loss
from lmforge.tokenizer import Tokenizer
from lmforge.train.batching import iter_batches

pytestmark = pytest.mark.usefixtures("one_thread")

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi there"}, {"role": "user", "content": "the cat?"},
        {"role": "assistant", "content": "sat on the mat"}]
WORDS = ["hello", "world", "fox", "dog", "mat", "fish", "text", "token", "cat", "tiny", "brown", "lazy"]
# A Llama-3-like template: a BOS, and a default system prompt when the conversation has none.
BOS_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] != 'system' %}<|im_start|>system\nBe kind.<|im_end|>\n{% endif %}"
    + CHATML_TEMPLATE
)


def _tok(template: str | None = CHATML_TEMPLATE) -> Tokenizer:
    return Tokenizer(train_tokenizer(), bos_token="<|endoftext|>", eos_token="<|im_end|>", chat_template=template)


def _spans(labels: list[int]) -> list[tuple[int, int]]:
    spans, start = [], None
    for i, x in enumerate([*labels, IGNORE]):
        if x != IGNORE and start is None:
            start = i
        elif x == IGNORE and start is not None:
            spans.append((start, i))
            start = None
    return spans


@pytest.mark.parametrize("template", [CHATML_TEMPLATE, BOS_TEMPLATE, None])
def test_labels_cover_exactly_the_assistant_replies(template):
    tok = _tok(template)
    ex = encode_conversation(tok, CHAT)
    full = tok.apply_chat_template(CHAT, add_generation_prompt=False)
    assert tok.decode(ex.ids, skip_special_tokens=False) == full  # nothing lost or added
    assert [lab for lab in ex.labels if lab != IGNORE] == [i for i, lab in zip(ex.ids, ex.labels) if lab != IGNORE]
    spans = _spans(ex.labels)
    assert len(spans) == 2
    texts = [tok.decode(ex.ids[a:b], skip_special_tokens=False) for a, b in spans]
    assert texts == ["hi there<|im_end|>", "sat on the mat<|im_end|>"]
    # Each reply's tokens are exactly what generation produces after the inference-time prompt.
    for (a, b), k, reply in zip(spans, (2, 4), texts):
        prompt = tok.encode_chat(CHAT[:k], add_generation_prompt=True)
        assert ex.ids[:a] == prompt
        assert ex.ids[a:b] == tok.encode(reply, add_special_tokens=False)
    # Only the last reply when training from the second turn (DPO's replies after a shared prompt).
    late = encode_conversation(tok, CHAT, train_from=3)
    assert _spans(late.labels) == [spans[1]]


def test_segments_reassemble_the_rendering():
    tok = _tok()
    segs = render_segments(tok, CHAT)
    assert "".join(t for t, _ in segs) == tok.apply_chat_template(CHAT, add_generation_prompt=False)
    assert [t for t, trained in segs if trained] == ["hi there<|im_end|>", "sat on the mat<|im_end|>"]


def test_non_incremental_template_is_refused():
    # Renders the last message differently from the same message inside a longer conversation.
    odd = "{% for m in messages %}{{ m['content'] }}{% if loop.last %}!{% endif %}{% endfor %}"
    with pytest.raises(LMForgeError, match="incrementally"):
        encode_conversation(_tok(odd), CHAT)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_llama_dir(tmp_path_factory.mktemp("m"), context=64)


def test_loss_equals_hand_computed_masked_cross_entropy(tiny_dir):
    from lmforge.formats import load_checkpoint

    ck = load_checkpoint(tiny_dir, device="cpu", dtype=torch.float32)
    tok = ck.tokenizer
    a = encode_conversation(tok, CHAT)
    b = encode_conversation(tok, [{"role": "user", "content": "fox?"}, {"role": "assistant", "content": "dog"}])
    ids, labels = collate([a, b], 0, torch.device("cpu"))
    with torch.no_grad():
        logits = ck.model(ids)
        got = float(sft_loss(logits, labels))
        total, n = 0.0, 0
        for row, ex in enumerate((a, b)):
            for t in range(len(ex) - 1):
                if ex.labels[t + 1] != IGNORE:  # logits at t predict token t + 1
                    total -= float(torch.log_softmax(logits[row, t], -1)[ex.ids[t + 1]])
                    n += 1
    expected_n = sum(lab != IGNORE for lab in a.labels[1:] + b.labels[1:])
    assert n == expected_n == len(tok.encode("hi there<|im_end|>sat on the mat<|im_end|>dog<|im_end|>",
                                             add_special_tokens=False))
    assert got == pytest.approx(total / n, rel=1e-5)


def _write(path: Path, rows: list[dict], jsonl: bool = True) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) if jsonl else json.dumps(rows), encoding="utf-8")
    return path


def test_format_detection(tmp_path):
    alpaca = _write(tmp_path / "a.json", [{"instruction": "Say hi", "input": "to Bob", "output": "hi Bob"}], jsonl=False)
    chat = _write(tmp_path / "c.jsonl", [{"messages": CHAT}])
    share = _write(tmp_path / "s.jsonl", [{"conversations": [{"from": "human", "value": "hello"},
                                                             {"from": "gpt", "value": "hi"}]}])
    assert load_conversations(alpaca) == [[{"role": "user", "content": "Say hi\n\nto Bob"},
                                           {"role": "assistant", "content": "hi Bob"}]]
    assert load_conversations(chat) == [CHAT]
    assert load_conversations(share) == [[{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]]
    assert load_conversations(share, "sharegpt") == load_conversations(share)
    bad = _write(tmp_path / "b.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(LMForgeError, match=r"expected fields instruction\+output.*found question, answer"):
        load_conversations(bad)
    with pytest.raises(LMForgeError, match="no 'messages' list"):
        load_conversations(alpaca, "chatml")


def test_overlong_examples_are_truncated_or_skipped_and_counted():
    tok = _tok()
    convs = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": " ".join(WORDS[:n])}]
             for n in (1, 2, 12)]
    lens = [len(encode_conversation(tok, c)) for c in convs]
    limit = lens[1]  # the first two fit, the third does not
    assert lens[2] > limit
    kept, stats = build_sft_examples(tok, convs + [[{"role": "user", "content": "no reply"}]], limit, "truncate")
    assert (stats.kept, stats.truncated, stats.skipped_overlong, stats.skipped_invalid) == (3, 1, 0, 1)
    assert max(len(e) for e in kept) == limit
    kept, stats = build_sft_examples(tok, convs, limit, "skip")
    assert (stats.kept, stats.truncated, stats.skipped_overlong) == (2, 0, 1)
    # A prompt that fills the window leaves nothing to learn: dropped even when truncating.
    prompt_len = len(tok.encode_chat(convs[0][:1]))
    _, stats = build_sft_examples(tok, convs[2:], prompt_len, "truncate")
    assert (stats.kept, stats.skipped_overlong) == (0, 1)


def test_length_bucketed_batches_cover_each_epoch_and_resume_in_place():
    lengths = [5, 50, 7, 48, 6, 51, 30, 31, 8, 49]
    it = iter_batches(lengths, 2, seed=3)
    epoch = [next(it) for _ in range(5)]
    assert sorted(i for b in epoch for i in b) == list(range(10))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in epoch)
    assert spread < 20  # neighbours in length share a batch
    first_seven = epoch + [next(it) for _ in range(2)]
    resumed = iter_batches(lengths, 2, seed=3, start=4)
    assert [next(resumed) for _ in range(3)] == first_seven[4:7]


def _sft_data(tmp_path: Path) -> Path:
    rows = [{"instruction": f"say {w}", "input": "", "output": f"{w} {w} the cat"} for w in WORDS]
    return _write(tmp_path / "sft.json", rows, jsonl=False)


def _cfg(**kw) -> FinetuneConfig:
    base = dict(max_steps=8, lr=3e-3, batch_size=4, val_fraction=0.2, eval_every=4, save_every=4, samples=1,
                sample_tokens=4, seed=1)
    return FinetuneConfig(**(base | kw))


def test_sft_lowers_loss_and_writes_a_loadable_model(tiny_dir, tmp_path):
    import lmforge

    logs: list[str] = []
    run = FinetuneRun(tiny_dir, _sft_data(tmp_path), tmp_path / "run", _cfg(max_steps=40, lr=1e-2, eval_every=20),
                      log=logs.append)
    start = run.evaluate()["val_loss"]
    losses = run.fit()
    assert losses[-1] < 0.1 * losses[0]
    assert run.last_eval["val_loss"] < start
    assert any("sample at step" in s for s in logs)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 41))
    assert "val_loss" in records[19] and "samples" in records[19] and "val_loss" not in records[18]
    lm = lmforge.load(tmp_path / "run" / "final", device="cpu")
    word = run.train_set[0].prompt[-1]["content"].removeprefix("say ")  # a training prompt is learned
    assert lm.chat(f"say {word}", max_tokens=6, temperature=0).startswith(f"{word} {word}")


def test_resume_is_exact(tiny_dir, tmp_path):
    data = _sft_data(tmp_path)
    cfg = _cfg(lora_dropout=0.0, grad_accum=2)
    straight = FinetuneRun(tiny_dir, data, tmp_path / "a", cfg, log=lambda s: None)
    straight_losses = straight.fit()
    first = FinetuneRun(tiny_dir, data, tmp_path / "b", cfg, log=lambda s: None)
    first.fit(until=4)
    assert not (tmp_path / "b" / "final").exists()
    second = FinetuneRun(tiny_dir, data, tmp_path / "b", cfg, resume=True, log=lambda s: None)
    assert second.step == 4
    rest = second.fit()
    assert rest == straight_losses[4:]
    for (name, p), q in zip(straight.model.named_parameters(), second.model.parameters()):
        assert torch.equal(p, q), name
    with pytest.raises(LMForgeError, match="settings differ"):
        FinetuneRun(tiny_dir, data, tmp_path / "b", _cfg(grad_accum=2, lr=1e-3), resume=True, log=lambda s: None)


def test_cli_sft_end_to_end(tiny_dir, tmp_path, capsys):
    from lmforge.cli import main

    data = _write(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": f"say {w}"},
                                                          {"role": "assistant", "content": w}]} for w in WORDS])
    out = tmp_path / "cli"
    rc = main(["finetune", "sft", str(tiny_dir), "--data", str(data), "--out", str(out), "--max-steps", "3",
               "--lr", "1e-3", "--batch-size", "4", "--eval-every", "3", "--samples", "0", "--device", "cpu"])
    assert rc == 0
    printed = capsys.readouterr()
    assert "trained 3 steps; val_loss" in printed.out and "12 of 12 examples kept" in printed.err
    assert main(["generate", str(out / "final"), "say fox", "--max-tokens", "2", "--temperature", "0"]) == 0
    assert main(["finetune", "sft", str(tiny_dir), "--data", str(tmp_path / "missing.json"), "--out", str(out)]) == 1
    assert "no such file" in capsys.readouterr().err


def test_lora_sft_trains_only_adapters_and_resumes(tiny_dir, tmp_path):
    pytest.importorskip("lmforge.finetune.lora")
    from lmforge.finetune.lora import load_adapter

    data = _sft_data(tmp_path)
    run = FinetuneRun(tiny_dir, data, tmp_path / "lora", _cfg(method="lora", lora_r=4, max_steps=16), log=lambda s: None)
    before = {n: p.detach().clone() for n, p in run.model.named_parameters() if not p.requires_grad}
    losses = run.fit()
    assert losses[-1] < losses[0]
    for n, p in run.model.named_parameters():
        if n in before:
            assert torch.equal(p, before[n]), n  # the base is frozen
    final = tmp_path / "lora" / "final"
    assert (final / "adapter_model.safetensors").exists() and (final / "adapter_config.json").exists()
    from lmforge.formats import load_checkpoint

    ck = load_checkpoint(tiny_dir, device="cpu", dtype=torch.float32)
    load_adapter(ck.model, final)
    ids = torch.tensor([encode_conversation(ck.tokenizer, CHAT).ids])
    with torch.no_grad():
        assert_close_scaled(ck.model(ids), run.model.eval()(ids), 1e-5)
    # resume from the mid-run adapter checkpoint gives the same final adapters
    part = FinetuneRun(tiny_dir, data, tmp_path / "lora2", _cfg(method="lora", lora_r=4, max_steps=16),
                       log=lambda s: None)
    part.fit(until=8)
    rest = FinetuneRun(tiny_dir, data, tmp_path / "lora2", _cfg(method="lora", lora_r=4, max_steps=16), resume=True,
                       log=lambda s: None)
    assert rest.fit() == losses[8:]


def test_qlora_sft_lowers_loss(tiny_dir, tmp_path):
    pytest.importorskip("lmforge.finetune.lora")
    run = FinetuneRun(tiny_dir, _sft_data(tmp_path), tmp_path / "q", _cfg(method="qlora", max_steps=12, samples=0),
                      log=lambda s: None)
    losses = run.fit()
    assert math.isfinite(losses[-1]) and losses[-1] < losses[0]


def test_qlora_streams_nf4_and_holds_no_dense_block_matrices(tiny_dir, tmp_path, monkeypatch):
    from lmforge import formats
    from lmforge.finetune.lora import LoraLinear
    from lmforge.quant.nf4 import NF4Linear

    dense = formats.load_checkpoint(tiny_dir, device="cpu", dtype=torch.float32).model
    blocks = {n: tuple(p.shape) for n, p in dense.named_parameters() if n.startswith("layers.") and p.dim() == 2}
    dense_bytes = 4 * sum(math.prod(s) for s in blocks.values())

    build_model = formats.build_model

    def dense_load(*a, **kw):  # the dense builder (no stored format) would hold every fp32 matrix at once
        if kw.get("store") is None:
            raise AssertionError("the QLoRA path built the dense model")
        return build_model(*a, **kw)

    monkeypatch.setattr(formats, "build_model", dense_load)
    run = FinetuneRun(tiny_dir, _sft_data(tmp_path), tmp_path / "q", _cfg(method="qlora", max_steps=2, samples=0),
                      log=lambda s: None)
    linears = {n.removesuffix(".weight") for n in blocks}
    for name in linears:
        m = run.model.get_submodule(name)
        base = m.base if isinstance(m, LoraLinear) else m
        assert isinstance(base, NF4Linear), name
    tensors = dict(run.model.named_parameters()) | dict(run.model.named_buffers())
    frozen = {n: t for n, t in tensors.items() if n.startswith("layers.") and "lora_" not in n}
    # No floating-point matrix is left in the blocks: only uint8 codes, per-64 absmax scales and norms.
    assert not [n for n, t in frozen.items() if t.is_floating_point() and t.dim() == 2]
    held = sum(t.numel() * t.element_size() for t in frozen.values())
    assert held < 0.16 * dense_bytes  # 4.5 bits per weight (plus norms) instead of 32
    run.fit()
    with pytest.raises(AssertionError, match="dense model"):  # the tripwire works: LoRA does load densely
        FinetuneRun(tiny_dir, _sft_data(tmp_path), tmp_path / "l", _cfg(method="lora", max_steps=1), log=lambda s: None)


@pytest.mark.slow
def test_smollm2_template_labels(smollm2_path):
    from lmforge.formats import load_tokenizer

    tok = load_tokenizer(smollm2_path)
    chat = CHAT[1:]  # no system message: the template writes its default one, which is never trained
    ex = encode_conversation(tok, chat)
    assert tok.decode(ex.ids, skip_special_tokens=False) == tok.apply_chat_template(chat, add_generation_prompt=False)
    spans = _spans(ex.labels)
    assert [tok.decode(ex.ids[a:b], skip_special_tokens=False) for a, b in spans] == \
        ["hi there<|im_end|>", "sat on the mat<|im_end|>"]
    assert ex.ids[:spans[1][0]] == tok.encode_chat(chat[:3], add_generation_prompt=True)


def test_ctrl_c_saves_a_checkpoint_and_resume_continues(tiny_dir, tmp_path):
    import signal

    class Interrupted(FinetuneRun):
        def batch_loss(self, batch):
            if self.step == 2:  # a real SIGINT arriving during the third step
                signal.raise_signal(signal.SIGINT)
            return super().batch_loss(batch)

    data = _sft_data(tmp_path)
    run = Interrupted(tiny_dir, data, tmp_path / "c", _cfg(save_every=100), log=lambda s: None)
    with pytest.raises(KeyboardInterrupt):
        run.fit()
    assert run.step == 3 and (tmp_path / "c" / "step_0000003" / "trainer.pt").exists()
    again = FinetuneRun(tiny_dir, data, tmp_path / "c", _cfg(save_every=100), resume=True, log=lambda s: None)
    assert again.step == 3 and len(again.fit()) == 5 and (tmp_path / "c" / "final").exists()


def _torchrun_sft(tiny_dir: Path, data: Path, out: Path, *extra: str) -> list[dict]:
    """LoRA SFT on 2 gloo processes, batch 2 each; returns metrics.jsonl's records."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lmforge",
           "finetune", "sft", str(tiny_dir), "--data", str(data), "--out", str(out), "--method", "lora",
           "--lora-r", "4", "--batch-size", "2", "--max-steps", "6", "--lr", "3e-3", "--val-fraction", "0.2",
           "--eval-every", "4", "--save-every", "4", "--samples", "0", "--seed", "1", "--device", "cpu", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("trained 6 steps") == 1  # rank 0 alone reports
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_torchrun_data_parallel_matches_one_process(tiny_dir, tmp_path):
    """2 processes with batch 2 step exactly like 1 process with batch 2 and 2 accumulated micro-batches,
    and a torchrun run resumes from its checkpoint."""
    from safetensors.torch import load_file

    data = _sft_data(tmp_path)
    one = FinetuneRun(tiny_dir, data, tmp_path / "one", _cfg(method="lora", lora_r=4, batch_size=2, grad_accum=2,
                                                             max_steps=6, samples=0), log=lambda s: None)
    reference = one.fit()
    records = _torchrun_sft(tiny_dir, data, tmp_path / "two")
    assert [r["step"] for r in records] == list(range(1, 7))  # one writer, no duplicates
    # Summed across processes instead of accumulated in one: the same losses up to rounding.
    assert_close_scaled([r["loss"] for r in records], reference, 1e-5)
    assert_close_scaled(records[3]["val_loss"], json.loads(
        (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()[3])["val_loss"], 1e-5)
    a = load_file(tmp_path / "one" / "final" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)

    import shutil

    shutil.rmtree(tmp_path / "two" / "final")
    shutil.rmtree(tmp_path / "two" / "step_0000006")
    resumed = _torchrun_sft(tiny_dir, data, tmp_path / "two", "--resume")
    assert_close_scaled([r["loss"] for r in resumed], reference, 1e-5)
