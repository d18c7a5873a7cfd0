"""Multi-head Latent Attention (DeepSeek-V2 §2.1, equations 9-19).

Queries: c_q = RMSNorm(x W_DQ) (`wq_a`, `q_norm`), q = c_q W_UQ (`wq_b`), or q = x W_Q
(`wq`) when q_lora_rank is None. Keys and values: [c_kv; k_pe] = x W_DKV (`wkv_a`),
c_kv <- RMSNorm(c_kv) (`kv_norm`), [k_nope; v] = c_kv W_UKV (`wkv_b`), and the decoupled
RoPE key k_pe is shared by all heads. Output: o W_O (`wo`).

Two implementations share the weights and check each other:
- `naive` expands c_kv into per-head keys and values (the training path);
- `absorb` folds W_UK into the query and W_UV into the output, so attention runs on the
  latent c_kv and k_pe directly (§2.1.2, the inference path caching C + R values/token).

The naive form's attention runs the kernel `impl.attention_kernel` names: the dense
scores, `blockwise` (dsjax/attention.py), `cudnn`, `splash` (dsjax/splash_attention.py,
TPUs) or a platform wing's. Platform hooks (`dsjax.impl`): the naive form's attention
kernel ('attention'), a decode step's absorbed attention ('latent_attention', under
`attn_kernel`) and the query projection with W_UK folded in ('folded_query', under
`matmul_impl`); each falls back to the reference form here.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsjax import impl
from dsjax.attention import blockwise_attention, cudnn_or_blockwise
from dsjax.config import ModelConfig
from dsjax.layers import RMSNorm, dtype_of, linear, matmul, param, weight_copy
from dsjax.rope import apply_rope
from dsjax.splash_attention import splash_or_blockwise

_NEG_INF = -1e30


def masked_softmax(scores: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """Softmax over the last axis in float32. scores: [B, H, T, S]; mask: bool [B, T, S]."""
    scores = jnp.where(mask[:, None], scores.astype(jnp.float32), _NEG_INF)
    return jax.nn.softmax(scores, axis=-1)


class CacheSlot(nn.Module):
    """One decode-cache array [B, S, ...] in the `cache` collection, with the logical axis
    `names` of its dimensions (so a sharded run places it as the activations it holds).

    Writes value [B, T, ...] at positions [B, T] and returns the whole cache. At init
    (tokens [B, S]) it creates the cache with S slots.
    """

    names: tuple[str, ...]

    @nn.compact
    def __call__(self, value: jnp.ndarray, positions: jnp.ndarray) -> jnp.ndarray:
        var = self.variable("cache", "value", nn.with_logical_partitioning(jnp.zeros, self.names), value.shape,
                            value.dtype)
        rows = jnp.arange(value.shape[0])[:, None]
        var.value = nn.with_logical_constraint(var.value.at[rows, positions].set(value.astype(var.value.dtype)),
                                               self.names)
        return var.value


class MLA(nn.Module):
    """MLA block. x: [B, T, D], cos/sin: [B, T, R/2], mask: bool [B, T, S] -> [B, T, D]."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        H, K, R, V, C, D = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                            cfg.v_head_dim, cfg.kv_lora_rank, cfg.hidden_size)
        if cfg.q_lora_rank is None:
            self.wq = param(self, "wq", (D, H, K + R), ("embed", "heads", "head_dim"))
        else:
            self.wq_a = param(self, "wq_a", (D, cfg.q_lora_rank), ("embed", "q_lora"))
            self.q_norm = RMSNorm(cfg, eps=1e-6, axis_name="q_lora")
            self.wq_b = param(self, "wq_b", (cfg.q_lora_rank, H, K + R), ("q_lora", "heads", "head_dim"))
        self.wkv_a = param(self, "wkv_a", (D, C + R), ("embed", "kv_lora"))
        self.kv_norm = RMSNorm(cfg, eps=1e-6, axis_name="kv_lora")
        self.wkv_b = param(self, "wkv_b", (C, H, K + V), ("kv_lora", "heads", "head_dim"))
        self.wo = param(self, "wo", (H, V, D), ("heads", "head_dim", "embed"))
        if cfg.attn_impl == "absorb":
            self.cache_c_kv = CacheSlot(("batch", "seq", "kv_lora"))
            self.cache_k_pe = CacheSlot(("batch", "seq", "head_dim"))
        else:
            heads = ("batch", "seq", "heads", "head_dim")
            self.cache_k, self.cache_v = CacheSlot(heads), CacheSlot(heads)

    def folded(self, rows: int) -> jnp.ndarray | None:
        """The query projection with W_UK folded in, transposed, [H * (C + R), q_lora or D],
        where the platform's 'folded_query' hook gives one for a product of `rows` rows
        (a decode step's copy); else None."""
        fold = impl.lookup("folded_query", impl.resolved(self.cfg).matmul_impl)
        wq = None if fold is None else fold(self, rows)
        return None if wq is None else wq.astype(dtype_of(self.cfg.dtype))

    def queries(self, x: jnp.ndarray, cos, sin, folded=None) -> tuple[jnp.ndarray, jnp.ndarray]:
        """x: [B, T, D] -> (q_nope [B, T, H, K], q_pe [B, T, H, R] roped). With `folded`
        (`MLA.folded`'s query), the first is the latent query q_nope W_UK [B, T, H, C]."""
        cfg = self.cfg
        wq = folded
        if cfg.q_lora_rank is None:
            if wq is None:
                q = linear(cfg, x, self.wq, copy=weight_copy(self, "wq_t"))  # [B, T, H, K + R]
            else:
                q = matmul(cfg, x, wq.T, wq)
        else:
            c_q = self.q_norm(linear(cfg, x, self.wq_a, copy=weight_copy(self, "wq_a_t")))
            if wq is None:
                q = linear(cfg, c_q, self.wq_b, copy=weight_copy(self, "wq_b_t"))
            else:
                q = matmul(cfg, c_q, wq.T, wq)
        if wq is not None:  # [B, T, H * (C + R)]
            q = q.reshape(q.shape[:-1] + (cfg.num_attention_heads, -1))
        R = cfg.qk_rope_head_dim
        q = nn.with_logical_constraint(q, ("batch", "seq", "heads", "head_dim"))
        q_nope, q_pe = q[..., :-R], q[..., -R:]
        return q_nope, apply_rope(q_pe, cos, sin, cfg.rope_interleave)

    def latents(self, x: jnp.ndarray, cos, sin) -> tuple[jnp.ndarray, jnp.ndarray]:
        """x: [B, S, D] -> (c_kv [B, S, C] normalized, k_pe [B, S, R] roped): what MLA caches."""
        cfg = self.cfg
        kv = linear(cfg, x, self.wkv_a, copy=weight_copy(self, "wkv_a_t"))
        c_kv = self.kv_norm(kv[..., :cfg.kv_lora_rank])
        k_pe = apply_rope(kv[..., cfg.kv_lora_rank:], cos, sin, cfg.rope_interleave)
        return c_kv, k_pe

    def expand(self, c_kv, k_pe):
        """Per-head keys and values from latents: c_kv [B, S, C], k_pe [B, S, R] ->
        (k [B, S, H, K + R], v [B, S, H, V]), the rope key repeated for every head."""
        K = self.cfg.qk_nope_head_dim
        kv = linear(self.cfg, c_kv, self.wkv_b)  # [B, S, H, K + V]
        k_nope, v = kv[..., :K], kv[..., K:]
        k_nope = nn.with_logical_constraint(k_nope, ("batch", "seq", "heads", "head_dim"))
        k_rope = jnp.broadcast_to(k_pe[:, :, None, :], k_pe.shape[:2] + (k_nope.shape[2], k_pe.shape[-1]))
        return jnp.concatenate([k_nope, k_rope.astype(k_nope.dtype)], axis=-1), v

    def attend_expanded(self, q, k, v, mask, causal: bool = False) -> jnp.ndarray:
        """Naive attention. q: [B, T, H, K + R]; k: [B, S, H, K + R]; v: [B, S, H, V] -> [B, T, D].
        `causal`: `mask` is causal over the same positions (see `blockwise_attention`)."""
        dt = dtype_of(self.cfg.dtype)
        scale = self.cfg.softmax_scale
        kernel = impl.attention_kernel(self.cfg, q.shape[1])
        if kernel == "dense":
            with jax.named_scope("naive_attention"):
                scores = jnp.einsum("bthk,bshk->bhts", q, k)
                probs = masked_softmax(scores * scale, mask).astype(dt)
                o = jnp.einsum("bhts,bshv->bthv", probs, v)
        elif kernel == "cudnn":
            with jax.named_scope("cudnn_attention"):
                o = cudnn_or_blockwise(q, k, v, mask, scale, causal=causal).astype(dt)
        elif kernel == "splash":
            with jax.named_scope("splash_attention"):
                o = splash_or_blockwise(q, k, v, mask, scale, causal=causal).astype(dt)
        else:
            hook = impl.lookup("attention", kernel)
            with jax.named_scope("blockwise_attention"):
                if hook is None:
                    o = blockwise_attention(q, k, v, mask, scale, causal=causal).astype(dt)
                else:
                    o = hook(q, k, v, mask, scale, causal).astype(dt)
        o = nn.with_logical_constraint(o, ("batch", "seq", "heads", "head_dim"))
        return linear(self.cfg, o, self.wo, contract=2, copy=weight_copy(self, "wo_t"))

    def attend_latent(self, q_nope, q_pe, c_kv, k_pe, mask, causal: bool = False, folded=None,
                      positions=None) -> jnp.ndarray:
        """Absorbed attention on the latents (W_UK folded into q, W_UV applied after).

        q_nope: [B, T, H, K]; q_pe: [B, T, H, R]; c_kv: [B, S, C]; k_pe: [B, S, R] -> [B, T, D].
        With `folded` (`MLA.folded`'s query), q_nope is already the latent query [B, T, H,
        C]. `positions` [B, T] (decoding): `mask` is the decode mask, slot s <= positions[b, t].
        """
        dt = dtype_of(self.cfg.dtype)
        K = self.cfg.qk_nope_head_dim
        # W_UK = wkv_b[..., :K] and W_UV = wkv_b[..., K:] are used in place, not sliced out
        # (a copy of wkv_b per call): the query is zero-padded over the V columns, and the
        # output's first K columns are dropped. Both products are per head, so they read
        # wkv_b head-major, [H, C, K + V]: a decode hook may hand in that copy
        # (`wkv_b_heads`, made once per `generate` call), else it is transposed here.
        w_heads = weight_copy(self, "wkv_b_heads")
        w_heads = self.wkv_b.transpose(1, 0, 2) if w_heads is None else w_heads
        w_heads = w_heads.astype(dt)
        with jax.named_scope("absorbed_attention"):
            if folded is None:
                q_pad = jnp.pad(q_nope, ((0, 0),) * 3 + ((0, w_heads.shape[-1] - K),))
                q_lat = jnp.einsum("bthk,hck->bthc", q_pad, w_heads)
            else:
                q_lat = q_nope
            o = self._latent_attention(q_lat, q_pe, c_kv, k_pe, mask, causal, w_heads, positions)
        o = nn.with_logical_constraint(o, ("batch", "seq", "heads", "head_dim"))
        return linear(self.cfg, o, self.wo, contract=2, copy=weight_copy(self, "wo_t"))

    def _latent_attention(self, q_lat, q_pe, c_kv, k_pe, mask, causal: bool, w_heads,
                          positions=None) -> jnp.ndarray:
        """q_lat [B, T, H, C], q_pe [B, T, H, R] against the latents c_kv [B, S, C] and k_pe
        [B, S, R], one shared key head [c_kv, k_pe] and value head c_kv for every query head,
        then W_UV (w_heads [H, C, K + V], its last V columns) -> [B, T, H, V]. A decode
        step (`positions` [B, T] given) runs the platform's 'latent_attention' hook for
        `attn_kernel` where one is registered, which may fall back to this reference."""
        K = self.cfg.qk_nope_head_dim

        def reference(q_lat, q_pe, c_kv, k_pe, mask, w_heads):
            o_lat = self._latent_mix(q_lat, q_pe, c_kv, k_pe, mask, causal)
            return jnp.einsum("bthc,hcv->bthv", o_lat, w_heads)[..., K:]

        hook = None if positions is None else impl.lookup("latent_attention", impl.resolved(self.cfg).attn_kernel)
        if hook is not None:
            return hook(q_lat, q_pe, c_kv, k_pe, mask, w_heads, positions, K, self.cfg.softmax_scale,
                        reference).astype(dtype_of(self.cfg.dtype))
        return reference(q_lat, q_pe, c_kv, k_pe, mask, w_heads)

    def _latent_mix(self, q_lat, q_pe, c_kv, k_pe, mask, causal: bool) -> jnp.ndarray:
        """The attention of `_latent_attention` before W_UV: o_lat [B, T, H, C]."""
        dt = dtype_of(self.cfg.dtype)
        scale = self.cfg.softmax_scale
        if impl.attention_kernel(self.cfg, q_lat.shape[1], absorbed=True) == "blockwise":
            keys = jnp.concatenate([c_kv, k_pe.astype(c_kv.dtype)], -1)[:, :, None]
            q_all = jnp.concatenate([q_lat, q_pe.astype(q_lat.dtype)], -1)
            return blockwise_attention(q_all, keys, c_kv[:, :, None], mask, scale, causal=causal).astype(dt)
        scores = jnp.einsum("bthc,bsc->bhts", q_lat, c_kv) + jnp.einsum("bthr,bsr->bhts", q_pe, k_pe)
        probs = masked_softmax(scores * scale, mask).astype(dt)
        return jnp.einsum("bhts,bsc->bthc", probs, c_kv)

    def __call__(self, x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray, mask: jnp.ndarray | None,
                 positions: jnp.ndarray | None = None, decode: bool = False) -> jnp.ndarray:
        """x: [B, T, D]. Training: `mask` bool [B, T, T], causal (`attention_mask`: no query
        sees a later position; the blockwise kernel skips those scores). Decoding
        (`decode=True`): the new tokens are written into the `cache` collection at
        `positions` [B, T] and attend to every cached slot at or before their own position
        (later slots are stale or empty).
        `absorb` caches c_kv [B, S, C] and k_pe [B, S, R]; `naive` caches K [B, S, H, K+R]
        and V [B, S, H, V]."""
        cfg = self.cfg
        x = x.astype(dtype_of(cfg.dtype))
        folded = self.folded(x.shape[0] * x.shape[1]) if cfg.attn_impl == "absorb" else None
        q_nope, q_pe = self.queries(x, cos, sin, folded)
        c_kv, k_pe = self.latents(x, cos, sin)
        cache_mask = lambda S: jnp.arange(S)[None, None, :] <= positions[:, :, None]  # [B, T, S]
        if cfg.attn_impl == "absorb":
            if decode:
                c_kv, k_pe = self.cache_c_kv(c_kv, positions), self.cache_k_pe(k_pe, positions)
                mask = cache_mask(c_kv.shape[1])
            return self.attend_latent(q_nope, q_pe, c_kv, k_pe, mask, causal=not decode, folded=folded,
                                      positions=positions if decode else None)
        k, v = self.expand(c_kv, k_pe)
        if decode:
            k, v = self.cache_k(k, positions), self.cache_v(v, positions)
            mask = cache_mask(k.shape[1])
        return self.attend_expanded(jnp.concatenate([q_nope, q_pe], -1), k, v, mask, causal=not decode)
