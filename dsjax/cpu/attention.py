"""The CPU wing's attention (`attn_kernel='cpu'`): MLA's naive form through the native
attention kernel, and a decode step's absorbed attention through the latent kernel.

- 'attention': softmax attention with a key and value head per query head, float32,
  through `kernels.attention_fwd` / `attention_bwd` (`native_attention`, with its
  gradient); anything else (other dtypes, a shared key head, a multi-device mesh) runs
  `dsjax.attention.blockwise_attention`.
- 'latent_attention': absorbed MLA's attention of a decode step of up to
  LATENT_KERNEL_QUERIES new tokens a row, W_UV included, in one call
  (`kernels.latent_attention`); anything else runs the reference MLA hands in.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dsjax import impl
from dsjax.attention import blockwise_attention
from dsjax.cpu import kernels

# Most new tokens a row for which a decode step's absorbed attention runs the native
# kernel; a longer call (a prompt's prefill) runs the reference's GEMMs.
LATENT_KERNEL_QUERIES = 16


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def native_attention(q, k, v, mask, scale: float):
    """`blockwise_attention`'s product through the native kernel
    (`kernels.attention_fwd` / `attention_bwd`: each batch row and head one work item, its
    query chunks' scores in cache, keys past a chunk's last visible one skipped), with its
    gradient. q [B, T, H, K], k [B, S, H, K], v [B, S, H, V] (a head per query head),
    mask bool [B, T, S]; float32 [B, T, H, V]. Call only where `kernels.applies`."""
    return kernels.attention_fwd(q, k, v, mask, scale)[0]


def _native_fwd(q, k, v, mask, scale):
    o, lse = kernels.attention_fwd(q, k, v, mask, scale)
    return o, (q, k, v, mask, o, lse)


def _native_bwd(scale, res, do):
    q, k, v, mask, o, lse = res
    dq, dk, dv = kernels.attention_bwd(q, k, v, mask, o, lse, do, scale)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


native_attention.defvjp(_native_fwd, _native_bwd)


def native_or_blockwise(q, k, v, mask, scale: float, causal: bool = False) -> jnp.ndarray:
    """`blockwise_attention` (arguments alike, [B, T, H, *] layout), run by the native
    kernel (`native_attention`) where it applies: a key and value head per query head,
    all float32, no multi-device mesh, the kernels built (`kernels.applies`;
    `DSJAX_CPU_KERNELS=0` turns them off)."""
    if k.shape[2] == q.shape[2] and kernels.applies(q.dtype, k.dtype, v.dtype):
        return jax.lax.platform_dependent(
            q, k, v, mask, cpu=lambda q, k, v, m: native_attention(q, k, v, m, float(scale)),
            default=lambda q, k, v, m: blockwise_attention(q, k, v, m, scale, causal=causal))
    return blockwise_attention(q, k, v, mask, scale, causal=causal)


def latent_attention(q_lat, q_pe, c_kv, k_pe, mask, w_heads, positions, v0: int, scale: float, reference):
    """A decode step's absorbed attention: q_lat [B, T, H, C] and q_pe [B, T, H, R] against
    the cached latents c_kv [B, S, C] and k_pe [B, S, R], slot s visible to query (b, t)
    where s <= positions[b, t], then W_UV (w_heads [H, C, K + V] from column v0) ->
    [B, T, H, V]. Runs the native kernel for up to LATENT_KERNEL_QUERIES queries a row in
    float32 where it applies, else `reference(q_lat, q_pe, c_kv, k_pe, mask, w_heads)`."""
    args = (q_lat, q_pe, c_kv, k_pe, mask, w_heads)
    if q_lat.shape[1] <= LATENT_KERNEL_QUERIES and kernels.applies(q_lat.dtype, q_pe.dtype, c_kv.dtype,
                                                                  k_pe.dtype, w_heads.dtype):
        return jax.lax.platform_dependent(
            *args, cpu=lambda q, r, c, k, _, w: kernels.latent_attention(q, r, c, k, positions, w, v0, scale),
            default=reference)
    return reference(*args)


impl.register("attention", "cpu", native_or_blockwise)
impl.register("latent_attention", "cpu", latent_attention)
