"""The one table of Hugging Face tensor names: where transformers keeps each of our tensors.

Loading HF directories (`formats.hf`), exporting them (`formats.export`) and PEFT adapters
(`finetune.lora`) all read it. Our fused matrices (q/k/v, gate/up) are several HF tensors stacked
along the rows; GPT-2 stores its linear weights transposed (Conv1D); RoBERTa keeps position rows
we drop, and so does BART; T5 keeps each stack's position-bias table in its first block.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..model.config import ModelConfig

WEIGHT_BIAS = ("weight", "bias")

# HF / PEFT target names -> the fused layers of ours that hold them (module-name suffixes).
HF_TARGETS: dict[str, tuple[str, ...]] = {
    "q_proj": ("attn.qkv",), "k_proj": ("attn.qkv",), "v_proj": ("attn.qkv",), "o_proj": ("attn.o",),
    "gate_proj": ("mlp.gate_up",), "up_proj": ("mlp.gate_up",), "down_proj": ("mlp.down",),
    "c_attn": ("attn.qkv",), "c_fc": ("mlp.fc",), "attn.c_proj": ("attn.o",), "mlp.c_proj": ("mlp.down",),
    "c_proj": ("attn.o", "mlp.down"),
}


@dataclass(frozen=True)
class HFName:
    """One tensor of ours and the HF tensors that hold it."""

    ours: str  # our state-dict name
    hf: tuple[str, ...]  # transformers' names of its pieces, stacked along dim 0 in this order
    rows: tuple[int, ...] = ()  # each piece's rows; empty for a single piece
    conv1d: bool = False  # transformers stores the matrix as [in, out]
    base: bool = True  # under the base model's prefix ("model.", "transformer.", "bert.")
    kept: tuple[int, int] | None = None  # the rows of transformers' tensor we keep (RoBERTa drops its first)

    def spans(self, total: int) -> list[tuple[str, int, int]]:
        """(HF name, first row, end row) of each piece of a ``total``-row tensor."""
        if not self.rows:
            return [(self.hf[0], 0, total)]
        out, start = [], 0
        for name, n in zip(self.hf, self.rows):
            out.append((name, start, start + n))
            start += n
        return out


def base_prefix(cfg: ModelConfig) -> str:
    """The prefix transformers puts before the base model's tensors in a task model's checkpoint."""
    if cfg.family == "gpt2":
        return "transformer."
    if cfg.family == "bert":
        return "bert." if cfg.extra.get("hf_model_type", "bert") == "bert" else "roberta."
    if cfg.family == "t5":
        return ""
    return "model."


def saved_prefix(cfg: ModelConfig) -> str:
    """The base prefix an export writes: a bare encoder is saved unprefixed (BertModel), a masked-LM one
    under bert./roberta. (BertForMaskedLM)."""
    return "" if cfg.family == "bert" and cfg.head != "mlm" else base_prefix(cfg)


def hf_names(cfg: ModelConfig) -> list[HFName]:
    """Every tensor of a `cfg` model, in load order, with its HF names (without `base_prefix`)."""
    if cfg.family == "gpt2":
        return _gpt2(cfg)
    if cfg.family == "bert":
        return _bert(cfg)
    if cfg.family == "t5":
        return _t5(cfg)
    if cfg.family == "bart":
        return _bart(cfg)
    return _llama(cfg)


def _llama(cfg: ModelConfig) -> list[HFName]:
    """Llama, Mistral and Qwen2: separate q/k/v and gate/up projections."""
    qkv, gate_up = (cfg.q_dim, cfg.kv_dim, cfg.kv_dim), (cfg.ffn_dim, cfg.ffn_dim)
    out = [HFName("tok_emb.weight", ("embed_tokens.weight",))]
    for i in range(cfg.n_layers):
        o, p = f"layers.{i}.", f"layers.{i}."
        a, m = p + "self_attn.", p + "mlp."
        out += [HFName(o + "attn_norm.weight", (p + "input_layernorm.weight",)),
                HFName(o + "mlp_norm.weight", (p + "post_attention_layernorm.weight",)),
                HFName(o + "attn.qkv.weight", tuple(a + f"{x}_proj.weight" for x in "qkv"), qkv)]
        if cfg.qkv_bias:
            out.append(HFName(o + "attn.qkv.bias", tuple(a + f"{x}_proj.bias" for x in "qkv"), qkv))
        out.append(HFName(o + "attn.o.weight", (a + "o_proj.weight",)))
        if cfg.out_bias:
            out.append(HFName(o + "attn.o.bias", (a + "o_proj.bias",)))
        out += [HFName(o + "mlp.gate_up.weight", (m + "gate_proj.weight", m + "up_proj.weight"), gate_up),
                HFName(o + "mlp.down.weight", (m + "down_proj.weight",))]
        if cfg.mlp_bias:
            out += [HFName(o + "mlp.gate_up.bias", (m + "gate_proj.bias", m + "up_proj.bias"), gate_up),
                    HFName(o + "mlp.down.bias", (m + "down_proj.bias",))]
    out.append(HFName("norm.weight", ("norm.weight",)))
    if not cfg.tie_embeddings:
        out.append(HFName("lm_head.weight", ("lm_head.weight",), base=False))
    return out


def _gpt2(cfg: ModelConfig) -> list[HFName]:
    out = [HFName("tok_emb.weight", ("wte.weight",)), HFName("pos_emb.weight", ("wpe.weight",))]
    for i in range(cfg.n_layers):
        o, p = f"layers.{i}.", f"h.{i}."
        for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            out += [HFName(o + f"{ours}.{k}", (p + f"{theirs}.{k}",)) for k in WEIGHT_BIAS]
        for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.o", "attn.c_proj"),
                             ("mlp.fc", "mlp.c_fc"), ("mlp.down", "mlp.c_proj")):
            out += [HFName(o + f"{ours}.weight", (p + f"{theirs}.weight",), conv1d=True),
                    HFName(o + f"{ours}.bias", (p + f"{theirs}.bias",))]
    return out + [HFName(f"norm.{k}", (f"ln_f.{k}",)) for k in WEIGHT_BIAS]


def _bert(cfg: ModelConfig) -> list[HFName]:
    """BERT, RoBERTa and XLM-R encoders, with their optional pooler and masked-LM head."""
    e, off = "embeddings.", cfg.extra.get("position_offset", 0)
    out = [HFName("tok_emb.weight", (e + "word_embeddings.weight",)),
           HFName("pos_emb.weight", (e + "position_embeddings.weight",), kept=(off, off + cfg.context_length))]
    if cfg.type_vocab_size:
        out.append(HFName("type_emb.weight", (e + "token_type_embeddings.weight",)))
    out += [HFName(f"emb_norm.{k}", (e + f"LayerNorm.{k}",)) for k in WEIGHT_BIAS]
    for i in range(cfg.n_layers):
        o, p = f"layers.{i}.", f"encoder.layer.{i}."
        for k in WEIGHT_BIAS:
            out.append(HFName(o + f"attn.qkv.{k}", tuple(p + f"attention.self.{x}.{k}" for x in ("query", "key", "value")),
                              (cfg.dim,) * 3))
            for ours, theirs in (("attn.o", "attention.output.dense"), ("attn_norm", "attention.output.LayerNorm"),
                                 ("mlp.fc", "intermediate.dense"), ("mlp.down", "output.dense"),
                                 ("mlp_norm", "output.LayerNorm")):
                out.append(HFName(o + f"{ours}.{k}", (p + f"{theirs}.{k}",)))
    if cfg.pooler:
        out += [HFName(f"pooler.{k}", (f"pooler.dense.{k}",)) for k in WEIGHT_BIAS]
    if cfg.head == "mlm":
        roberta = cfg.extra.get("hf_model_type", "bert") != "bert"
        h = "lm_head." if roberta else "cls.predictions."
        dense, norm = ("dense", "layer_norm") if roberta else ("transform.dense", "transform.LayerNorm")
        for k in WEIGHT_BIAS:
            out += [HFName(f"mlm_dense.{k}", (f"{h}{dense}.{k}",), base=False),
                    HFName(f"mlm_norm.{k}", (f"{h}{norm}.{k}",), base=False)]
        out.append(HFName("mlm_bias", (h + "bias",), base=False))
    return out


def _t5(cfg: ModelConfig) -> list[HFName]:
    """T5 (T5ForConditionalGeneration): one shared embedding, an encoder and a decoder stack whose blocks
    hold numbered sublayers (self-attention, [cross-attention,] feed-forward), no biases."""
    qkv, kv = (cfg.q_dim, cfg.kv_dim, cfg.kv_dim), (cfg.kv_dim, cfg.kv_dim)
    out = [HFName("tok_emb.weight", ("shared.weight",))]
    for stack, n in (("encoder", cfg.n_layers), ("decoder", cfg.decoder_layers)):
        out.append(HFName(f"{stack}.pos_bias.weight",
                          (f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",)))
        for i in range(n):
            o, p = f"{stack}.layers.{i}.", f"{stack}.block.{i}.layer."
            a = p + "0.SelfAttention."
            out += [HFName(o + "attn_norm.weight", (p + "0.layer_norm.weight",)),
                    HFName(o + "attn.qkv.weight", tuple(a + f"{x}.weight" for x in "qkv"), qkv),
                    HFName(o + "attn.o.weight", (a + "o.weight",))]
            ff = 1
            if stack == "decoder":
                c, ff = p + "1.EncDecAttention.", 2
                out += [HFName(o + "cross_norm.weight", (p + "1.layer_norm.weight",)),
                        HFName(o + "cross.q.weight", (c + "q.weight",)),
                        HFName(o + "cross.kv.weight", (c + "k.weight", c + "v.weight"), kv),
                        HFName(o + "cross.o.weight", (c + "o.weight",))]
            m = p + f"{ff}.DenseReluDense."
            out.append(HFName(o + "mlp_norm.weight", (p + f"{ff}.layer_norm.weight",)))
            if cfg.mlp == "swiglu":  # gated: act(wi_0 x) * wi_1 x
                out.append(HFName(o + "mlp.gate_up.weight", (m + "wi_0.weight", m + "wi_1.weight"),
                                  (cfg.ffn_dim, cfg.ffn_dim)))
            else:
                out.append(HFName(o + "mlp.fc.weight", (m + "wi.weight",)))
            out.append(HFName(o + "mlp.down.weight", (m + "wo.weight",)))
        out.append(HFName(f"{stack}.norm.weight", (f"{stack}.final_layer_norm.weight",)))
    if not cfg.tie_embeddings:
        out.append(HFName("lm_head.weight", ("lm_head.weight",), base=False))
    return out


def _bart(cfg: ModelConfig) -> list[HFName]:
    """BART (BartForConditionalGeneration): post-norm stacks with learned positions (two unused rows
    first), an embedding LayerNorm, biases everywhere, and a fixed bias on the logits."""
    off = cfg.extra.get("position_offset", 2)
    qkv, kv = (cfg.q_dim, cfg.kv_dim, cfg.kv_dim), (cfg.kv_dim, cfg.kv_dim)
    out = [HFName("tok_emb.weight", ("shared.weight",))]
    for stack, n in (("encoder", cfg.n_layers), ("decoder", cfg.decoder_layers)):
        out.append(HFName(f"{stack}.pos_emb.weight", (f"{stack}.embed_positions.weight",),
                          kept=(off, off + cfg.context_length)))
        out += [HFName(f"{stack}.emb_norm.{k}", (f"{stack}.layernorm_embedding.{k}",)) for k in WEIGHT_BIAS]
        for i in range(n):
            o, p = f"{stack}.layers.{i}.", f"{stack}.layers.{i}."
            for k in WEIGHT_BIAS:
                out += [HFName(o + f"attn.qkv.{k}", tuple(p + f"self_attn.{x}_proj.{k}" for x in "qkv"), qkv),
                        HFName(o + f"attn.o.{k}", (p + f"self_attn.out_proj.{k}",)),
                        HFName(o + f"attn_norm.{k}", (p + f"self_attn_layer_norm.{k}",))]
                if stack == "decoder":
                    c = p + "encoder_attn."
                    out += [HFName(o + f"cross.q.{k}", (c + f"q_proj.{k}",)),
                            HFName(o + f"cross.kv.{k}", (c + f"k_proj.{k}", c + f"v_proj.{k}"), kv),
                            HFName(o + f"cross.o.{k}", (c + f"out_proj.{k}",)),
                            HFName(o + f"cross_norm.{k}", (p + f"encoder_attn_layer_norm.{k}",))]
                out += [HFName(o + f"mlp.fc.{k}", (p + f"fc1.{k}",)),
                        HFName(o + f"mlp.down.{k}", (p + f"fc2.{k}",)),
                        HFName(o + f"mlp_norm.{k}", (p + f"final_layer_norm.{k}",))]
    if not cfg.tie_embeddings:
        out.append(HFName("lm_head.weight", ("lm_head.weight",), base=False))
    if cfg.logits_bias:
        out.append(HFName("logits_bias", ("final_logits_bias",), base=False))
    return out
