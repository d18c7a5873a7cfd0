"""Multi-Token Prediction modules (DeepSeek-V3 §2.2, equations 21-23).

Module k combines the previous depth's representation h^{k-1}_t with the embedding of
token t+k: h'_t = M_k [RMSNorm(Emb(t_{t+k})); RMSNorm(h^{k-1}_t)] (`enorm`, `hnorm`,
`eh_proj`; equation 21 writes h first, but DeepSeek's released `eh_proj` weights take the
embedding first, as vLLM reads them), runs one full decoder block on it, and its output,
normalized by its own `norm` (HF `shared_head.norm`), goes through the output head shared
with the main model. The embedding is shared too. For k = 1, h^0 is the main model's final
normalized hidden state, as DeepSeek's released MTP weights are used for speculative decoding.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from dsjax.block import Block
from dsjax.config import ModelConfig
from dsjax.layers import RMSNorm, dtype_of, linear, param, weight_copy


class MTP(nn.Module):
    """One MTP depth.

    Args (call): h_prev [B, T, D]; emb [B, T, D] (embedding of token t+k at t);
      cos/sin [B, T, R/2]; mask bool [B, T, T]; positions [B, T] (used by the cache when decoding).
    Returns: (h [B, T, D] for the next depth, normalized h for the head, block aux).
    """

    cfg: ModelConfig
    moe: bool
    decode: bool = False

    @nn.compact
    def __call__(self, h_prev, emb, cos, sin, mask, positions):
        cfg, dt = self.cfg, dtype_of(self.cfg.dtype)
        e = RMSNorm(cfg, cfg.rms_norm_eps, name="enorm")(emb.astype(dt))
        h = RMSNorm(cfg, cfg.rms_norm_eps, name="hnorm")(h_prev.astype(dt))
        w = param(self, "eh_proj", (2 * cfg.hidden_size, cfg.hidden_size), ("mtp_concat", "embed"))
        x = linear(cfg, jnp.concatenate([e, h], axis=-1), w, copy=weight_copy(self, "eh_proj_t"))
        x, aux = Block(cfg, moe=self.moe, decode=self.decode, name="block")(x, cos, sin, mask, positions)
        return x, RMSNorm(cfg, cfg.rms_norm_eps, name="norm")(x), aux
