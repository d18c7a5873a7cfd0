"""One DeepSeek decoder layer (DeepSeek-V3 Figure 2): pre-norm MLA, then a dense SwiGLU
MLP or a DeepSeekMoE FFN, each with a residual connection."""

from __future__ import annotations

import flax.linen as nn
import jax

from dsjax.config import ModelConfig
from dsjax.layers import MLP, RMSNorm
from dsjax.mla import MLA
from dsjax.moe import MoE


class Block(nn.Module):
    """Pre-norm decoder block: x + MLA(norm(x)), then x + FFN(norm(x)).

    x: [B, T, D] -> (x, (loads [E], balance [])) for MoE blocks, (x, ()) for dense ones.
    With `decode`, attention reads and writes the KV cache at `positions` [B, T].
    """

    cfg: ModelConfig
    moe: bool
    decode: bool = False

    @nn.compact
    def __call__(self, x, cos, sin, mask, positions):
        cfg = self.cfg
        x = nn.with_logical_constraint(x, ("batch", "seq", "embed"))
        with jax.named_scope("attention"):
            h = MLA(cfg, name="attn")(RMSNorm(cfg, cfg.rms_norm_eps, name="attn_norm")(x), cos, sin, mask,
                                      positions, self.decode)
        x = x + h.astype(x.dtype)
        normed = RMSNorm(cfg, cfg.rms_norm_eps, name="ffn_norm")(x)
        if self.moe:
            with jax.named_scope("moe"):
                y, loads, balance = MoE(cfg, name="ffn")(normed)
            return x + y, (loads, balance)
        with jax.named_scope("mlp"):
            y = MLP(cfg, cfg.intermediate_size, name="ffn")(normed)
        return x + y.astype(x.dtype), ()
