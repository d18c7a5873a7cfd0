"""Splash attention: MLA's naive-form training and prefill attention on TPUs through
Pallas's splash kernel (`jax.experimental.pallas.ops.tpu.splash_attention`, "sparse
flash attention"), `model.attn_kernel=splash`, what `auto` resolves to on a TPU.

The kernel is FlashAttention's online softmax written for the TPU's vector and matrix
units, forward and backward (a custom VJP of its own), per batch row on head-major
arrays: q [H, T, K], k [H, S, K], v [H, S, V] (V may differ from K: MLA's 192-wide
queries and keys, 128-wide values, need no padding). Its mask is static and
block-sparse: a `CausalMask` tells the kernel which (query block, key block) pairs are
wholly masked, and the grid never visits them, so a causal call computes about half the
scores at every length. Packed sequences add `SegmentIds` (queries see only keys of
their own segment), checked inside the visited blocks.

What MLA hands in is a boolean mask [B, T, T] with the promise that it is causal, with or
without packed segments (`attention_mask`: causal & equal segment ids). The segment ids
the kernel needs are read back from it: query t's first visible key is the first
position of its segment's id, so "same first visible key" is "same segment" for any
segment ids (contiguous or not) and the mask is rebuilt exactly (`segments_from_mask`).

Under a mesh (`jax.set_mesh`) the kernel runs on each device's own rows under
`shard_map`, batch split as the `batch` logical axis is and heads as `heads` is (the
logical-axis rules in force), as MaxText runs it. Compiled for a TPU the kernel is a
Mosaic custom call (`splash_mha_*`); on other platforms the same kernel runs in Pallas's
interpreter (slow; for tests on a CPU). Calls the kernel cannot take run
`blockwise_attention` (`unsupported` says why): not promised causal (a prefill into the
decode cache, whose mask comes from the cache positions), a length that no block of
SPLASH_BLOCKS rows divides (shorter than 128 or not a multiple of 128), key heads other
than the query heads, or batch rows or heads that the mesh axes do not divide.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from dsjax.attention import blockwise_attention

# Block rows (queries and keys) the kernel may use, most preferred first; each a multiple
# of the TPU's 128 lanes. A call's block is the first that divides its length.
SPLASH_BLOCKS = (512, 256, 128)


def block_size(T: int) -> int | None:
    """Rows per block of a call of length T: the first of SPLASH_BLOCKS dividing T, or None."""
    return next((b for b in SPLASH_BLOCKS if T % b == 0), None)


def segments_from_mask(mask: jnp.ndarray) -> jnp.ndarray:
    """The segment ids of a causal mask with packed segments, mask bool [B, T, T] (causal &
    equal segment ids) -> int32 [B, T]: each query's first visible key (the first
    position of its segment's id), so causal & equal ids rebuilds `mask` exactly."""
    return jnp.argmax(mask, axis=-1).astype(jnp.int32)


def _mesh_axes(B: int, H: int):
    """(batch mesh axes, head mesh axes) to run the kernel per device under the active mesh,
    () each where unsplit; None without a mesh of several devices; 'indivisible' where the
    rules split B or H over axes whose size does not divide it."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return None
    flat = lambda a: () if a is None else ((a,) if isinstance(a, str) else tuple(a))  # noqa: E731
    spec = nn.logical_to_mesh_axes(("batch", "seq", "heads", "head_dim"))
    if spec is None:
        return (), ()
    batch, heads = (tuple(a for a in flat(spec[i]) if mesh.shape[a] > 1) for i in (0, 2))
    if B % math.prod(mesh.shape[a] for a in batch) or H % math.prod(mesh.shape[a] for a in heads):
        return "indivisible"
    return batch, heads


def unsupported(q, k, v, causal: bool) -> str | None:
    """Why the kernel cannot take this call (q [B, T, H, K], k [B, S, H', K], v [B, S, H', V]),
    or None where it can."""
    B, T, H, _ = q.shape
    if not causal or k.shape[1] != T:
        return "not promised causal over the same positions"
    if block_size(T) is None:
        return f"length {T} is not a multiple of {SPLASH_BLOCKS[-1]}"
    if k.shape[2] != H or v.shape[2] != H:
        return f"{k.shape[2]} key heads for {H} query heads"
    if _mesh_axes(B, H) == "indivisible":
        return "the mesh axes do not divide the batch rows or the heads"
    return None


def _kernel(H: int, T: int, interpret: bool):
    """The splash kernel for H heads of T causal queries and keys, one batch row."""
    b = block_size(T)
    # The backward pass runs the dq and the dk/dv kernels apart: the fused kernel keeps a
    # partial dq per key block ([T / b, H, T, K] in q's dtype, summed afterwards).
    sizes = splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                              block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    mask = splash.MultiHeadMask([splash.CausalMask((T, T))] * H)
    return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _local(q, k, v, segment_ids, scale: float):
    """The kernel on one device's rows: q [B, T, H, K], k [B, T, H, K], v [B, T, H, V],
    segment_ids int32 [B, T] -> [B, T, H, V] in q's dtype."""
    B, T, H, _ = q.shape
    heads = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  [B, T, H, *] <-> [B, H, T, *]
    q = heads(q * jnp.asarray(scale, q.dtype))
    k, v = heads(k), heads(v)

    def run(interpret, q, k, v, ids):
        kernel = _kernel(H, T, interpret)
        one = lambda q, k, v, ids: kernel(q, k, v, segment_ids=splash.SegmentIds(ids, ids))  # noqa: E731
        return jax.vmap(one)(q, k, v, ids)

    o = jax.lax.platform_dependent(q, k, v, segment_ids, tpu=functools.partial(run, False),
                                   default=functools.partial(run, True))
    return heads(o)


def splash_attention(q, k, v, segment_ids, scale: float) -> jnp.ndarray:
    """Causal softmax(q k^T * scale) v within segments, through the splash kernel.

    q: [B, T, H, K]; k: [B, T, H, K]; v: [B, T, H, V]; segment_ids: int [B, T] (a query
    sees the keys at or before it with its own id). Returns [B, T, H, V] in q's dtype.
    Takes only calls `unsupported` passes. Under a mesh of several devices it runs per
    device (`shard_map`) over the batch and head mesh axes of the logical-axis rules.
    """
    B, _, H, _ = q.shape
    local = functools.partial(_local, scale=float(scale))
    axes = _mesh_axes(B, H)
    if not axes:
        return local(q, k, v, segment_ids)
    from jax.sharding import PartitionSpec as P

    batch, heads = (a or None for a in axes)
    rows, ids = P(batch, None, heads, None), P(batch, None)
    return jax.shard_map(local, in_specs=(rows, rows, rows, ids), out_specs=rows, check_vma=False)(
        q, k, v, segment_ids.astype(jnp.int32))


def splash_or_blockwise(q, k, v, mask, scale: float, causal: bool = False) -> jnp.ndarray:
    """MLA's naive-form attention under `attn_kernel='splash'` (arguments as
    `blockwise_attention`'s: q [B, T, H, K], k [B, S, H, K], v [B, S, H, V], mask bool
    [B, T, S]): the splash kernel where it takes the call (`causal`: `mask` is causal with
    or without packed segments), else `blockwise_attention`. Returns [B, T, H, V]."""
    if unsupported(q, k, v, causal) is None:
        return splash_attention(q, k, v, segments_from_mask(mask), scale)
    return blockwise_attention(q, k, v, mask, scale, causal=causal)
