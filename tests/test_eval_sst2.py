"""The built-in `sst2` task: a TSV file found under $LMFORGE_DATA, its labels mapped to the two choices."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny import CHATML_TEMPLATE, train_tokenizer

from lmforge.errors import LMForgeError
from lmforge.eval.runner import encode_pair
from lmforge.eval.tasks import get_task, load_items
from lmforge.tokenizer import Tokenizer

ROWS = [("a gorgeous , witty , seductive movie . ", 1), ("the plot is nothing but boilerplate clichés ", 0),
        ("it 's a charming and often affecting journey . ", 1)]


def _data(root: Path) -> Path:
    d = root / "sst2"
    d.mkdir(parents=True)
    (d / "train_heldout.tsv").write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in ROWS), encoding="utf-8")
    return d / "train_heldout.tsv"


def test_sst2_spec_reads_the_held_out_tsv_and_maps_labels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LMFORGE_DATA", str(tmp_path / "nowhere"))
    spec = get_task("sst2")
    assert (spec.kind, spec.format, spec.data) == ("multiple_choice", "tsv", "sst2/train_heldout.tsv")
    with pytest.raises(LMForgeError, match=r"sst2/train_heldout.tsv under \$LMFORGE_DATA"):
        load_items(spec)
    path = _data(tmp_path / "data")
    monkeypatch.setenv("LMFORGE_DATA", str(tmp_path / "data"))
    items, found = load_items(spec)  # no path given: the default file, resolved under $LMFORGE_DATA
    assert found == path and len(items) == len(ROWS)
    for it, (sentence, label) in zip(items, ROWS):
        assert it.continuations == ["negative", "positive"]
        assert it.continuations[it.gold] == ("positive" if label else "negative")
        assert it.contexts[0] == (f"Review: {sentence.strip()}\n"
                                  "Question: Is the sentiment of this movie review positive or negative?\nAnswer:")


def test_sst2_choices_follow_the_prompt_in_both_modes() -> None:
    tok = Tokenizer(train_tokenizer(), bos_token="<|endoftext|>", eos_token="<|im_end|>", chat_template=CHATML_TEMPLATE)
    spec = get_task("sst2")
    ctx = "Review: fine\nQuestion: Is the sentiment of this movie review positive or negative?\nAnswer:"
    # Plain: the delimiter puts the space before the word. Chat (--chat renders the context as the user
    # turn): the word opens the assistant's reply, as the SFT data's replies do.
    _, plain = encode_pair(tok, ctx, spec.target_delimiter + "positive", True)
    assert tok.decode(plain) == " positive"
    chat_ctx = tok.apply_chat_template([{"role": "user", "content": ctx}], add_generation_prompt=True)
    assert chat_ctx.endswith("<|im_start|>assistant\n")
    _, chat = encode_pair(tok, chat_ctx, "negative", False)
    assert tok.decode(chat) == "negative"
