"""Tiny, fast model builders shared by the CLI, engine and tokenizer tests.

* ``train_tokenizer()``: a byte-level BPE ``tokenizers.Tokenizer`` trained on a few sentences, with the
  special tokens ``<|endoftext|>``, ``<|im_start|>`` and ``<|im_end|>``.
* ``make_tiny_llama_dir(tmp, context=64)``: an HF directory (config.json + model.safetensors written by
  transformers' ``save_pretrained``, tokenizer.json, tokenizer_config.json with a ChatML template).
* ``write_tiny_gguf(path)``: a tiny llama GGUF (F32) with a byte-level BPE vocabulary.
* ``ScriptedModel``: a stand-in for ``Transformer`` whose greedy output is a fixed token script, so
  engine tests can make the "model" say exactly the text they need.
* ``make_t5_dir(path, variant)``: a tiny random T5 v1.0 or v1.1 HF directory; ``train_t5_unigram()``: T5's
  Unigram tokenizer.json shape with its sentinels, and ``TEXTS``, the multilingual texts it is compared on.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from lmforge.model import ModelConfig

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! This is a tiny tokenizer for tests.",
    "The cat sat on the mat, then the cat ate the fish.",
    "Language models predict the next token from the previous tokens.",
    "We generate text, stream text, and stop at a stop string.",
    "user assistant system hello hi brief answer question",
]
VOCAB_SIZE = 384


def train_tokenizer(vocab_size: int = VOCAB_SIZE) -> HFTokenizer:
    """A GPT-2 style byte-level BPE tokenizer (every byte is in the alphabet, so any text encodes)."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return tok


def randomize(model: torch.nn.Module, seed: int, std: float = 0.3) -> None:
    """Large-std weights so greedy generation is varied rather than one token repeated."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))


def make_tiny_llama_dir(tmp: Path, context: int = 64, seed: int = 0, chat_template: str | None = CHATML_TEMPLATE,
                        tokenizer: HFTokenizer | None = None) -> Path:
    """Write a tiny random Llama HF directory with a trained BPE tokenizer; returns the directory."""
    import transformers

    tmp = Path(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    tok = tokenizer or train_tokenizer()
    vocab = tok.get_vocab_size(with_added_tokens=True)
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=context, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=tok.token_to_id("<|im_end|>"), pad_token_id=None,
    )
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    randomize(model, seed)
    model.save_pretrained(tmp)
    tok.save(str(tmp / "tokenizer.json"))
    tc = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": context,
        "clean_up_tokenization_spaces": False,
    }
    if chat_template is not None:
        tc["chat_template"] = chat_template
    (tmp / "tokenizer_config.json").write_text(json.dumps(tc, indent=2), encoding="utf-8")
    return tmp


# -- GGUF --------------------------------------------------------------------------------------------
def write_tiny_gguf(path: Path, context: int = 64, seed: int = 0) -> Path:
    """A tiny F32 llama GGUF whose vocabulary is the trained byte-level BPE tokenizer's."""
    tok = train_tokenizer()
    vocab_map = tok.get_vocab(with_added_tokens=True)
    tokens = [t for t, _ in sorted(vocab_map.items(), key=lambda kv: kv[1])]
    special = set(SPECIAL_TOKENS)
    types = [3 if t in special else 1 for t in tokens]
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]

    def tokenizer(w: Any) -> None:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_eos_token_id(vocab_map["<|im_end|>"])

    return write_llama_gguf(path, "tiny-gguf", len(tokens), tokenizer, context, seed)


def write_llama_gguf(path: Path, name: str, vocab: int, tokenizer: Callable[[Any], None], context: int = 64,
                     seed: int = 0) -> Path:
    """A tiny F32 llama GGUF (dim 32, 1 layer, random weights) of ``vocab`` tokens; ``tokenizer`` writes the
    `tokenizer.ggml.*` keys into the GGUFWriter."""
    from gguf import GGUFWriter

    dim, ffn, n_heads, n_layers = 32, 64, 4, 1
    rng = np.random.default_rng(seed)

    def r(*shape: int) -> np.ndarray:
        return (0.3 * rng.standard_normal(shape)).astype(np.float32)

    w = GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_block_count(n_layers)
    w.add_context_length(context)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(ffn)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(dim // n_heads)
    w.add_vocab_size(vocab)
    tokenizer(w)
    w.add_tensor("token_embd.weight", r(vocab, dim))
    for i in range(n_layers):
        b = f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", np.ones(dim, np.float32))
        for proj in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(b + proj + ".weight", r(dim, dim))
        w.add_tensor(b + "ffn_norm.weight", np.ones(dim, np.float32))
        w.add_tensor(b + "ffn_gate.weight", r(ffn, dim))
        w.add_tensor(b + "ffn_up.weight", r(ffn, dim))
        w.add_tensor(b + "ffn_down.weight", r(dim, ffn))
    w.add_tensor("output_norm.weight", np.ones(dim, np.float32))
    w.add_tensor("output.weight", r(vocab, dim))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# -- a model that says what it is told ----------------------------------------------------------------
class ScriptedModel(torch.nn.Module):
    """Engine-compatible stand-in for ``Transformer``: the logits at absolute position p put all the mass
    on ``script[p - prompt_len]`` (the greedy choice), so output token k is ``script[k]``.

    Once the script runs out it repeats its last token. Logits are ``-10`` everywhere and ``+10`` on the
    scripted token, so every token keeps a finite logprob.
    """

    def __init__(self, script: list[int], prompt_len: int, vocab_size: int, context: int = 64) -> None:
        super().__init__()
        self.cfg = ModelConfig(vocab_size=vocab_size, dim=8, n_layers=1, n_heads=1, ffn_dim=8,
                               context_length=context)
        self.script, self.prompt_len = list(script), prompt_len
        self.dummy = torch.nn.Parameter(torch.zeros(1))  # the engine reads device/dtype from a parameter

    def _row(self, pos: int) -> torch.Tensor:
        k = min(max(pos - self.prompt_len, 0), len(self.script) - 1)
        row = torch.full((self.cfg.vocab_size,), -10.0)
        row[self.script[k]] = 10.0
        return row

    def forward(self, tokens: torch.Tensor, *, cache=None, start_pos=None, slots=None, last_index=None,
                **_: object) -> torch.Tensor:
        b, t = tokens.shape
        start = list(start_pos) if start_pos is not None else [0] * b
        # The token predicted after input position j sits at absolute position start + j + 1.
        out = torch.stack([torch.stack([self._row(start[r] + j + 1) for j in range(t)]) for r in range(b)])
        if last_index is not None:
            return out[torch.arange(b), last_index]
        return out


# -- BERT --------------------------------------------------------------------------------------------
BERT_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def bert_tokenizer(words: list[str]) -> HFTokenizer:
    """A BERT-style WordPiece tokenizer (lower-casing normaliser, [CLS] ... [SEP]) over whole words."""
    from tokenizers import normalizers

    vocab = {t: i for i, t in enumerate(BERT_SPECIAL)}
    for w in sorted({w.lower() for w in words} | set("abcdefghijklmnopqrstuvwxyz.,!?'")):
        vocab.setdefault(w, len(vocab))
    tok = HFTokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.decoder = decoders.WordPiece()
    return tok


def make_tiny_bert_dir(tmp: Path, words: list[str], seed: int = 0, layers: int = 2, std: float = 0.15) -> Path:
    """A tiny random BertModel HF directory (with pooler) and a WordPiece tokenizer over ``words``."""
    import transformers

    tmp = Path(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    tok = bert_tokenizer(words)
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=layers,
                                  num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                                  type_vocab_size=2, pad_token_id=0)
    model = transformers.BertModel(cfg).float().eval()
    randomize(model, seed, std=std)
    model.save_pretrained(tmp)
    tok.save(str(tmp / "tokenizer.json"))
    tc = {"tokenizer_class": "BertTokenizerFast", "pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]",
          "sep_token": "[SEP]", "mask_token": "[MASK]", "model_max_length": 64}
    (tmp / "tokenizer_config.json").write_text(json.dumps(tc, indent=2), encoding="utf-8")
    return tmp


# -- T5 (tests/test_t5.py, tests/test_t5_gguf.py) --------------------------------------------------------
# v1.0: ReLU MLP, output tied to the embedding (and scaled by d_model**-0.5), default buckets.
# v1.1 / flan-T5: gated-GELU MLP, an output matrix of its own, few buckets and a short max distance so
# that 32 decoding steps reach the logarithmic buckets and the last, shared one.
T5_VARIANTS = {
    "v1.0": dict(feed_forward_proj="relu", tie_word_embeddings=True),
    "v1.1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, relative_attention_num_buckets=8,
                 relative_attention_max_distance=12),
}


def t5_config(variant: str, vocab: int = 128, **kw: Any) -> Any:
    """A tiny transformers T5Config: d_model 64, 2 encoder and 3 decoder layers, 4 heads."""
    import transformers

    base = dict(vocab_size=vocab, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_decoder_layers=3, num_heads=4,
                dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return transformers.T5Config(**(base | T5_VARIANTS[variant] | kw))


def init_t5(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights larger than T5's own init (matrices 1.5 / sqrt(fan-in), norms near 1), so that greedy
    decoding is varied and its top two logits stay well apart, yet the unscaled attention is not so
    peaked that float32 rounding decides the next token."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(("shared.weight", "lm_head.weight", "relative_attention_bias.weight")):
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(1.5 * p.shape[1] ** -0.5 * torch.randn(p.shape, generator=g))


def make_t5_dir(path: Path, variant: str, vocab: int = 128, **kw: Any) -> Path:
    """A tiny random T5ForConditionalGeneration saved by transformers. An untied variant gets an output
    matrix of its own in the file (transformers ties it to the embedding when it builds the model)."""
    import transformers
    from safetensors.torch import load_file, save_file

    cfg = t5_config(variant, vocab, **kw)
    model = transformers.T5ForConditionalGeneration(cfg)
    init_t5(model)
    model.save_pretrained(path)
    if not T5_VARIANTS[variant]["tie_word_embeddings"]:
        tensors = load_file(path / "model.safetensors")
        tensors["lm_head.weight"] = torch.randn(vocab, cfg.d_model, generator=torch.Generator().manual_seed(1))
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        config = json.loads((path / "config.json").read_text())
        config["tie_word_embeddings"] = False
        config.pop("scale_decoder_outputs", None)
        (path / "config.json").write_text(json.dumps(config))
    return path


def make_bart_dir(path: Path, vocab: int = 128, **kw: Any) -> Path:
    """A tiny random BartForConditionalGeneration saved by transformers."""
    import transformers

    cfg = transformers.BartConfig(vocab_size=vocab, d_model=64, encoder_layers=2, decoder_layers=3,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=96,
                                  decoder_ffn_dim=96, max_position_embeddings=48, dropout=0.0,
                                  forced_eos_token_id=None, **kw)
    model = transformers.BartForConditionalGeneration(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # varied greedy output: embeddings at std 1, matrices near BART's init, real biases
        for name, p in model.named_parameters():
            std = 0.1 if p.dim() == 1 else 1.0 if name.endswith(("shared.weight", "positions.weight")) else 0.03
            p.copy_((1.0 if name.endswith("norm.weight") else 0.0) + std * torch.randn(p.shape, generator=g))
        model.final_logits_bias.copy_(0.1 * torch.randn(model.final_logits_bias.shape, generator=g))
    model.save_pretrained(path)
    return path


# -- T5's SentencePiece Unigram tokenizer (tests/test_sentencepiece.py, tests/test_t5_gguf.py) -------------
SPM_CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog was not amused, and the fox ran away.",
    "Le renard brun rapide saute par-dessus le chien paresseux. Où est la bibliothèque, s'il vous plaît ?",
    "Der schnelle braune Fuchs springt über den faulen Hund. Größe, Straße und Äpfel schmecken gut.",
    "敏捷的棕色狐狸跳过了懒狗。我们今天去公园散步。",
    "素早い茶色の狐がのろまな犬を飛び越える。東京は大きい都市です。",
    "빠른 갈색 여우가 게으른 개를 뛰어넘는다.",
    "Emoji: 😀 🎉 👍🏽 and more words after them.",
    "Numbers 12345 and 67890, symbols #$%&*() [] {} <> | ~ and code: def f(x): return x * 2",
    "Tabs\tand newlines\nand   runs   of    spaces.",
]
# What is compared: the corpus, sentinels written in text, whitespace runs and edges, characters never seen.
TEXTS = [*SPM_CORPUS,
         "Translate to German: <extra_id_0> is a <extra_id_1> fox.<extra_id_99>",
         "x<extra_id_5>y <extra_id_12> z", "   leading, trailing and\t\tinner   whitespace   ",
         "line one\n\nline two\r\n", "", " ", "unseen: ŧ Ж ℵ 🦀 ǅ", "ﬁ ＦＵＬＬ width ①", "café naïve façade",
         "</s> <pad> <unk> written in text", "mixed 中文 English Deutsch français 😀!"]
SENTINELS = [f"<extra_id_{i}>" for i in range(100)]
PAD, EOS, UNK = "<pad>", "</s>", "<unk>"


def train_t5_unigram(vocab_size: int = 350) -> HFTokenizer:
    """T5's tokenizer.json shape: Unigram, whitespace split then `▁`, `</s>` appended, 100 sentinels last."""
    hf = HFTokenizer(models.Unigram())
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    hf.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS, UNK], unk_token=UNK,
                                      show_progress=False)
    hf.train_from_iterator(SPM_CORPUS * 10, trainer)
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in reversed(SENTINELS)])
    hf.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                      special_tokens=[(EOS, hf.token_to_id(EOS))])
    return hf
