"""A CPU decode step's whole block stack in one C call (`decode_stack` in csrc/decode.h, part of the kernels).

At one token a step, a Llama-style block is about eleven small operations, and dispatching each from
Python cost about a third of the step. When every block is the plain pre-norm RMSNorm / rotary /
SwiGLU kind and all four of its products have packed GGUF codes (any mix of kinds, K-quants included),
the C side runs the same kernels in the same order, so logits are bit-identical to the per-operation
path. Anything else (LayerNorm, GELU, LoRA adapters, weights changed since loading, more rows than the
packed products take) keeps the per-operation path.
"""

from __future__ import annotations

import ctypes
import weakref
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..model.blocks import RMSNorm
from . import kernels
from .packed import PackedLinear

if TYPE_CHECKING:
    from .accel import DecodeKVStore

_p, _i64 = ctypes.c_void_p, ctypes.c_int64
# model -> (state, plan, the segments it points to). Kept beside the model rather than on it: ctypes arrays
# of raw pointers must not travel with a deepcopy or a pickle of the model.
_plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _PW(ctypes.Structure):
    pass


# One segment of rows of one kind (PackedWeight.rest: further segments, of other kinds).
_PW._fields_ = [("codes", _p), ("scale", _p), ("zero", _p), ("bias", _p), ("n", _i64), ("k", _i64), ("kind", _i64),
                ("rows", _i64), ("next", ctypes.POINTER(_PW))]


class _Layer(ctypes.Structure):
    _fields_ = [("attn_norm", _p), ("mlp_norm", _p), ("qkv", _PW), ("o", _PW), ("gate_up", _PW), ("down", _PW),
                ("window", _i64)]


def _linear(lin: Any, keep: list) -> _PW | None:
    """The product's segments as a chain of _PW (each kept alive in ``keep``); None when it has no codes."""
    if not isinstance(lin, PackedLinear) or lin.weight is None or lin.packed is None \
            or lin.weight._version != lin._version:
        return None
    bias = lin.bias.data_ptr() if lin.bias is not None else None
    n, k = lin.packed.shape
    segments, w = [], lin.packed
    while w is not None:
        if not all(t.is_contiguous() for t in (w.codes, w.scale, w.zero)):
            return None
        segments.append(w)
        w = w.rest
    nxt = None
    for w in reversed(segments):
        pw = _PW(w.codes.data_ptr(), w.scale.data_ptr(), w.zero.data_ptr(), bias, n, k, kernels.KINDS[w.kind], w.rows,
                 ctypes.pointer(nxt) if nxt is not None else None)
        keep.append(pw)
        nxt = pw
    return nxt


def _state(model: Any) -> tuple:
    """What the plan depends on: the modules, their codes and every weight's version (an in-place update,
    e.g. a fine-tuning step, makes the cached pointers describe stale codes)."""
    # Read straight from the modules' dicts: this runs before every decode step, and nn.Module's __getattr__
    # made it a sixth of a SmolLM2 step.
    parts: list[Any] = []
    for blk in model._modules["layers"]:
        sub = blk._modules
        attn, mlp = sub["attn"]._modules, sub["mlp"]._modules
        for m in (sub["attn_norm"], sub["mlp_norm"], attn["qkv"], attn["o"], mlp["gate_up"], mlp["down"]):
            # LoRA wrappers and other replacements have no weight of their own; the plan refuses them.
            params = m._parameters
            weight, bias = params.get("weight"), params.get("bias")
            parts += (id(m), id(m.__dict__.get("packed")), weight._version if weight is not None else -1,
                      bias._version if bias is not None else -1)
    return tuple(parts)


def plan(model: Any) -> Any:
    """The ctypes array describing the model's blocks (cached per model until a weight changes); None when
    they don't qualify."""
    cfg = model.cfg
    if (cfg.norm != "rmsnorm" or cfg.norm_position != "pre" or cfg.mlp != "swiglu" or cfg.activation != "silu"
            or cfg.position != "rope" or kernels.lib() is None or not kernels.act16()):
        return None
    state = _state(model)
    cached = _plans.get(model)
    if cached is not None and cached[0] == state:
        return cached[1]
    layers, keep = [], []  # keep: the segments the layers point to, alive as long as the plan
    for blk in model.layers:
        ws = [_linear(m, keep) for m in (blk.attn.qkv, blk.attn.o, blk.mlp.gate_up, blk.mlp.down)]
        norms = (blk.attn_norm, blk.mlp_norm)
        if any(w is None for w in ws) or not all(isinstance(n, RMSNorm) for n in norms) or blk.mlp.act is not F.silu:
            layers = None
            break
        layers.append(_Layer(norms[0].weight.data_ptr(), norms[1].weight.data_ptr(), *ws, blk.attn.window))
    arr = (_Layer * len(layers))(*layers) if layers else None
    _plans[model] = (state, arr, keep)
    return arr


def decode_stack(model: Any, layers: Any, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                 cache: DecodeKVStore) -> torch.Tensor:
    """Run every block on the decode step's hidden states x [b, 1, dim] (updated in place and returned)."""
    cfg = model.cfg
    slots, pos = cache.decode_rows
    cos, sin = rope[0].contiguous(), rope[1].contiguous()
    kernels.lib().decode_stack(
        x.data_ptr(), x.shape[0], ctypes.addressof(layers), len(layers), cache.k.data_ptr(), cache.v.data_ptr(), slots.data_ptr(),
        pos.data_ptr(), cos.data_ptr(), sin.data_ptr(), cfg.dim, cfg.n_heads, cfg.n_kv_heads, cache.k.shape[1],
        cache.k.shape[3], cfg.head_dim, cfg.ffn_dim, model.layers[0].attn_norm.eps, cfg.head_dim ** -0.5,
        kernels.THREADS)
    return x
