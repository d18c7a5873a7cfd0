"""Rotary position embedding with YaRN, as DeepSeek-V2 §2.1.3 (decoupled RoPE) uses it.

The rotary part of queries and keys has width R = qk_rope_head_dim. DeepSeek's
checkpoints rotate interleaved pairs (x0, x1), (x2, x3), ... (`rope_interleave=True`);
`rope_interleave=False` rotates the halves (x[:R/2], x[R/2:]) instead.

YaRN (Peng et al. 2023, used by DeepSeek-V2/V3 for 128K context) blends interpolated and
extrapolated frequencies with a linear ramp between the dimensions that rotate
`beta_fast` and `beta_slow` times over the original context, and multiplies cos/sin by
mscale(factor, mscale) / mscale(factor, mscale_all_dim); the softmax-scale correction
(mscale(factor, mscale_all_dim)^2) lives in `ModelConfig.softmax_scale`.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from dsjax.config import ModelConfig, yarn_get_mscale


def _correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    return (dim * math.log(max_pos / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def inv_frequencies(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """Returns (inv_freq [R/2] float32, attention_factor) for the config's RoPE."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    pos_freqs = np.float32(base) ** exponents
    inv_freq = (1.0 / pos_freqs).astype(np.float32)
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq, 1.0
    low = math.floor(_correction_dim(rs.beta_fast, dim, base, rs.original_max_position_embeddings))
    high = math.ceil(_correction_dim(rs.beta_slow, dim, base, rs.original_max_position_embeddings))
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extrapolation = 1 - ramp
    interpolated = (1.0 / (np.float32(rs.factor) * pos_freqs)).astype(np.float32)
    inv_freq = interpolated * (1 - extrapolation) + inv_freq * extrapolation
    if rs.mscale and rs.mscale_all_dim:
        attn_factor = yarn_get_mscale(rs.factor, rs.mscale) / yarn_get_mscale(rs.factor, rs.mscale_all_dim)
    else:
        attn_factor = yarn_get_mscale(rs.factor)
    return inv_freq.astype(np.float32), float(attn_factor)


def rope_tables(cfg: ModelConfig, positions: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos and sin for integer positions.

    Args:
      positions: int [B, T].
    Returns:
      (cos, sin), each float32 [B, T, R/2], already multiplied by YaRN's attention factor.
    """
    inv_freq, factor = inv_frequencies(cfg)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, R/2]
    return jnp.cos(angles) * factor, jnp.sin(angles) * factor


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray, interleave: bool = True) -> jnp.ndarray:
    """Rotates the last axis of x.

    Args:
      x: [B, T, ..., R]; any number of axes between T and R (heads).
      cos, sin: [B, T, R/2].
    Returns:
      Rotated x, same shape and dtype, in the same (interleaved or half) layout.
    """
    extra = x.ndim - 3
    c = cos.reshape(cos.shape[:2] + (1,) * extra + cos.shape[2:])
    s = sin.reshape(sin.shape[:2] + (1,) * extra + sin.shape[2:])
    xf = x.astype(jnp.float32)
    if interleave:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = jnp.stack([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).reshape(x.shape)
    else:
        half = x.shape[-1] // 2
        x1, x2 = xf[..., :half], xf[..., half:]
        out = jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
    return out.astype(x.dtype)
