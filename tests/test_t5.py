"""Encoder-decoders (T5, and BART): parity with transformers (encoder, teacher-forced decoder, cached greedy
decoding), HF export round trip, and bad directories refused by name."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from numerics import assert_close_scaled
from safetensors.torch import load_file, save_file
from tiny import T5_VARIANTS as VARIANTS
from tiny import make_bart_dir, make_t5_dir
from tiny import t5_config as _hf_config

from lmforge.engine.kv_cache import KVCache
from lmforge.errors import LMForgeError
from lmforge.formats import load_checkpoint
from lmforge.formats.export import export_model, save_hf
from lmforge.model import EncoderDecoder, ModelConfig
from lmforge.model.seq2seq import relative_buckets

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-4  # relative to the outputs' magnitude (see numerics.assert_close_scaled)
VOCAB, EOS, START = 128, 1, 0
STEPS = 32

@pytest.fixture(scope="module", params=sorted(VARIANTS))
def t5(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(variant, directory, transformers' model, lmforge's model) for each variant."""
    path = make_t5_dir(tmp_path_factory.mktemp(request.param.replace(".", "")), request.param)
    ref = transformers.T5ForConditionalGeneration.from_pretrained(path).eval()
    ours = load_checkpoint(path, device="cpu", dtype=torch.float32).model
    return request.param, path, ref, ours


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two source rows, the second right-padded."""
    g = torch.Generator().manual_seed(1)
    src = torch.randint(2, VOCAB, (2, 11), generator=g)
    mask = torch.ones_like(src)
    mask[1, 7:] = 0
    src[1, 7:] = 0
    return src, mask


class Seq2SeqCache(KVCache):
    """The engine's slotted KV cache for the decoder's self-attention, plus each layer's cross-attention
    keys/values, made once per sequence (`model.blocks.CrossKVStore`)."""

    def __init__(self, cfg: ModelConfig, rows: int, max_len: int) -> None:
        super().__init__(dataclasses.replace(cfg, n_layers=cfg.decoder_layers), rows, max_len)
        self.cross_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.made = 0

    def cross(self, layer, make):
        if layer not in self.cross_kv:
            self.cross_kv[layer] = make()
            self.made += 1
        return self.cross_kv[layer]


def _greedy(model: EncoderDecoder, src: torch.Tensor, mask: torch.Tensor, cached: bool
            ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """STEPS greedy tokens per row (EOS suppressed, as min_new_tokens does) and each step's logits; with
    the cache, each step feeds one token, and the memory only on the first."""
    start, eos = model.cfg.extra["decoder_start_token_id"], model.cfg.extra["eos_token_id"]
    memory = model.encode(src, mask)
    tokens = torch.full((src.shape[0], 1), start)
    cache = Seq2SeqCache(model.cfg, src.shape[0], STEPS + 1) if cached else None
    logits = []
    for step in range(STEPS):
        if cache is not None:
            out = model.decode(tokens[:, -1:], memory if step == 0 else None, mask, cache=cache,
                               start_pos=[step] * src.shape[0])[:, -1]
        else:
            out = model.decode(tokens, memory, mask)[:, -1]
        logits.append(out)
        nxt = out.clone()
        nxt[:, eos] = -math.inf
        tokens = torch.cat([tokens, nxt.argmax(-1, keepdim=True)], dim=1)
    if cache is not None:
        assert cache.made == model.cfg.decoder_layers  # cross-attention keys/values made once per layer
    return tokens[:, 1:], logits


def test_buckets_match_transformers() -> None:
    rel = torch.arange(-300, 300)[None, :]
    for bidirectional in (True, False):
        for buckets, distance in ((32, 128), (8, 12), (4, 3)):
            want = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
                rel, bidirectional=bidirectional, num_buckets=buckets, max_distance=distance)
            assert torch.equal(relative_buckets(rel, bidirectional, buckets, distance), want)


def test_config_is_read_as_the_variant_says(t5) -> None:
    variant, _, _, ours = t5
    cfg = ours.cfg
    assert isinstance(ours, EncoderDecoder)
    assert (cfg.family, cfg.n_layers, cfg.decoder_layers, cfg.head_dim, cfg.ffn_dim) == ("t5", 2, 3, 16, 96)
    if variant == "v1.0":
        assert (cfg.mlp, cfg.activation, cfg.tie_embeddings, cfg.output_scale) == ("gelu", "relu", True, True)
    else:
        assert (cfg.mlp, cfg.activation, cfg.tie_embeddings, cfg.output_scale) == ("swiglu", "gelu_tanh", False, False)
        assert (cfg.relative_buckets, cfg.relative_max_distance) == (8, 12)


def test_encoder_and_teacher_forced_logits_match_transformers(t5) -> None:
    _, _, ref, ours = t5
    src, mask = _batch()
    tgt = torch.randint(2, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    tgt[:, 0] = START
    with torch.inference_mode():
        want = ref(input_ids=src, attention_mask=mask, decoder_input_ids=tgt)
        memory = ours.encode(src, mask)
        got = ours.decode(tgt, memory, mask)
    assert_close_scaled(memory, want.encoder_last_hidden_state, TOL)
    assert_close_scaled(got, want.logits, TOL)
    assert_close_scaled(ours(src, tgt, mask), want.logits, TOL)
    # Each row alone, unpadded, gives its batched result: padding changes nothing.
    with torch.inference_mode():
        alone = ours.decode(tgt[1:], ours.encode(src[1:, :7]), None)
    assert_close_scaled(alone, got[1:], TOL)


def test_cached_greedy_decoding_matches_uncached_and_transformers_generate(t5) -> None:
    _, _, ref, ours = t5
    src, mask = _batch()
    with torch.inference_mode():
        # transformers sizes its own decoding cache by the encoder's depth: with a deeper decoder it
        # fails, so its reference decodes without one.
        want = ref.generate(input_ids=src, attention_mask=mask, do_sample=False, num_beams=1,
                            max_new_tokens=STEPS, min_new_tokens=STEPS, use_cache=False)
        cached, cached_logits = _greedy(ours, src, mask, cached=True)
        plain, plain_logits = _greedy(ours, src, mask, cached=False)
    assert want[:, 0].eq(START).all()
    assert torch.equal(cached, want[:, 1:]), (cached, want[:, 1:])
    assert torch.equal(plain, cached)
    assert len(set(cached.flatten().tolist())) > 3  # real sequences, not one token repeated
    for c, p in zip(cached_logits, plain_logits, strict=True):
        assert_close_scaled(c, p, TOL)


def test_export_round_trip_gives_transformers_the_same_logits(t5, tmp_path: Path) -> None:
    variant, _, ref, ours = t5
    out = save_hf(ours, tmp_path / "export")
    back = transformers.T5ForConditionalGeneration.from_pretrained(out).eval()
    config = json.loads((out / "config.json").read_text())
    assert config["feed_forward_proj"] == VARIANTS[variant]["feed_forward_proj"]
    src, mask = _batch()
    tgt = torch.randint(2, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        want = ref(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
        got = back(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
        again = load_checkpoint(out, device="cpu", dtype=torch.float32).model(src, tgt, mask)
    assert_close_scaled(got, want, 1e-6)
    assert_close_scaled(again, want, TOL)
    assert not torch.equal(back.lm_head.weight, back.shared.weight) or variant == "v1.0"


def test_tied_unscaled_model_exports_as_an_untied_one(tmp_path: Path) -> None:
    """transformers scales the decoder output exactly when the output is tied: a tied model without the
    scaling (transformers' own save of an untied config) is written with a copy as its own output matrix."""
    path = tmp_path / "t5"
    transformers.T5ForConditionalGeneration(_hf_config("v1.1")).save_pretrained(path)  # tied in the file
    ours = load_checkpoint(path, device="cpu", dtype=torch.float32).model
    assert (ours.cfg.tie_embeddings, ours.cfg.output_scale) == (True, False)
    ref = transformers.T5ForConditionalGeneration.from_pretrained(path).eval()
    result = export_model(path, "hf", tmp_path / "out")  # `lmforge export --to hf`
    # shared, 2 bias tables, 9 tensors per encoder block, 14 per decoder block, 2 final norms, lm_head (a copy)
    assert result.tensors == 1 + 2 + 2 * 9 + 3 * 14 + 2 + 1
    back = transformers.T5ForConditionalGeneration.from_pretrained(result.path).eval()
    src, mask = _batch()
    tgt = torch.randint(2, VOCAB, (2, 5), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        want = ref(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
        assert_close_scaled(ours(src, tgt, mask), want, TOL)
        assert_close_scaled(back(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits, want, 1e-6)


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | changes))


@pytest.mark.parametrize("ffp", ["gated-tanh", "relu-gated", "gated-gelu-new"])
def test_unsupported_feed_forward_proj_is_refused_by_name(tmp_path: Path, ffp: str) -> None:
    path = make_t5_dir(tmp_path / "t5", "v1.0")
    _edit_config(path, feed_forward_proj=ffp)
    with pytest.raises(LMForgeError, match=f"unsupported feed_forward_proj '{ffp}'"):
        load_checkpoint(path, device="cpu", dtype=torch.float32)


def test_missing_weight_tensor_is_named(tmp_path: Path) -> None:
    path = make_t5_dir(tmp_path / "t5", "v1.1")
    name = "decoder.block.2.layer.1.EncDecAttention.v.weight"
    tensors = load_file(path / "model.safetensors")
    del tensors[name]
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(LMForgeError, match=f"tensor '{name}' missing"):
        load_checkpoint(path, device="cpu", dtype=torch.float32)


def test_layer_count_and_width_disagreeing_with_the_weights_are_refused(tmp_path: Path) -> None:
    path = make_t5_dir(tmp_path / "t5", "v1.0")
    _edit_config(path, num_decoder_layers=2)
    with pytest.raises(LMForgeError, match="num_decoder_layers=2, but the weights hold 3 decoder blocks"):
        load_checkpoint(path, device="cpu", dtype=torch.float32)
    _edit_config(path, num_decoder_layers=3, d_ff=64)
    with pytest.raises(LMForgeError, match="does not match the weights: tensor 'encoder.layers.0.mlp.fc.weight'"):
        load_checkpoint(path, device="cpu", dtype=torch.float32)


def test_config_switches_are_checked() -> None:
    base = dict(family="t5", vocab_size=VOCAB, dim=64, n_layers=2, decoder_layers=2, n_heads=4, ffn_dim=96,
                position="relative")
    ModelConfig(**base)
    for bad, match in ((dict(decoder_layers=0), "decoder_layers must be positive"),
                       (dict(position="rope"), "relative positions"),
                       (dict(norm_position="post"), "pre-norm"),
                       (dict(relative_buckets=2), "relative_buckets must be at least 4"),
                       (dict(relative_max_distance=16), "relative_max_distance must exceed")):
        with pytest.raises(LMForgeError, match=match):
            ModelConfig(**(base | bad))
    with pytest.raises(LMForgeError, match="output_scale applies to t5"):
        ModelConfig(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, ffn_dim=96, output_scale=True)



def test_decoder_lm_paths_refuse_an_encoder_decoder(tmp_path: Path) -> None:
    """Running as a decoder LM over one token sequence (prompt scoring's path) is an error naming the model kind
    (generation runs through the engine's encoder-decoder steps: tests/test_seq2seq_engine.py)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    import lmforge

    path = make_t5_dir(tmp_path / "t5", "v1.0")
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(f"▁{i}", -1.0) for i in range(VOCAB - 3)]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.save(str(path / "tokenizer.json"))
    with pytest.raises(LMForgeError, match="t5 model is an encoder-decoder"):
        lmforge.load(path, device="cpu").score([5, 6, 7])


# -- BART: the same model core with post-norm, learned positions, biases and GELU ---------------------------------
@pytest.mark.parametrize("scale_embedding", [False, True])
def test_bart_matches_transformers_and_round_trips(tmp_path: Path, scale_embedding: bool) -> None:
    path = make_bart_dir(tmp_path / "bart", scale_embedding=scale_embedding)
    ref = transformers.BartForConditionalGeneration.from_pretrained(path).eval()
    ours = load_checkpoint(path, device="cpu", dtype=torch.float32).model
    cfg = ours.cfg
    assert (cfg.family, cfg.norm_position, cfg.position, cfg.embed_scale, cfg.logits_bias, cfg.context_length) == (
        "bart", "post", "learned", scale_embedding, True, 48)
    src, mask = _batch()
    src = src.clamp(min=3)  # BART's special tokens are 0-3; padding is 1
    src[1, 7:] = 1
    tgt = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    tgt[:, 0] = cfg.extra["decoder_start_token_id"]
    with torch.inference_mode():
        want = ref(input_ids=src, attention_mask=mask, decoder_input_ids=tgt)
        memory = ours.encode(src, mask)
        assert_close_scaled(memory, want.encoder_last_hidden_state, TOL)
        assert_close_scaled(ours.decode(tgt, memory, mask), want.logits, TOL)
        generated = ref.generate(input_ids=src, attention_mask=mask, do_sample=False, num_beams=1,
                                 max_new_tokens=STEPS, min_new_tokens=STEPS, use_cache=False)
        cached, cached_logits = _greedy(ours, src, mask, cached=True)
        plain, plain_logits = _greedy(ours, src, mask, cached=False)
        back = transformers.BartForConditionalGeneration.from_pretrained(save_hf(ours, tmp_path / "out")).eval()
        again = back(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
    assert torch.equal(cached, generated[:, 1:]) and torch.equal(plain, cached)
    assert len(set(cached.flatten().tolist())) > 3
    for c, p in zip(cached_logits, plain_logits, strict=True):
        assert_close_scaled(c, p, TOL)
    assert_close_scaled(again, want.logits, 1e-6)


def test_bart_configs_lmforge_cannot_run_are_refused(tmp_path: Path) -> None:
    path = make_bart_dir(tmp_path / "bart")
    _edit_config(path, decoder_attention_heads=2)
    with pytest.raises(LMForgeError, match="encoder_attention_heads=4 differs from decoder_attention_heads=2"):
        load_checkpoint(path, device="cpu", dtype=torch.float32)
    _edit_config(path, decoder_attention_heads=4, encoder_layers=3)
    with pytest.raises(LMForgeError, match="encoder_layers=3, but the weights hold 2 encoder blocks"):
        load_checkpoint(path, device="cpu", dtype=torch.float32)
    _edit_config(path, encoder_layers=2, normalize_before=True)
    with pytest.raises(LMForgeError, match="normalize_before=True"):
        load_checkpoint(path, device="cpu", dtype=torch.float32)
    _edit_config(path, normalize_before=False)
    model = load_checkpoint(path, device="cpu", dtype=torch.float32).model
    with pytest.raises(LMForgeError, match="position 48 is beyond the model's 48 learned positions"):
        model.decode(torch.zeros(1, 49, dtype=torch.long), model.encode(torch.ones(1, 3, dtype=torch.long)))
