"""Multi-head Latent Attention (DeepSeek-V2 §2.1, equations 9-19).

Queries: c_q = RMSNorm(x W_DQ) (`wq_a`, `q_norm`), q = c_q W_UQ (`wq_b`), or q = x W_Q
(`wq`) when q_lora_rank is None. Keys and values: [c_kv; k_pe] = x W_DKV (`wkv_a`),
c_kv <- RMSNorm(c_kv) (`kv_norm`), [k_nope; v] = c_kv W_UKV (`wkv_b`), and the decoupled
RoPE key k_pe is shared by all heads. Output: o W_O (`wo`).

Two implementations share the weights and check each other:
- `naive` expands c_kv into per-head keys and values (the training path);
- `absorb` folds W_UK into the query and W_UV into the output, so attention runs on the
  latent c_kv and k_pe directly (§2.1.2, the inference path caching C + R values/token).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsjax.config import ModelConfig
from dsjax.layers import RMSNorm, dtype_of, param
from dsjax.rope import apply_rope

_NEG_INF = -1e30


def masked_softmax(scores: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """Softmax over the last axis in float32. scores: [B, H, T, S]; mask: bool [B, T, S]."""
    scores = jnp.where(mask[:, None], scores.astype(jnp.float32), _NEG_INF)
    return jax.nn.softmax(scores, axis=-1)


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

    def queries(self, x: jnp.ndarray, cos, sin) -> tuple[jnp.ndarray, jnp.ndarray]:
        """x: [B, T, D] -> (q_nope [B, T, H, K], q_pe [B, T, H, R] roped)."""
        cfg, dt = self.cfg, dtype_of(self.cfg.dtype)
        if cfg.q_lora_rank is None:
            q = jnp.einsum("btd,dhk->bthk", x, self.wq.astype(dt))
        else:
            c_q = self.q_norm(jnp.einsum("btd,dq->btq", x, self.wq_a.astype(dt)))
            q = jnp.einsum("btq,qhk->bthk", c_q, self.wq_b.astype(dt))
        q = nn.with_logical_constraint(q, ("batch", "seq", "heads", "head_dim"))
        q_nope, q_pe = q[..., :cfg.qk_nope_head_dim], q[..., cfg.qk_nope_head_dim:]
        return q_nope, apply_rope(q_pe, cos, sin, cfg.rope_interleave)

    def latents(self, x: jnp.ndarray, cos, sin) -> tuple[jnp.ndarray, jnp.ndarray]:
        """x: [B, S, D] -> (c_kv [B, S, C] normalized, k_pe [B, S, R] roped): what MLA caches."""
        cfg, dt = self.cfg, dtype_of(self.cfg.dtype)
        kv = jnp.einsum("bsd,dc->bsc", x, self.wkv_a.astype(dt))
        c_kv = self.kv_norm(kv[..., :cfg.kv_lora_rank])
        k_pe = apply_rope(kv[..., cfg.kv_lora_rank:], cos, sin, cfg.rope_interleave)
        return c_kv, k_pe

    def attend(self, q_nope, q_pe, c_kv, k_pe, mask) -> jnp.ndarray:
        """Attention of queries over latents, by `cfg.attn_impl`.

        Args:
          q_nope: [B, T, H, K]; q_pe: [B, T, H, R]; c_kv: [B, S, C]; k_pe: [B, S, R];
          mask: bool [B, T, S], True where query t may attend key s.
        Returns:
          [B, T, D].
        """
        cfg, dt = self.cfg, dtype_of(self.cfg.dtype)
        K = cfg.qk_nope_head_dim
        wkv_b = self.wkv_b.astype(dt)
        w_uk, w_uv = wkv_b[..., :K], wkv_b[..., K:]  # [C, H, K], [C, H, V]
        rope_scores = jnp.einsum("bthr,bsr->bhts", q_pe, k_pe)
        if cfg.attn_impl == "absorb":
            with jax.named_scope("absorbed_attention"):
                q_lat = jnp.einsum("bthk,chk->bthc", q_nope, w_uk)  # W_UK absorbed into q
                scores = jnp.einsum("bthc,bsc->bhts", q_lat, c_kv) + rope_scores
                probs = masked_softmax(scores * cfg.softmax_scale, mask).astype(dt)
                o_lat = jnp.einsum("bhts,bsc->bthc", probs, c_kv)
                o = jnp.einsum("bthc,chv->bthv", o_lat, w_uv)  # W_UV applied after attention
        else:
            with jax.named_scope("naive_attention"):
                k_nope = jnp.einsum("bsc,chk->bshk", c_kv, w_uk)
                v = jnp.einsum("bsc,chv->bshv", c_kv, w_uv)
                k_nope = nn.with_logical_constraint(k_nope, ("batch", "seq", "heads", "head_dim"))
                scores = jnp.einsum("bthk,bshk->bhts", q_nope, k_nope) + rope_scores
                probs = masked_softmax(scores * cfg.softmax_scale, mask).astype(dt)
                o = jnp.einsum("bhts,bshv->bthv", probs, v)
        o = nn.with_logical_constraint(o, ("batch", "seq", "heads", "head_dim"))
        return jnp.einsum("bthv,hvd->btd", o, self.wo.astype(dt))

    def __call__(self, x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
        x = x.astype(dtype_of(self.cfg.dtype))
        q_nope, q_pe = self.queries(x, cos, sin)
        c_kv, k_pe = self.latents(x, cos, sin)
        return self.attend(q_nope, q_pe, c_kv, k_pe, mask)
