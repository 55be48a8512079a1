"""Exporting to HF directories: a GGUF model with its tokenizer, and atomic replacement."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from numerics import assert_close_scaled
from tiny import write_tiny_gguf

from lmforge.formats import export, load_checkpoint

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["hello world", "The quick brown fox.", "<|im_start|>user\nhi<|im_end|>"]


def test_gguf_to_hf_with_tokenizer(tmp_path: Path) -> None:
    ck = load_checkpoint(write_tiny_gguf(tmp_path / "tiny.gguf"), device="cpu", dtype=torch.float32)
    out = export.save_hf(ck.model, tmp_path / "hf", ck.tokenizer)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    for text in TEXTS:
        assert hf_tok(text)["input_ids"] == ck.tokenizer.encode(text)
    msgs = [{"role": "user", "content": "hi"}]
    assert hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        ck.tokenizer.apply_chat_template(msgs)
    ids = torch.tensor([ck.tokenizer.encode(TEXTS[1])])
    with torch.no_grad():
        assert_close_scaled(hf_model(ids).logits, ck.model(ids), 1e-4)
    again = load_checkpoint(out, device="cpu", dtype=torch.float32)
    assert again.tokenizer is not None and again.tokenizer.encode(TEXTS[2]) == ck.tokenizer.encode(TEXTS[2])


def test_failed_export_leaves_the_old_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ck = load_checkpoint(write_tiny_gguf(tmp_path / "tiny.gguf"), device="cpu", dtype=torch.float32)
    out = export.save_hf(ck.model, tmp_path / "hf", ck.tokenizer)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(export, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        export.save_hf(ck.model, out, ck.tokenizer)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left
