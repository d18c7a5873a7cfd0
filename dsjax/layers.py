"""Building blocks shared by MLA, MoE and the decoder: RMSNorm, SwiGLU MLP, parameters,
and the linear layer every projection goes through.

Every parameter is created with logical axis names (`nn.with_logical_partitioning`), so
`sharding/rules.py` can place it without knowing the model. Every product with a weight
runs through `matmul`, the implementation `matmul_impl` names in `dsjax.impl` (x @ w
where none is registered), which may read a weight copy decoding made
(`weight_copy`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsjax import impl
from dsjax.config import ModelConfig
from dsjax.fp8 import fp8_matmul


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


def weight_copy(module: nn.Module, name: str) -> jnp.ndarray | None:
    """`module`'s copy `name` of one of its weights in the `impl.DECODE_COPIES` collection
    (made once per `dsjax.generate` call by the platform's decode hook, e.g. a weight
    transposed for a few-row kernel), or None where there is none."""
    if module.has_variable(impl.DECODE_COPIES, name):
        return nn.unbox(module.get_variable(impl.DECODE_COPIES, name))
    return None


def matmul(cfg: ModelConfig, x: jnp.ndarray, w: jnp.ndarray, copy: jnp.ndarray | None = None) -> jnp.ndarray:
    """x [..., K] @ w [K, N] -> [..., N], differentiable, through the linear-layer
    implementation `cfg.matmul_impl` (a registered 'matmul' hook; x @ w where none is).
    `copy`: the weight as [N, K] (`weight_copy`), which a hook may read instead of w."""
    fn = impl.lookup("matmul", impl.resolved(cfg).matmul_impl)
    return x @ w if fn is None else fn(x, w, copy)


def linear(cfg: ModelConfig, x: jnp.ndarray, w: jnp.ndarray, contract: int = 1,
           copy: jnp.ndarray | None = None) -> jnp.ndarray:
    """x [..., *w.shape[:contract]] @ w -> [..., *w.shape[contract:]] in the compute dtype.
    `copy`: the weight flattened and transposed, [N, K] (`weight_copy`), for `matmul`.

    With `cfg.precision == 'fp8'` the product runs through DeepSeek-V3's FP8 recipe
    (dsjax.fp8.fp8_matmul, multiplying as `cfg.fp8_gemm` says, with power-of-two scales
    if `cfg.fp8_pow2_scales`), forward and backward.
    """
    dt = dtype_of(cfg.dtype)
    in_shape, out_shape = w.shape[:contract], w.shape[contract:]
    k = 1
    for d in in_shape:
        k *= d
    n = 1
    for d in out_shape:
        n *= d
    lead = x.shape[:x.ndim - contract]
    x2 = x.reshape(lead + (k,)).astype(dt)
    w2 = w.reshape(k, n).astype(dt)
    if cfg.precision == "fp8":
        y = fp8_matmul(x2, w2, pow2=cfg.fp8_pow2_scales, gemm=impl.resolved(cfg).fp8_gemm)
    else:
        y = matmul(cfg, x2, w2, None if copy is None else copy.reshape(n, k).astype(dt))
    return y.reshape(lead + out_shape)


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

    def setup(self):
        cfg = self.cfg
        self.w1 = param(self, "w1", (cfg.hidden_size, self.hidden), ("embed", "mlp"))
        self.w3 = param(self, "w3", (cfg.hidden_size, self.hidden), ("embed", "mlp"))
        self.w2 = param(self, "w2", (self.hidden, cfg.hidden_size), ("mlp", "embed"))

    def weights(self) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
        """(w1 [D, hidden], w3 [D, hidden], w2 [hidden, D]) in the compute dtype."""
        dt = dtype_of(self.cfg.dtype)
        return self.w1.astype(dt), self.w3.astype(dt), self.w2.astype(dt)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        cfg = self.cfg
        copy = lambda name: weight_copy(self, name + "_t")  # noqa: E731
        h = nn.silu(linear(cfg, x, self.w1, copy=copy("w1"))) * linear(cfg, x, self.w3, copy=copy("w3"))
        h = nn.with_logical_constraint(h, ("batch", "seq", "mlp"))
        return linear(cfg, h, self.w2, copy=copy("w2"))
