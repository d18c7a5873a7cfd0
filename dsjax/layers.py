"""Building blocks shared by MLA, MoE and the decoder: RMSNorm, SwiGLU MLP, parameters.

Every parameter is created with logical axis names (`nn.with_logical_partitioning`), so
`sharding/rules.py` can place it without knowing the model.
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsjax.config import ModelConfig


def dtype_of(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def param(module: nn.Module, name: str, shape: Sequence[int], axes: Sequence[str | None],
          init: Callable | None = None, dtype=None) -> jnp.ndarray:
    """A parameter annotated with logical axis names.

    Weights default to normal(initializer_range), as DeepSeek's HF init does.
    """
    cfg: ModelConfig = module.cfg
    init = init or nn.initializers.normal(cfg.initializer_range)
    dtype = dtype or dtype_of(cfg.param_dtype)
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, cast back, then scaled (as DeepSeek / HF do)."""

    cfg: ModelConfig
    eps: float = 1e-6
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        weight = param(self, "weight", (x.shape[-1],), (self.axis_name,), nn.initializers.ones)
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return weight.astype(x.dtype) * xf.astype(x.dtype)


class MLP(nn.Module):
    """SwiGLU MLP: w2(silu(w1 x) * w3 x), used for dense layers and shared experts.

    x: [B, T, D] -> [B, T, D].
    """

    cfg: ModelConfig
    hidden: int

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        cfg, dt = self.cfg, dtype_of(self.cfg.dtype)
        w1 = param(self, "w1", (cfg.hidden_size, self.hidden), ("embed", "mlp"))
        w3 = param(self, "w3", (cfg.hidden_size, self.hidden), ("embed", "mlp"))
        w2 = param(self, "w2", (self.hidden, cfg.hidden_size), ("mlp", "embed"))
        x = x.astype(dt)
        h = nn.silu(jnp.einsum("btd,df->btf", x, w1.astype(dt))) * jnp.einsum("btd,df->btf", x, w3.astype(dt))
        h = nn.with_logical_constraint(h, ("batch", "seq", "mlp"))
        return jnp.einsum("btf,fd->btd", h, w2.astype(dt))
