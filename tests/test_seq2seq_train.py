"""Encoder-decoder training: span corruption, pairs, the fresh-model trainer (learning, exact resume, the
time budget), `finetune seq2seq` (full and LoRA, with transformers + PEFT reading the adapter), dropout."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from numerics import assert_close_scaled

from lmforge.cli import main
from lmforge.errors import LMForgeError
from lmforge.formats import load_checkpoint
from lmforge.formats.export import save_hf
from lmforge.model import ModelConfig
from lmforge.model.seq2seq import EncoderDecoder
from lmforge.tokenizer import Tokenizer
from lmforge.train.pretrain import TrainConfig
from lmforge.train.seq2seq import Seq2SeqLoss, Seq2SeqTrainer, encode_pairs, read_pairs, span_corrupt
from lmforge.train.tokenizer import train_unigram

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ("red blue green small large dog cat bird runs sits jumps over under the a house tree river "
         "man woman child plays looks at with near").split()
TINY = {"family": "t5", "dim": 64, "n_layers": 2, "decoder_layers": 2, "n_heads": 4, "head_dim": 16, "ffn_dim": 128,
        "mlp": "gelu", "activation": "relu", "position": "relative", "relative_buckets": 16,
        "relative_max_distance": 32, "tie_embeddings": True, "output_scale": True, "norm_eps": 1e-6}


def _pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """A toy translation: the words of the source in reverse order, upper-cased."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 8))]
        out.append((" ".join(words), " ".join(reversed(words)).upper()))
    return out


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("tok")
    text = tmp / "text.txt"
    text.write_text("\n".join(t for p in _pairs(400) for t in p) + "\n", encoding="utf-8")
    return train_unigram([text], 160, tmp / "tok", sentinels=20, progress=False)


@pytest.fixture(scope="module")
def tsv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "pairs.tsv"
    path.write_text("".join(f"{s}\t{t}\n" for s, t in _pairs(600)), encoding="utf-8")
    return path


# -- span corruption -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [5, 20, 128])
def test_span_corruption_hides_spans_behind_sentinels(n: int) -> None:
    sentinels, eos = [1000 - i for i in range(100)], 1
    for seed in range(10):
        ids = list(range(100, 100 + n))
        src, tgt = span_corrupt(ids, 0.15, 3.0, sentinels, eos, torch.Generator().manual_seed(seed))
        assert src[-1] == eos and tgt[-1] == eos
        dropped = {}  # sentinel -> the span it stands for
        for t in tgt[:-1]:
            if t in sentinels:
                dropped[t] = []
                current = t
            else:
                dropped[current].append(t)
        rebuilt = [x for t in src[:-1] for x in (dropped[t] if t in sentinels else [t])]
        assert rebuilt == ids
        noise = sum(len(v) for v in dropped.values())
        assert noise == min(max(1, round(n * 0.15)), n - 1)
        spans = sum(1 for v in dropped.values() if v)
        assert spans == max(1, min(round(noise / 3.0), n - noise))
        assert src.count(sentinels[0]) == 1 and tgt[0] == sentinels[0]


# -- pairs -------------------------------------------------------------------------------------------------------
def test_pairs_are_read_from_tsv_jsonl_and_two_files(tmp_path: Path) -> None:
    (tmp_path / "p.tsv").write_text("a b\tA B\n\nc\tC\textra\n", encoding="utf-8")
    assert read_pairs(tmp_path / "p.tsv") == [("a b", "A B"), ("c", "C")]
    (tmp_path / "p.jsonl").write_text('{"en": "hi", "de": "hallo"}\n{"en": "yes", "de": "ja"}\n', encoding="utf-8")
    assert read_pairs(tmp_path / "p.jsonl", source_field="en", target_field="de") == [("hi", "hallo"), ("yes", "ja")]
    (tmp_path / "s.txt").write_text("one\ntwo\n", encoding="utf-8")
    (tmp_path / "t.txt").write_text("eins\nzwei\n", encoding="utf-8")
    assert read_pairs(tmp_path / "s.txt", tmp_path / "t.txt") == [("one", "eins"), ("two", "zwei")]


def test_bad_pair_files_are_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "s.txt").write_text("one\ntwo\nthree\n", encoding="utf-8")
    (tmp_path / "t.txt").write_text("eins\nzwei\n", encoding="utf-8")
    with pytest.raises(LMForgeError, match="has 3 lines but .*t.txt has 2"):
        read_pairs(tmp_path / "s.txt", tmp_path / "t.txt")
    (tmp_path / "p.jsonl").write_text('{"source": "hi", "target": "x"}\n{"source": "yes"}\n', encoding="utf-8")
    with pytest.raises(LMForgeError, match=r"p.jsonl:2: no text field 'target'"):
        read_pairs(tmp_path / "p.jsonl")
    (tmp_path / "p.tsv").write_text("no tab here\n", encoding="utf-8")
    with pytest.raises(LMForgeError, match=r"p.tsv:1: expected a source and a target separated by a tab"):
        read_pairs(tmp_path / "p.tsv")
    with pytest.raises(LMForgeError, match="missing.tsv"):
        read_pairs(tmp_path / "missing.tsv")


def test_sources_and_targets_are_cut_keeping_the_end_token(tok_dir: Path) -> None:
    tok = Tokenizer.from_dir(tok_dir)
    rows = encode_pairs(tok, [("red blue green small large dog", "RED BLUE")], "x: ", max_source=4, max_target=3)
    (src, tgt), = rows
    eos = tok.token_to_id("</s>")
    assert len(src) == 4 and src[-1] == eos and len(tgt) == 3 and tgt[-1] == eos
    assert src[:3] == tok.encode("x: red blue green small large dog")[:3]


# -- the loss ----------------------------------------------------------------------------------------------------
def test_loss_is_teacher_forced_cross_entropy_with_label_smoothing() -> None:
    torch.manual_seed(0)
    model = EncoderDecoder(ModelConfig(vocab_size=50, context_length=32, **TINY))
    model.init_weights()
    rows = [([5, 6, 7, 1], [8, 9, 1]), ([5, 1], [10, 11, 12, 13, 1])]
    loss = Seq2SeqLoss(0, 0, torch.device("cpu"), False, [], 0.1)
    got = loss.loss(model, rows)[0]
    src = torch.tensor([[5, 6, 7, 1], [5, 1, 0, 0]])
    mask = (src != 0).long()
    mask[0] = 1
    dec = torch.tensor([[0, 8, 9, 0, 0], [0, 10, 11, 12, 13]])
    labels = torch.tensor([[8, 9, 1, -100, -100], [10, 11, 12, 13, 1]])
    logits = model(src, dec, mask)
    want = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, label_smoothing=0.1)
    assert torch.allclose(got, want, rtol=1e-5)
    assert not torch.allclose(got, F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100))


def test_init_gives_t5_scales() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=500, context_length=32, **(TINY | {"dim": 128, "ffn_dim": 512}))
    model = EncoderDecoder(cfg)
    model.init_weights()
    assert abs(model.tok_emb.weight.std().item() - 1.0) < 0.02
    q = model.encoder.layers[0].attn.qkv.weight[: cfg.q_dim]
    assert abs(q.std().item() - (128 * 16) ** -0.5) < 0.003
    assert abs(model.decoder.layers[1].mlp.down.weight.std().item() - 512 ** -0.5) < 0.003
    assert torch.equal(model.decoder.layers[0].cross_norm.weight, torch.ones(128))


def test_dropout_acts_in_training_only() -> None:
    torch.manual_seed(0)
    model = EncoderDecoder(ModelConfig(vocab_size=50, context_length=32, **(TINY | {"dropout": 0.3})))
    model.init_weights()
    src, dec = torch.randint(2, 50, (2, 6)), torch.randint(2, 50, (2, 5))
    model.train()
    assert not torch.equal(model(src, dec), model(src, dec))
    model.eval()
    assert torch.equal(model(src, dec), model(src, dec))
    with pytest.raises(LMForgeError, match="dropout must be in"):
        ModelConfig(vocab_size=50, **(TINY | {"dropout": 1.0}))


# -- a fresh model -----------------------------------------------------------------------------------------------
def _cfg(tsv: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=str(tsv), out=str(out), model=TINY, objective="seq2seq", batch_size=16, block_size=32,
                max_iters=60, lr=3e-3, min_lr=3e-4, warmup_iters=5, eval_interval=20, save_interval=20,
                val_fraction=0.1, label_smoothing=0.1, keep_last=5, seed=3, precision="fp32")
    return TrainConfig(**(base | kw))


# AdamW, and Adafactor (T5's optimizer: steps relative to each tensor's RMS, so a larger rate).
@pytest.mark.parametrize("opt", [{}, {"optimizer": "adafactor", "lr": 1e-2, "min_lr": 1e-3}], ids=["adamw", "adafactor"])
def test_trainer_learns_and_resumes_exactly(opt: dict, tsv: Path, tok_dir: Path, tmp_path: Path) -> None:
    tok = Tokenizer.from_dir(tok_dir)
    straight = Seq2SeqTrainer(_cfg(tsv, tmp_path / "a", **opt), tok, log=lambda s: None)
    want = torch.optim.Adafactor if opt else torch.optim.AdamW
    assert type(straight.opt) is want
    untrained = straight.evaluate()["val_loss"]
    straight.fit()
    evals = [r["val_loss"] for r in map(json.loads, (tmp_path / "a" / "metrics.jsonl").read_text().splitlines())
             if "val_loss" in r]
    assert len(evals) == 3 and evals[-1] < evals[0] < 0.8 * untrained and evals[-1] < 0.7 * untrained
    part = Seq2SeqTrainer(_cfg(tsv, tmp_path / "b", **opt), tok, log=lambda s: None)
    part.fit(until=20)
    resumed = Seq2SeqTrainer(_cfg(tsv, tmp_path / "b", **opt), tok, resume=True, log=lambda s: None)
    assert resumed.step == 20
    resumed.fit()
    for (name, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name
    # The checkpoint is an HF T5 directory lmforge loads, with the run's tokenizer.
    ck = load_checkpoint(tmp_path / "a" / "step_0000060", device="cpu")
    assert isinstance(ck.model, EncoderDecoder) and ck.tokenizer.vocab_size == tok.vocab_size


def test_an_unknown_optimizer_is_a_one_line_error(tsv: Path, tmp_path: Path) -> None:
    with pytest.raises(LMForgeError, match="optimizer must be one of adamw, adafactor, got 'sgd'"):
        _cfg(tsv, tmp_path, optimizer="sgd").validate()
    with pytest.raises(LMForgeError, match="betas are AdamW's; optimizer adafactor has none"):
        _cfg(tsv, tmp_path, optimizer="adafactor", betas=(0.9, 0.98)).validate()
    with pytest.raises(LMForgeError, match="optimizer adafactor cannot be combined with fsdp"):
        _cfg(tsv, tmp_path, optimizer="adafactor", fsdp=True).validate()


def test_a_time_budget_stops_the_run_and_fits_the_schedule(tsv: Path, tok_dir: Path, tmp_path: Path) -> None:
    run = Seq2SeqTrainer(_cfg(tsv, tmp_path / "t", max_iters=1_000_000, max_seconds=2.0, eval_interval=1000,
                              save_interval=1000), Tokenizer.from_dir(tok_dir), log=lambda s: None)
    run.fit()
    records = [json.loads(line) for line in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    assert 2.0 <= records[-1]["elapsed_s"] < 10 and records[-2]["elapsed_s"] <= 2.0  # logged to 0.01 s
    assert records[-1]["step"] == run.step == len(records)
    assert "val_loss" in records[-1] and (tmp_path / "t" / f"step_{run.step:07d}").is_dir()
    # The cosine schedule runs over the steps the budget allows: the last step's rate is near min_lr.
    peak = max(r["lr"] for r in records)
    assert records[-1]["lr"] < 3e-4 + 0.15 * (peak - 3e-4)


def test_cli_trains_a_translation_model_with_its_own_tokenizer(tmp_path: Path, capsys) -> None:
    src, tgt = tmp_path / "train.en", tmp_path / "train.de"
    pairs = _pairs(300)
    src.write_text("\n".join(s for s, _ in pairs) + "\n", encoding="utf-8")
    tgt.write_text("\n".join(t for _, t in pairs) + "\n", encoding="utf-8")
    args = ["train", "--preset", "t5-multi30k", "--data", str(src), "--target-data", str(tgt), "--out",
            str(tmp_path / "run"), "--set", "vocab_size=150", "--set", "max_seconds=0", "--set", "max_iters=6",
            "--set", "batch_size=8", "--set", "eval_interval=3", "--set", "precision=fp32"]
    args += [x for k, v in TINY.items() for x in ("--set", f"model.{k}={json.dumps(v)}")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "step 6: val_loss" in out
    ck = load_checkpoint(tmp_path / "run" / "step_0000006", device="cpu")
    assert isinstance(ck.model, EncoderDecoder) and ck.tokenizer.vocab_size == 150
    # An encoder-decoder has no chat template: its tokenizer is saved without one.
    saved = json.loads((tmp_path / "run" / "step_0000006" / "tokenizer_config.json").read_text())
    assert "chat_template" not in saved and saved["eos_token"] == "</s>"


def test_cli_span_corruption_pretraining(tmp_path: Path, capsys) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(" ".join(p) for p in _pairs(300)) + "\n", encoding="utf-8")
    args = ["train", "--preset", "t5-span", "--data", str(corpus), "--out", str(tmp_path / "run"),
            "--set", "vocab_size=200", "--set", "max_iters=30", "--set", "batch_size=8", "--set", "block_size=24",
            "--set", "eval_interval=15", "--set", "eval_iters=4", "--set", "precision=fp32", "--set", "lr=3e-3"]
    args += [x for k, v in (TINY | {"mlp": "swiglu", "activation": "gelu_tanh", "tie_embeddings": False,
                                    "output_scale": False}).items() for x in ("--set", f"model.{k}={json.dumps(v)}")]
    assert main(args) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0]
    tok = Tokenizer.from_dir(tmp_path / "run" / "tokenizer")  # T5's layout: <extra_id_0> last
    assert tok.token_to_id("<extra_id_0>") == tok.vocab_size - 1 and tok.token_to_id("<extra_id_99>") is not None


def test_span_corruption_needs_sentinels(tmp_path: Path, capsys) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(" ".join(p) for p in _pairs(200)) + "\n", encoding="utf-8")
    assert main(["train", "--preset", "t5-span", "--data", str(corpus), "--out", str(tmp_path / "run"),
                 "--set", "vocab_size=150", "--set", "sentinels=0"]) == 1
    assert "needs <extra_id_N> sentinel tokens" in capsys.readouterr().err


# -- fine-tuning ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def t5_dir(tok_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=Tokenizer.from_dir(tok_dir).vocab_size, context_length=64,
                      **(TINY | {"mlp": "swiglu", "activation": "gelu_tanh", "tie_embeddings": False,
                                 "output_scale": False}))
    model = EncoderDecoder(cfg)
    model.init_weights()
    return save_hf(model, tmp_path_factory.mktemp("t5") / "base", Tokenizer.from_dir(tok_dir))


def test_finetune_seq2seq_full_learns(t5_dir: Path, tsv: Path, tmp_path: Path, capsys) -> None:
    assert main(["finetune", "seq2seq", str(t5_dir), "--data", str(tsv), "--out", str(tmp_path / "ft"),
                 "--max-steps", "40", "--batch-size", "16", "--lr", "3e-3", "--eval-every", "20", "--samples", "0",
                 "--label-smoothing", "0.1"]) == 0
    records = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    evals = [r["val_loss"] for r in records if "val_loss" in r]
    vocab = Tokenizer.from_dir(t5_dir).vocab_size  # an untrained model's loss is about log(vocab)
    assert len(evals) == 2 and evals[1] < evals[0] and evals[1] < 0.6 * math.log(vocab)
    assert isinstance(load_checkpoint(tmp_path / "ft" / "final", device="cpu").model, EncoderDecoder)


def test_finetune_seq2seq_lora_adapter_reads_in_transformers_peft(t5_dir: Path, tsv: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    peft = pytest.importorskip("peft")
    import transformers

    from lmforge.finetune.lora import load_adapter

    monkeypatch.setenv("LMFORGE_CPU_BF16", "0")
    assert main(["finetune", "seq2seq", str(t5_dir), "--data", str(tsv), "--out", str(tmp_path / "ft"),
                 "--method", "lora", "--max-steps", "10", "--batch-size", "16", "--lr", "1e-2", "--samples", "0"]) == 0
    config = json.loads((tmp_path / "ft" / "final" / "adapter_config.json").read_text())
    assert {"q", "k", "v", "o", "wi_0", "wi_1", "wo"} <= set(config["target_modules"])
    base = load_checkpoint(t5_dir, device="cpu", dtype=torch.float32).model.eval()
    tuned = load_checkpoint(t5_dir, device="cpu", dtype=torch.float32).model
    load_adapter(tuned, tmp_path / "ft" / "final")
    tuned.eval()
    src, dec = torch.randint(3, 100, (2, 7)), torch.randint(3, 100, (2, 5))
    dec[:, 0] = 0
    with torch.no_grad():
        ours, before = tuned(src, dec), base(src, dec)
        hf = transformers.T5ForConditionalGeneration.from_pretrained(t5_dir).eval()
        theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "ft" / "final").eval()(
            input_ids=src, decoder_input_ids=dec).logits
    assert (ours - before).abs().max() > 1e-3  # the adapter was trained
    assert_close_scaled(ours, theirs, 1e-4)


def test_sft_refuses_an_encoder_decoder_and_seq2seq_a_decoder(t5_dir: Path, tsv: Path, tmp_path: Path,
                                                              capsys) -> None:
    from tiny import make_tiny_llama_dir

    chat = tmp_path / "chat.jsonl"
    chat.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    assert main(["finetune", "sft", str(t5_dir), "--data", str(chat), "--out", str(tmp_path / "a")]) == 1
    assert "is an encoder-decoder: fine-tune it with `lmforge finetune seq2seq`" in capsys.readouterr().err
    llama = make_tiny_llama_dir(tmp_path / "llama")
    assert main(["finetune", "seq2seq", str(llama), "--data", str(tsv), "--out", str(tmp_path / "b")]) == 1
    assert "trains encoder-decoders (T5, BART)" in capsys.readouterr().err
