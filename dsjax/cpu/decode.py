"""The CPU wing's weight copies for decoding (`impl.DECODE_COPIES`, the `cpu_decode`
collection), made once per `dsjax.generate` call.

A decode step's products are a few rows against whole weights: the native few-row
kernel (`dsjax.cpu.linear`) reads each weight transposed, [N, K], as contiguous rows;
absorbed MLA reads wkv_b head-major, [H, C, K + V]; and absorbed MLA's per-head product
q_nope W_UK, a batched dot of H small matrices, is folded into the query projection
(`wq_folded_t`) so it runs as one product. XLA does not hoist such transposes out of a
decoding loop, so `generate` makes them once, before it (`weight_copies`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import flax.linen as nn
import jax.numpy as jnp

from dsjax import impl
from dsjax.cpu.linear import rows_kernel_applies
from dsjax.layers import dtype_of, weight_copy


def _boxed(x) -> bool:
    return isinstance(x, nn.LogicallyPartitioned)


# Weights of the few-row products a decode step runs through `dsjax.cpu.linear.matmul`'s kernel:
# {name: dimensions contracted}, in an attention block ('attn'), a dense MLP (an 'ffn'
# without a router), an MTP module, and the output head.
_TRANSPOSED_ATTN = {"wq": 1, "wq_a": 1, "wq_b": 1, "wkv_a": 1, "wo": 2}
_TRANSPOSED_MLP = {"w1": 1, "w3": 1, "w2": 1}
_FOLDED = ("wq", "wq_b")  # absorbed MLA decodes with these folded (`wq_folded_t`)
_BASE_NDIM = {"wq": 3, "wq_a": 2, "wq_b": 3, "wkv_a": 2, "wo": 3, "w1": 2, "w3": 2, "w2": 2, "eh_proj": 2, "head": 2}


def copies(params, absorbed: bool = True, transposed: bool = False) -> dict:
    """The weight copies for `params` (any layout; stacked layers keep their leading axis),
    the `impl.DECODE_COPIES` collection. `dsjax.generate` makes it once per call, outside
    its decoding loop, since XLA does not hoist the transposes out of the loop itself.

    `absorbed`: each MLA block's wkv_b [C, H, K + V] copied head-major as `wkv_b_heads`
    [H, C, K + V], the layout the absorbed attention's per-head products read without a
    copy. `transposed`: each projection, dense MLP matrix, MTP input projection and the
    output head as `<name>_t` [N, K] (the weight [K..., N...] flattened and transposed;
    the tied embedding is the head's as it is), which `layers.matmul` hands to the native
    few-row kernel (`dsjax.cpu.linear.rows_kernel_applies`), and for absorbed MLA the query
    projection with W_UK folded in (`wq_folded_t`, see `folded_query`). The transposed
    copies take as much memory again as those weights, for the call.
    """

    def flat_t(x, name, contract):
        value = x.value if _boxed(x) else x
        lead = value.shape[:value.ndim - _BASE_NDIM[name]]
        dims = value.shape[len(lead):]
        k = math.prod(dims[:contract])
        t = jnp.swapaxes(value.reshape(lead + (k, math.prod(dims[contract:]))), -1, -2)
        if _boxed(x):
            return x.replace(value=t, names=tuple(x.names[:len(lead)]) + (None, None))
        return t

    def heads_major(x):
        n = (x.value if _boxed(x) else x).ndim
        perm = tuple(range(n - 3)) + (n - 2, n - 3, n - 1)
        if _boxed(x):
            return x.replace(value=jnp.transpose(x.value, perm), names=tuple(x.names[i] for i in perm))
        return jnp.transpose(x, perm)

    def walk(tree, parent=None):
        out = {}
        mlp = parent == "ffn" and "gate" not in tree  # a dense layer's MLP, not a MoE layer's
        for key, sub in tree.items():
            if key == "wkv_b" and absorbed:
                out["wkv_b_heads"] = heads_major(sub)
            elif isinstance(sub, Mapping):
                found = walk(sub, key)
                if transposed and absorbed and key == "attn" and "wkv_b" in sub:
                    found.update(folds(sub))
                if found:
                    out[key] = found
            elif transposed and parent == "attn" and key in _TRANSPOSED_ATTN and not (absorbed and key in _FOLDED):
                out[key + "_t"] = flat_t(sub, key, _TRANSPOSED_ATTN[key])
            elif transposed and mlp and key in _TRANSPOSED_MLP:
                out[key + "_t"] = flat_t(sub, key, 1)
            elif transposed and key == "eh_proj":
                out[key + "_t"] = flat_t(sub, key, 1)
        return out

    def folds(attn):
        """W_UK folded into the query projection, transposed: wq_folded_t [H * (C + R),
        q_lora or D]. (W_UV stays out of the output projection: that would read H x C x D
        weights where W_UV and W_O hold H x V x (C + D); the latent kernel applies W_UV.)"""
        val = lambda x: (x.value if _boxed(x) else x).astype(jnp.float32)  # noqa: E731 (the kernel's dtype)
        wkv_b, wo = val(attn["wkv_b"]), val(attn["wo"])
        wq = val(attn["wq_b"] if "wq_b" in attn else attn["wq"])
        V = wo.shape[-2]
        K = wkv_b.shape[-1] - V
        q_lat = jnp.einsum("...lhk,...chk->...lhc", wq[..., :K], wkv_b[..., :K])
        wq_f = jnp.concatenate([q_lat, wq[..., K:]], -1)  # [..., L, H, C + R]
        return {"wq_folded_t": jnp.swapaxes(wq_f.reshape(wq_f.shape[:-2] + (-1,)), -1, -2)}

    out = walk(params)
    if transposed and "head" in params:
        out["head_t"] = flat_t(params["head"], "head", 1)
    elif transposed and "embed" in params:
        out["head_t"] = params["embed"]
    return out


def weight_copies(cfg, params, rows: int) -> dict:
    """The copies a decode step of `rows` rows (batch x tokens per step) reads under `cfg`:
    wkv_b head-major for absorbed MLA, and the transposed (and folded) weights where those
    rows run through the few-row kernel (not under the FP8 recipe)."""
    absorbed = cfg.attn_impl == "absorb"
    transposed = cfg.precision != "fp8" and rows_kernel_applies(rows, dtype_of(cfg.dtype))
    return copies(params, absorbed=absorbed, transposed=transposed) if absorbed or transposed else {}


def folded_query(module, rows: int):
    """An MLA module's folded query projection (`wq_folded_t`, [H * (C + R), q_lora or D])
    where decoding made it and a product of `rows` rows runs through the few-row kernel;
    else None."""
    if not rows_kernel_applies(rows, dtype_of(module.cfg.dtype)):
        return None
    return weight_copy(module, "wq_folded_t")


impl.register("decode_copies", "cpu", weight_copies)
impl.register("folded_query", "cpu", folded_query)
