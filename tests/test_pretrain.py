"""The pretraining loop: the loss falls, checkpoints load everywhere, and resume is bit-exact on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from numerics import assert_close_scaled
from tiny import train_tokenizer

from lmforge.errors import LMForgeError
from lmforge.formats import load_checkpoint
from lmforge.tokenizer import Tokenizer
from lmforge.train.data import prepare
from lmforge.train.loop import OptimConfig, learning_rate, timed_schedule
from lmforge.train.pretrain import TrainConfig, Trainer

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
        assert_close_scaled(ck.model(x), trainer.model(x), 1e-6)
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
    # A shape its checkpoints (HF directories) cannot hold is refused before training, not at the first save.
    with pytest.raises(LMForgeError, match="an HF GPT-2 has biases"):
        Trainer(_cfg(data, tmp_path / "nb", model=MODEL | {"family": "gpt2", "qkv_bias": False}))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "metadata.json").write_text("{not json")
    with pytest.raises(LMForgeError, match="metadata.json: invalid JSON"):
        Trainer(_cfg(tmp_path / "broken", tmp_path / "b"))
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
             "--set", "save_interval=4", "--set", "block_size=48", "--device", "cpu"]
    out = tmp_path / "run"
    assert main(["train", "--preset", "shakespeare-char", "--data", str(corpus), "--out", str(out),
                 "--set", "max_iters=4", *small]) == 0
    assert "val_loss" in capsys.readouterr().out
    assert main(["train", "--preset", "shakespeare-char", "--out", str(out), "--resume",
                 "--set", "max_iters=8", *small]) == 0
    assert (out / "step_0000008" / "model.safetensors").exists()
    assert main(["generate", str(out / "step_0000008"), "The", "--max-tokens", "5", "--seed", "1"]) == 0
    assert main(["info", str(out / "step_0000008")]) == 0
    assert "gpt2" in capsys.readouterr().out
    import io

    import lmforge

    with pytest.MonkeyPatch.context() as mp:  # one-shot chat with the default ChatML template
        mp.setattr("sys.stdin", io.StringIO("Who art thou?\n"))  # ~30 tokens: fits block_size 48
        assert main(["chat", str(out / "step_0000008"), "--max-tokens", "5", "--seed", "1"]) == 0
    lm = lmforge.load(out / "step_0000008", device="cpu")
    assert isinstance(lm.generate("The", max_tokens=4, temperature=0), str)
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


def _torchrun(data: Path, out: Path, *extra: str) -> list[float]:
    """Train on 2 gloo processes with half the batch each; returns the loss of every step in metrics.jsonl."""
    import subprocess
    import sys

    settings = {"model.dim": 32, "model.n_layers": 2, "model.n_heads": 2, "model.ffn_dim": 64,
                "model.tie_embeddings": "true", "batch_size": 4, "block_size": 16, "max_iters": 20, "lr": 3e-3,
                "min_lr": 3e-4, "warmup_iters": 2, "eval_interval": 10, "eval_iters": 2, "save_interval": 10}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lmforge", "train", "--data", str(data), "--out", str(out), "--device", "cpu", *extra]
    for k, v in settings.items():
        cmd += ["--set", f"{k}={v}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("step 20: val_loss") == 1  # rank 0 alone reports
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 21))  # one writer, no duplicates
    return [r["loss"] for r in records]


@pytest.mark.slow
def test_ddp_and_fsdp_match_one_process(data: Path, tmp_path: Path) -> None:
    single = Trainer(_cfg(data, tmp_path / "single", batch_size=8), log=lambda s: None)
    reference = single.fit()

    # Gradients summed across processes instead of over one batch: the same losses up to rounding.
    ddp = _torchrun(data, tmp_path / "ddp")
    assert_close_scaled(ddp, reference, 2e-5)

    fsdp = _torchrun(data, tmp_path / "fsdp", "--fsdp")
    assert_close_scaled(fsdp, reference, 2e-5)
    # The FSDP checkpoint holds the whole, gathered weights.
    ck = load_checkpoint(tmp_path / "fsdp" / "step_0000020", device="cpu", dtype=torch.float32)
    for name, p in single.model.state_dict().items():
        torch.testing.assert_close(ck.model.state_dict()[name], p, rtol=0, atol=1e-4, msg=name)

    # Resume under FSDP from step 10: the later steps match the uninterrupted run.
    import shutil

    shutil.rmtree(tmp_path / "fsdp" / "step_0000020")
    resumed = _torchrun(data, tmp_path / "fsdp", "--fsdp", "--resume")
    assert_close_scaled(resumed, reference, 2e-5)

    # A DDP checkpoint resumes in one process with twice the batch.
    shutil.copytree(tmp_path / "ddp" / "step_0000010", tmp_path / "cross" / "step_0000010")
    rest = Trainer(_cfg(data, tmp_path / "cross", batch_size=8), resume=True, log=lambda s: None).fit()
    assert len(rest) == 10
    assert_close_scaled(rest, reference[10:], 2e-5)


def test_presets_have_the_published_sizes() -> None:
    from lmforge.model import ModelConfig, Transformer
    from lmforge.train.presets import PRESETS

    # nanoGPT's GPT-2 small with the 50257-token GPT-2 vocabulary, and SmolLM2-135M's shape.
    for name, vocab, expected in (("gpt2-124m", 50257, 124_439_808), ("llama-135m", 49152, 134_515_008)):
        recipe = PRESETS[name]
        with torch.device("meta"):
            model = Transformer(ModelConfig(vocab_size=vocab, context_length=recipe["block_size"], **recipe["model"]))
        assert model.num_params() == expected, name
        TrainConfig(data="", out="", **{k: v for k, v in recipe.items()
                                        if k not in ("tokenizer", "vocab_size", "val_fraction")}).validate()


def test_activation_checkpointing_gives_the_same_steps(data: Path, tmp_path: Path) -> None:
    plain = Trainer(_cfg(data, tmp_path / "a", max_iters=6), log=lambda s: None).fit()
    ckpt = Trainer(_cfg(data, tmp_path / "b", max_iters=6, activation_checkpointing=True), log=lambda s: None)
    assert ckpt.model.grad_checkpointing
    assert_close_scaled(ckpt.fit(), plain, 2e-7)  # the same operations, recomputed: within an ulp or two


def test_bf16_autocast_trains(data: Path, tmp_path: Path) -> None:
    fp32 = Trainer(_cfg(data, tmp_path / "a", max_iters=8), log=lambda s: None).fit()
    bf16 = Trainer(_cfg(data, tmp_path / "b", max_iters=8, precision="bf16"), log=lambda s: None).fit()
    assert bf16 != fp32  # bf16 matmuls really ran ...
    assert bf16 == pytest.approx(fp32, rel=0.01)  # ... and train the same model


@pytest.mark.slow
def test_compiled_blocks_match_eager(data: Path, tmp_path: Path) -> None:
    eager = Trainer(_cfg(data, tmp_path / "a", max_iters=4), log=lambda s: None).fit()
    compiled = Trainer(_cfg(data, tmp_path / "b", max_iters=4, compile=True), log=lambda s: None).fit()
    assert_close_scaled(compiled, eager, 2e-5)  # fused kernels round differently


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_checkpoint_loads_in_transformers_with_identical_logits(data: Path, tmp_path: Path, family: str) -> None:
    transformers = pytest.importorskip("transformers")
    model = MODEL if family == "llama" else {"family": "gpt2", "dim": 32, "n_layers": 2, "n_heads": 2,
                                            "ffn_dim": 64, "norm": "layernorm", "mlp": "gelu",
                                            "activation": "gelu_tanh", "position": "learned",
                                            "tie_embeddings": True, "qkv_bias": True, "out_bias": True,
                                            "mlp_bias": True}
    trainer = Trainer(_cfg(data, tmp_path / "run", model=model, max_iters=10), log=lambda s: None)
    trainer.fit()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "step_0000010").float().eval()
    assert type(hf).__name__ == {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}[family]
    x = torch.randint(0, trainer.model_cfg.vocab_size, (2, 16))
    with torch.no_grad():
        assert_close_scaled(hf(x).logits, trainer.model.eval()(x), 1e-5)
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path / "run" / "step_0000010")
    assert tok.encode("The quick fox") == trainer.tokenizer.encode("The quick fox")


def test_cli_bad_inputs_leave_the_run_intact(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lmforge.cli import main

    small = ["--set", "model.dim=32", "--set", "model.n_layers=1", "--set", "model.n_heads=2",
             "--set", "model.ffn_dim=64", "--set", "block_size=16", "--set", "eval_iters=2", "--device", "cpu"]
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(out), "--set", "max_iters=2", *small]) == 0
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name != "metrics.jsonl"}
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cases = [
        (["--data", str(tmp_path / "missing.txt"), "--preset", "shakespeare-char"], "missing.txt"),
        (["--data", str(empty), "--preset", "shakespeare-char"], "empty corpus"),
        (["--data", str(data), "--set", "model.n_heads=3"], "not divisible by n_heads"),
        (["--data", str(data), "--resume", "--set", "model.ffn_dim=96"], "model config differs"),
        (["--data", str(data), "--set", "precision=fp8"], "precision must be"),
        (["--data", str(data), "--set", "batch_size=0"], "batch_size must be a positive integer"),
        (["--preset", "nope"], "unknown preset"),
    ]
    capsys.readouterr()
    for extra, message in cases:
        target = out if "--resume" in extra else tmp_path / "other"
        assert main(["train", "--out", str(target), *small, *extra]) == 1, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("lmforge: error:") and message in err[0], (extra, err)
    (out / "step_0000002" / "model.safetensors").write_bytes(b"garbage")
    before[out / "step_0000002" / "model.safetensors"] = b"garbage"
    assert main(["train", "--data", str(data), "--out", str(out), "--resume", "--set", "max_iters=4", *small]) == 1
    assert "cannot read the checkpoint's weights" in capsys.readouterr().err
    after = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name != "metrics.jsonl"}
    assert after == before  # nothing already on disk was touched


BERT = {"family": "bert", "dim": 32, "n_layers": 2, "n_heads": 2, "ffn_dim": 64, "norm": "layernorm",
        "norm_eps": 1e-12, "norm_position": "post", "mlp": "gelu", "activation": "gelu", "position": "learned",
        "causal": False, "type_vocab_size": 2, "head": "mlm", "tie_embeddings": True, "qkv_bias": True,
        "out_bias": True, "mlp_bias": True}


@pytest.fixture(scope="module")
def mlm_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lmforge.train.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("mlm")
    (root / "corpus.txt").write_text(TEXT * 2, encoding="utf-8")
    tok = Tokenizer.from_dir(train_bpe([root / "corpus.txt"], 400, root / "tok", progress=False))
    prepare([root / "corpus.txt"], tok, root / "data", val_fraction=0.2, workers=1, progress=False)
    return root / "data"


def test_masking_follows_bert() -> None:
    from lmforge.train.pretrain import Batches, Masking

    tokens = np.arange(5, 105, dtype=np.int64).repeat(50) % 100 + 5
    batches = Batches(tokens, TrainConfig(data="", out="", batch_size=64, block_size=64), seed=0)
    x, y = batches.next(torch.device("cpu"), Masking(mask_id=1, vocab_size=105, never=(0,)))
    chosen = y != -100
    assert 0.13 < chosen.float().mean() < 0.17  # 15% of the tokens are predicted
    masked = (x == 1) & chosen
    assert 0.75 < masked.sum() / chosen.sum() < 0.85  # 80% of those become the mask token
    kept_or_random = chosen & ~masked
    assert 0.15 < kept_or_random.sum() / chosen.sum() < 0.25  # the rest: random (10%) or unchanged (10%)
    assert (x[~chosen] != 1).all()  # nothing outside the chosen positions is touched ...
    again = Batches(tokens, TrainConfig(data="", out="", batch_size=64, block_size=64), seed=0)
    assert torch.equal(again.next(torch.device("cpu"), Masking(1, 105, never=(0,)))[1], y)  # ... and reproducible

    starts = torch.zeros(105, dtype=torch.bool)
    starts[::3] = True  # whole words: ids 0-2, 3-5, ... are the pieces of one word
    x, y = Batches(np.tile(np.arange(105), 60), TrainConfig(data="", out="", batch_size=32, block_size=63),
                   seed=1).next(torch.device("cpu"), Masking(1, 105, 0.3, word_start=starts))
    chosen = y != -100
    original = torch.where(chosen, y, x)  # undo the corruption to see the words
    cont = ~starts[original]
    cont[:, 0] = False
    assert 0.2 < chosen.float().mean() < 0.4
    assert torch.equal(chosen[:, 1:][cont[:, 1:]], chosen[:, :-1][cont[:, 1:]])  # a word is chosen whole


def test_mlm_trains_and_exports_as_bert_for_masked_lm(mlm_data: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    trainer = Trainer(_cfg(mlm_data, tmp_path / "run", model=BERT, objective="mlm", max_iters=60, save_interval=60,
                           eval_interval=30), log=lambda s: None)
    losses = trainer.fit()
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:5]) / 5
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "val_loss" in record and "val_bpb" not in record and "samples" not in record
    path = tmp_path / "run" / "step_0000060"
    hf = transformers.AutoModelForMaskedLM.from_pretrained(path).float().eval()
    assert type(hf).__name__ == "BertForMaskedLM"
    x = torch.randint(0, trainer.model_cfg.vocab_size, (2, 16))
    with torch.no_grad():
        ours = trainer.model.eval()(x)
        assert_close_scaled(hf(x).logits, ours, 1e-5)
        ck = load_checkpoint(path, device="cpu", dtype=torch.float32)
        assert_close_scaled(ck.model(x), ours, 1e-6)
    assert transformers.AutoTokenizer.from_pretrained(path).mask_token == "<|mask|>"


def test_mlm_bad_setups(mlm_data: Path, data: Path, tmp_path: Path) -> None:
    with pytest.raises(LMForgeError, match="bidirectional encoder with a masked-LM head"):
        Trainer(_cfg(mlm_data, tmp_path / "a", objective="mlm"))  # a causal Llama
    with pytest.raises(LMForgeError, match="needs a mask token"):
        Trainer(_cfg(data, tmp_path / "b", model=BERT, objective="mlm"))  # a tokenizer without a mask
    with pytest.raises(LMForgeError, match="objective must be"):
        Trainer(_cfg(mlm_data, tmp_path / "c", objective="t5"))


def test_a_time_budget_fits_the_schedule_and_a_warmup_fraction() -> None:
    # 100 steps in 10 s of a 60 s budget: the run is on course for 600 steps, the cap being 18,000.
    fitted = timed_schedule(OptimConfig(lr=1.0, max_iters=18_000, warmup_iters=540, warmup_fraction=0.03,
                                        max_seconds=60.0), 100, 10.0)
    assert (fitted.max_iters, fitted.warmup_iters) == (600, 18)
    assert learning_rate(fitted, 18) == pytest.approx(1.0) and learning_rate(fitted, 599) < 1e-3
    # An absolute warmup (pretraining's warmup_iters) stays as it is; no budget leaves the schedule alone.
    fixed = timed_schedule(OptimConfig(lr=1.0, max_iters=1_000_000, warmup_iters=300, max_seconds=60.0), 100, 10.0)
    assert (fixed.max_iters, fixed.warmup_iters) == (600, 300)
    plain = OptimConfig(lr=1.0, max_iters=18_000, warmup_iters=540, warmup_fraction=0.03)
    assert timed_schedule(plain, 100, 10.0) is plain
