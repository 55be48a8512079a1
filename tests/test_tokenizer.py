"""Tokenizer: chat templates (against transformers), the default ChatML template, streaming detokenization
and rebuilding a tokenizer from GGUF metadata (including the unsupported cases)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny import CHATML_TEMPLATE, SPECIAL_TOKENS, train_tokenizer
from tokenizers import Tokenizer as HFTokenizer

from lmforge.errors import LMForgeError
from lmforge.tokenizer import GGUF_PRE_TOKENIZERS, Tokenizer

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": 'Say "héllo" 😀 & <b>'},
    {"role": "assistant", "content": "héllo"},
    {"role": "user", "content": "again, in 中文"},
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
# Multi-line blocks (trim_blocks / lstrip_blocks matter), bos/eos, tojson (non-ASCII stays as is), tools,
# loop variables, a namespace and add_generation_prompt: the features real chat templates use.
CUSTOM_TEMPLATE = """{{ bos_token }}
{% set ns = namespace(n=0) %}
{% if tools %}
<tools>{{ tools | tojson }}</tools>
{% endif %}
{% for message in messages %}
    {% set ns.n = ns.n + 1 %}
    {% if message['role'] == 'system' %}
SYS({{ message['content'] }})
    {% else %}
<{{ message['role'] }} i={{ loop.index0 }}>{{ message['content'] | tojson }}{{ eos_token }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
<assistant n={{ ns.n }}>
{% endif %}"""


@pytest.fixture(scope="module")
def hf_tok() -> HFTokenizer:
    return train_tokenizer()


def _tok_dir(tmp: Path, hf: HFTokenizer, **config: object) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    hf.save(str(tmp / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False, **config}
    (tmp / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return tmp


def _with_template(hf: HFTokenizer, template: str | None, **special: str) -> Tokenizer:
    return Tokenizer(hf, chat_template=template, **special)


# -- chat templates --------------------------------------------------------------------------------
def test_raise_exception_in_template_is_an_lmforge_error(hf_tok: HFTokenizer) -> None:
    tmpl = ("{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
            "{{ raise_exception('Only user and assistant roles are supported, got ' + m['role']) }}"
            "{% endif %}{{ m['content'] }}{% endfor %}")
    tok = _with_template(hf_tok, tmpl)
    assert tok.apply_chat_template([{"role": "user", "content": "ok"}]) == "ok"
    with pytest.raises(LMForgeError, match="Only user and assistant roles are supported, got tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_template_syntax_error_is_an_lmforge_error(hf_tok: HFTokenizer) -> None:
    tok = _with_template(hf_tok, "{% for m in messages %}{{ m['content'] }}")  # no endfor
    with pytest.raises(LMForgeError, match="invalid chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_bos_eos_and_generation_prompt(hf_tok: HFTokenizer) -> None:
    tmpl = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}{{ eos_token }}{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
    tok = _with_template(hf_tok, tmpl, bos_token="<|endoftext|>", eos_token="<|im_end|>")
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs) == "<|endoftext|>user:hi<|im_end|>assistant:"
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == "<|endoftext|>user:hi<|im_end|>"
    # The special tokens in the rendered text encode as single ids, and encode_chat adds nothing around them.
    ids = tok.encode_chat(msgs)
    assert ids[0] == hf_tok.token_to_id("<|endoftext|>")
    assert hf_tok.token_to_id("<|im_end|>") in ids
    assert tok.decode(ids, skip_special_tokens=False) == "<|endoftext|>user:hi<|im_end|>assistant:"


def test_tools_are_passed_to_the_template(hf_tok: HFTokenizer) -> None:
    tmpl = ("{% if tools %}{% for t in tools %}[tool {{ t['function']['name'] }}]{% endfor %}{% endif %}"
            "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    tok = _with_template(hf_tok, tmpl)
    msgs = [{"role": "user", "content": "weather?"}]
    assert tok.apply_chat_template(msgs, tools=TOOLS) == "[tool get_weather]weather?"
    assert tok.apply_chat_template(msgs) == "weather?"


def test_tojson_filter(hf_tok: HFTokenizer) -> None:
    tok = _with_template(hf_tok, "{{ messages[0]['content'] | tojson }}|{{ messages[0] | tojson }}")
    content = 'a "quote" <b> & é 😀'
    out = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=False)
    left, right = out.split("|", 1)
    # Like transformers: plain json.dumps, no HTML escaping, non-ASCII kept.
    assert left == json.dumps(content, ensure_ascii=False)
    assert json.loads(right) == {"role": "user", "content": content}
    assert "\\u" not in out and "&#" not in out


def test_matches_transformers_apply_chat_template(hf_tok: HFTokenizer, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    d = _tok_dir(tmp_path / "tok", hf_tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                 chat_template=CUSTOM_TEMPLATE)
    ours = Tokenizer.from_dir(d)
    theirs = transformers.AutoTokenizer.from_pretrained(str(d))
    cases = [
        dict(add_generation_prompt=True),
        dict(add_generation_prompt=False),
        dict(add_generation_prompt=True, tools=TOOLS),
    ]
    for kw in cases:
        expected = theirs.apply_chat_template(MESSAGES, tokenize=False, **kw)
        got = ours.apply_chat_template(MESSAGES, **kw)
        assert got == expected, kw
    assert "<tools>" in ours.apply_chat_template(MESSAGES, tools=TOOLS)
    assert ours.apply_chat_template(MESSAGES).endswith("<assistant n=4>\n")
    # Token ids agree too (the rendered specials are matched as whole tokens by both).
    expected_ids = theirs.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)
    if isinstance(expected_ids, dict) or hasattr(expected_ids, "keys"):
        expected_ids = expected_ids["input_ids"]
    assert ours.encode_chat(MESSAGES) == list(expected_ids)


def test_chatml_template_matches_transformers(hf_tok: HFTokenizer, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    d = _tok_dir(tmp_path / "tok", hf_tok, eos_token="<|im_end|>", chat_template=CHATML_TEMPLATE)
    theirs = transformers.AutoTokenizer.from_pretrained(str(d))
    ours = Tokenizer.from_dir(d)
    assert ours.apply_chat_template(MESSAGES) == theirs.apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=True)


def test_default_chatml_template_when_the_model_has_none(hf_tok: HFTokenizer, tmp_path: Path) -> None:
    d = _tok_dir(tmp_path / "tok", hf_tok, eos_token="<|im_end|>")  # no chat_template key
    tok = Tokenizer.from_dir(d)
    assert tok.chat_template is None
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert tok.apply_chat_template(msgs) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n")
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n")


def test_from_dir_special_tokens_and_stop_ids(hf_tok: HFTokenizer, tmp_path: Path) -> None:
    d = _tok_dir(tmp_path / "tok", hf_tok, eos_token={"content": "<|im_end|>", "special": True})
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 7]}), encoding="utf-8")
    tok = Tokenizer.from_dir(d)
    assert tok.eos_token == "<|im_end|>"
    ids = {hf_tok.token_to_id(t) for t in SPECIAL_TOKENS if t != "<|im_start|>"}
    assert set(tok.stop_token_ids) == ids | {5, 7}
    assert hf_tok.token_to_id("<|im_start|>") not in tok.stop_token_ids


def test_from_dir_without_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(LMForgeError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(LMForgeError, match="cannot parse tokenizer"):
        Tokenizer.from_dir(tmp_path)


# -- streaming detokenization ----------------------------------------------------------------------
@pytest.mark.parametrize("text", [
    "Hello 😀 world",
    "中文字符 and 日本語のテキスト",
    "mixed: é, ß, Ω, 🇫🇷 flags, 👩‍👩‍👧 family, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢!",
    "😀😀😀",
])
def test_incremental_decoder_never_emits_half_characters(hf_tok: HFTokenizer, text: str) -> None:
    tok = Tokenizer(hf_tok)
    ids = tok.encode(text)
    assert len(ids) > len(text.encode("utf-8")) // 4  # mostly single bytes: multi-byte chars are split
    assert tok.decode(ids) == text
    for prompt in ([], tok.encode("The cat sat ")):
        dec = tok.decoder(prompt)
        deltas = [dec.push(i) for i in ids]
        assert all("\ufffd" not in d for d in deltas), deltas
        assert "".join(deltas) + dec.flush() == tok.decode(ids)
        assert sum(1 for d in deltas if d) > 1  # it actually streams


def test_incremental_decoder_flushes_an_incomplete_tail(hf_tok: HFTokenizer) -> None:
    tok = Tokenizer(hf_tok)
    ids = tok.encode("ok 😀")
    dec = tok.decoder()
    deltas = [dec.push(i) for i in ids[:-1]]  # the emoji's last byte is missing
    assert "".join(deltas) == "ok "
    assert dec.flush() == "\ufffd"


# -- GGUF metadata -----------------------------------------------------------------------------------
def _gguf_meta(hf: HFTokenizer, **overrides: object) -> dict:
    vocab = hf.get_vocab(with_added_tokens=True)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = json.loads(hf.to_str())["model"]["merges"]
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3 if t in SPECIAL_TOKENS else 1 for t in tokens],
        "tokenizer.ggml.merges": [m if isinstance(m, str) else " ".join(m) for m in merges],
        "tokenizer.ggml.eos_token_id": vocab["<|im_end|>"],
    }
    meta.update(overrides)
    return meta


def test_gguf_metadata_tokenizer_round_trip(hf_tok: HFTokenizer) -> None:
    tok = Tokenizer.from_gguf_metadata(_gguf_meta(hf_tok))
    text = "The quick brown fox 😀 <|im_end|> jumps"
    assert tok.encode(text) == hf_tok.encode(text).ids
    assert tok.decode(tok.encode(text)) == hf_tok.decode(hf_tok.encode(text).ids)
    assert tok.eos_token == "<|im_end|>"
    assert hf_tok.token_to_id("<|im_end|>") in tok.stop_token_ids


@pytest.mark.parametrize("pre", ["qwen2", "llama-bpe", "smollm"])
def test_gguf_supported_pre_tokenizers_round_trip(hf_tok: HFTokenizer, pre: str) -> None:
    tok = Tokenizer.from_gguf_metadata(_gguf_meta(hf_tok, **{"tokenizer.ggml.pre": pre}))
    text = "The cat sat on 12345 mats.\n\nHello world!"
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("pre", ["tekken", "made-up-pre"])
def test_gguf_unsupported_pre_tokenizer(hf_tok: HFTokenizer, pre: str) -> None:
    assert pre not in GGUF_PRE_TOKENIZERS
    with pytest.raises(LMForgeError, match=f"unsupported GGUF pre-tokenizer '{pre}'") as ei:
        Tokenizer.from_gguf_metadata(_gguf_meta(hf_tok, **{"tokenizer.ggml.pre": pre}))
    assert "gpt-2" in str(ei.value)  # the supported ones are listed


@pytest.mark.parametrize("model", ["bert", "plamo2", "rwkv"])  # "llama": test_sentencepiece.py, "t5": test_t5_gguf.py
def test_gguf_unsupported_tokenizer_model(hf_tok: HFTokenizer, model: str) -> None:
    with pytest.raises(LMForgeError, match=f"unsupported GGUF tokenizer model '{model}'"):
        Tokenizer.from_gguf_metadata(_gguf_meta(hf_tok, **{"tokenizer.ggml.model": model}))


def test_gguf_missing_tokenizer_model(hf_tok: HFTokenizer) -> None:
    meta = _gguf_meta(hf_tok)
    del meta["tokenizer.ggml.model"]
    with pytest.raises(LMForgeError, match="unsupported GGUF tokenizer model None"):
        Tokenizer.from_gguf_metadata(meta)
