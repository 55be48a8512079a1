"""Encoder models (BERT family): parity with transformers and sentence-transformers, export, embeddings."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from numerics import assert_close_scaled
from tiny import make_tiny_bert_dir, randomize

import lmforge
from lmforge.analysis import cosine_matrix, kmeans, pca_2d
from lmforge.cli import main
from lmforge.encoders.pooling import Pooling, read_pooling
from lmforge.formats import load_checkpoint
from lmforge.formats.export import save_hf

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-4  # relative to the outputs' magnitude (see numerics.assert_close_scaled)
VOCAB = 200


@dataclass
class Variant:
    name: str
    build: str  # transformers class
    config: dict


_BERT = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=40, type_vocab_size=2, layer_norm_eps=1e-12, pad_token_id=0)
VARIANTS = [
    Variant("bert", "BertModel", dict(_BERT)),
    Variant("bert-mlm", "BertForMaskedLM", dict(_BERT, hidden_act="gelu_new")),
    Variant("roberta", "RobertaModel", dict(_BERT, type_vocab_size=1, pad_token_id=1, max_position_embeddings=42)),
    Variant("roberta-mlm", "RobertaForMaskedLM", dict(_BERT, type_vocab_size=1, pad_token_id=1,
                                                      max_position_embeddings=42)),
]


def _batch(seed: int, types: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three right-padded rows of different lengths (the first one fills the context), with token types."""
    g = torch.Generator().manual_seed(seed)
    lengths = (38, 7, 19)
    ids = torch.zeros(3, 38, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(5, VOCAB, (n,), generator=g)
        mask[i, :n] = 1
    tt = torch.randint(0, types, ids.shape, generator=g) * mask
    return ids, mask, tt


def _outputs(hf: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, tt: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask, token_type_ids=tt)
    if hasattr(out, "logits"):
        return {"logits": out.logits}
    return {"hidden": out.last_hidden_state, "pooled": out.pooler_output}


def _ours(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, tt: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        y = model(ids, attn_mask=mask, token_types=tt)
    if model.cfg.head == "mlm":
        return {"logits": y}
    return {"hidden": y, "pooled": model.pooled(y)}


@pytest.mark.parametrize("v", VARIANTS, ids=[v.name for v in VARIANTS])
def test_tiny_encoder_matches_transformers_and_exports(v: Variant, tmp_path: Path) -> None:
    seed = 7 + VARIANTS.index(v)
    torch.manual_seed(seed)
    cls = getattr(transformers, v.build)
    hf = cls(cls.config_class(**v.config)).float().eval()
    randomize(hf, seed, std=0.15)
    hf.save_pretrained(tmp_path / "hf")
    ck = load_checkpoint(tmp_path / "hf", device="cpu", dtype=torch.float32)
    cfg = ck.config
    assert cfg.family == "bert" and not cfg.causal and cfg.norm_position == "post"
    assert cfg.head == ("mlm" if v.build.endswith("MaskedLM") else "none")
    assert ck.model.num_params() == sum(p.numel() for p in hf.parameters()) - 2 * 32 * ("roberta" in v.name)

    ids, mask, tt = _batch(seed, v.config["type_vocab_size"])
    want, got = _outputs(hf, ids, mask, tt), _ours(ck.model, ids, mask, tt)
    real = mask.bool()
    for key, ref in want.items():
        ours = got[key]
        sel = (ours[real], ref[real]) if key != "pooled" else (ours, ref)
        assert sel[1].abs().max() > 0.5, "outputs too small for the tolerance to mean anything"
        assert_close_scaled(sel[0], sel[1], TOL, msg=f"{v.name} {key}")

    # Export: transformers loads our directory into the same model, and so do we.
    out = save_hf(ck.model, tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["architectures"] == [v.build]
    again = cls.from_pretrained(out).float().eval()
    for key, ref in _outputs(again, ids, mask, tt).items():
        sel = (ref[real], want[key][real]) if key != "pooled" else (ref, want[key])
        assert_close_scaled(sel[0], sel[1], 1e-5, msg=f"{v.name} {key} after export")
    reloaded = _ours(load_checkpoint(out, device="cpu", dtype=torch.float32).model, ids, mask, tt)
    for key in want:
        assert torch.equal(reloaded[key], got[key])


SENTENCES = [
    "A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
    "A man is riding a horse.", "A woman is playing violin.", "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.", "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.", "The new movie is awesome!",
    "The cat sits outside", "I love pasta", "Do you like pizza?", "Quantum chromodynamics describes quarks.",
    "Café, naïve, résumé, déjà vu — UNICODE and ACCENTS.", "北京是中国的首都。", "Emoji: 🎉🚀 are fun",
    "   leading and trailing spaces   ", "", "x", "Numbers 3.14159 and 2,718 and 1e-9",
    "A long text. " * 150, "tabs\tand\nnewlines\n\nin one text", "don't won't can't shouldn't've",
]


@pytest.fixture(scope="module")
def minilm(minilm_path: Path) -> lmforge.LM:
    return lmforge.load(minilm_path, device="cpu")


# The fp32 path matches sentence-transformers to 1e-5 in cosine; the bf16 products that CPUs with fast
# bf16 use by default (quant/cpu.py) to ~5e-5 (measured 0.99996 at worst).
MIN_COSINE = {"0": 0.99999, "1": 0.9998}


@pytest.mark.parametrize("bf16", ["0", "1"])
def test_minilm_matches_sentence_transformers(minilm: lmforge.LM, minilm_path: Path, bf16: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    st = pytest.importorskip("sentence_transformers")
    ref_model = st.SentenceTransformer(str(minilm_path), device="cpu")
    assert minilm.is_encoder and minilm.pooling == Pooling("mean", True, 256)
    monkeypatch.setenv("LMFORGE_CPU_BF16", bf16)
    ours = minilm.embed(SENTENCES)
    ref = ref_model.encode(SENTENCES, convert_to_numpy=True, batch_size=7)
    assert ours.shape == ref.shape == (len(SENTENCES), 384) and ours.dtype == np.float32
    cos = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    low = f"lowest cosine {cos.min():.7f} for {SENTENCES[int(cos.argmin())]!r}"
    assert cos.min() >= MIN_COSINE[bf16], low
    if bf16 == "1":
        assert cos.min() < 0.9999999, low  # really the bf16 products, not a silent fp32 fallback
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)  # the Normalize module is honoured
    # Tokenizer ids: identical to transformers' tokenizer, including truncation at max_seq_length (256).
    hf_tok = ref_model.tokenizer
    for text in SENTENCES:
        want = hf_tok(text, truncation=True, max_length=256)["input_ids"]
        assert minilm.tokenizer.encode_batch([text], max_length=256)[0] == want, text
        assert minilm.tokenizer.encode(text) == hf_tok(text)["input_ids"]
    # Meaning: paraphrases are closer than unrelated sentences.
    sim = cosine_matrix(ours)
    assert sim[0, 1] > 0.5 > sim[0, 13]


def test_encoder_cannot_generate(minilm: lmforge.LM) -> None:
    with pytest.raises(lmforge.LMForgeError, match="encoder"):
        minilm.generate("hello")
    with pytest.raises(lmforge.LMForgeError, match="encoder"):
        minilm.chat("hello")


def test_decoder_embeddings_are_mean_pooled_hidden_states(tmp_path: Path) -> None:
    from tiny import make_tiny_llama_dir

    lm = lmforge.load(make_tiny_llama_dir(tmp_path / "llama"), device="cpu")
    assert read_pooling(lm.path).mode == "mean"
    texts = ["hello world", "The cat sat on the mat, then the cat ate the fish."]
    vecs = lm.embed(texts, batch_size=2)
    for text, vec in zip(texts, vecs):
        ids = torch.tensor([lm.tokenizer.encode(text)])
        with torch.no_grad():
            want = lm.model(ids, return_hidden=True)[0].mean(0).numpy()
        assert_close_scaled(vec, want, 1e-5)  # padding in the batch changes nothing


def test_kmeans_and_pca() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 5
    x = np.concatenate([c + rng.normal(size=(20, 16)) * 0.3 for c in centres])
    labels, cent = kmeans(x, 3, cosine=False)
    assert cent.shape == (3, 16)
    for g in range(3):  # every true group lands in one cluster, and the three clusters differ
        assert len(set(labels[g * 20:(g + 1) * 20])) == 1
    assert len(set(labels)) == 3
    xy = pca_2d(x)
    assert xy.shape == (60, 2) and xy[:, 0].var() >= xy[:, 1].var() > 0
    with pytest.raises(lmforge.LMForgeError, match="clusters"):
        kmeans(x[:2], 3)


def test_cli_embed_similarity_plot(minilm_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    texts = ["I love pasta", "Spaghetti is my favourite food", "The stock market fell today",
             "Shares dropped sharply this morning"]
    src = tmp_path / "texts.jsonl"
    src.write_text("".join(json.dumps({"body": t}) + "\n" for t in texts), encoding="utf-8")
    m = str(minilm_path)
    assert main(["embed", m, "--input", str(src), "--text-field", "body", "--out", str(tmp_path / "e.npy"),
                 "--plot", str(tmp_path / "e.png"), "--clusters", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    clusters = [int(line.split("\t")[0]) for line in out]
    assert clusters[0] == clusters[1] != clusters[2] == clusters[3]  # food vs finance
    vecs = np.load(tmp_path / "e.npy")
    assert vecs.shape == (4, 384)
    assert (tmp_path / "e.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["embed", m, "hello", "--device", "cpu"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["text"] == "hello" and len(rec["embedding"]) == 384
    assert main(["similarity", m, *texts[:2], "--device", "cpu"]) == 0
    assert float(capsys.readouterr().out) > 0.5
    assert main(["generate", m, "hi", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "encoder" in err and len(err.strip().splitlines()) == 1


def test_tiny_bert_dir_embeds_and_reloads(tmp_path: Path) -> None:
    d = make_tiny_bert_dir(tmp_path / "bert", ["hello", "world", "cats", "dogs"])
    lm = lmforge.load(d, device="cpu")
    assert lm.config.pooler and lm.pooling.mode == "mean"
    vecs = lm.embed(["hello world", "cats and dogs", "hello world"])
    assert vecs.shape == (3, 32) and np.allclose(vecs[0], vecs[2])
    assert lm.tokenizer.encode("Hello world") == [2, lm.tokenizer.token_to_id("hello"),
                                                  lm.tokenizer.token_to_id("world"), 3]
