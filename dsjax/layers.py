"""Building blocks shared by MLA, MoE and the decoder: RMSNorm, SwiGLU MLP, parameters.

Every parameter is created with logical axis names (`nn.with_logical_partitioning`), so
`sharding/rules.py` can place it without knowing the model.
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsjax import cpu_kernels
from dsjax.config import ModelConfig
from dsjax.fp8 import fp8_matmul

# Few-row products (a decode step's rows) of up to this many rows run through the native
# kernel where it applies (`rows_kernel_applies`).
ROWS_KERNEL_MAX = 32


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


def transposed(a: jnp.ndarray) -> jnp.ndarray:
    """a.T [N, M] for the left operand of a GEMM such as a weight gradient a.T @ g. On a
    CPU it is materialized (the barrier keeps XLA from folding the transpose back into
    the dot): XLA:CPU runs a dot that contracts its left operand's leading dimension
    through Eigen, at about half the rate of its YNNPACK GEMMs, after transposing the
    other operand, while [N, M] x [M, P] is a plain GEMM. Elsewhere it is a.T."""
    return jax.lax.optimization_barrier(a.T) if jax.default_backend() == "cpu" else a.T


@jax.custom_vjp
def _matmul_t(x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
    return x @ w


def _matmul_t_fwd(x, w):
    return x @ w, (x, w)


def _matmul_t_bwd(res, dy):
    x, w = res
    dw = transposed(x.reshape(-1, x.shape[-1])) @ dy.reshape(-1, dy.shape[-1])
    return (dy @ w.T).astype(x.dtype), dw.astype(w.dtype)


_matmul_t.defvjp(_matmul_t_fwd, _matmul_t_bwd)


def rows_kernel_applies(rows: int, dtype) -> bool:
    """A product of `rows` rows (at most ROWS_KERNEL_MAX) in `dtype` runs through the native
    kernel (`cpu_kernels.rows_dot`, given the weight transposed) where the kernels run
    (`cpu_kernels.applies`: float32, a CPU backend, no multi-device mesh, built). Beyond 32
    rows (a prefill) XLA's GEMMs run."""
    return rows <= ROWS_KERNEL_MAX and cpu_kernels.applies(dtype)


@jax.custom_vjp
def _rows_matmul(x: jnp.ndarray, wt: jnp.ndarray) -> jnp.ndarray:
    return jax.lax.platform_dependent(x, wt, cpu=cpu_kernels.rows_dot, default=lambda x, wt: x @ wt.T)


def _rows_matmul_fwd(x, wt):
    return _rows_matmul(x, wt), (x, wt)


def _rows_matmul_bwd(res, dy):
    x, wt = res
    return (dy @ wt).astype(x.dtype), (dy.T @ x).astype(wt.dtype)


_rows_matmul.defvjp(_rows_matmul_fwd, _rows_matmul_bwd)


def matmul(x: jnp.ndarray, w: jnp.ndarray, wt: jnp.ndarray | None = None) -> jnp.ndarray:
    """x [..., K] @ w [K, N], differentiable. On a CPU the weight gradient x^T dy is a
    plain GEMM from a materialized x^T (`transposed`): autodiff's form of it ran at about
    half the GEMM rate and transposed dy, the larger operand, first.

    `wt`, the same weight transposed [N, K] (decoding's copy, `dsjax.model.decode_weights`),
    lets a few-row product run through the native kernel (`rows_kernel_applies`): with the
    weights cold, XLA:CPU read [8, 512] x [512, 16384] at 5.5 GB/s, the kernel at 13.8
    (one row: 29.7 and 34.5 GB/s)."""
    rows = 1
    for d in x.shape[:-1]:
        rows *= d
    if wt is not None and rows_kernel_applies(rows, x.dtype) and wt.dtype == x.dtype:
        y = _rows_matmul(x.reshape(rows, x.shape[-1]), wt)
        return y.reshape(x.shape[:-1] + (wt.shape[0],))
    if jax.default_backend() == "cpu":
        return _matmul_t(x, w)
    return x @ w


def decode_transposed(module: nn.Module, name: str) -> jnp.ndarray | None:
    """`module`'s copy of its parameter `name` as [N, K] for `matmul`'s `wt`, where decoding
    made one (`dsjax.model.decode_weights`, key `name + '_t'`); else None."""
    if module.has_variable("decode_weights", name + "_t"):
        return nn.unbox(module.get_variable("decode_weights", name + "_t"))
    return None


def linear(cfg: ModelConfig, x: jnp.ndarray, w: jnp.ndarray, contract: int = 1,
           wt: jnp.ndarray | None = None) -> jnp.ndarray:
    """x [..., *w.shape[:contract]] @ w -> [..., *w.shape[contract:]] in the compute dtype.
    `wt`: the weight as [N, K] (`decode_transposed`), for `matmul`'s few-row kernel.

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
        y = fp8_matmul(x2, w2, pow2=cfg.fp8_pow2_scales, gemm=cfg.fp8_gemm)
    else:
        y = matmul(x2, w2, None if wt is None else wt.reshape(n, k).astype(dt))
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

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        cfg = self.cfg
        w1 = param(self, "w1", (cfg.hidden_size, self.hidden), ("embed", "mlp"))
        w3 = param(self, "w3", (cfg.hidden_size, self.hidden), ("embed", "mlp"))
        w2 = param(self, "w2", (self.hidden, cfg.hidden_size), ("mlp", "embed"))
        t = lambda name: decode_transposed(self, name)  # noqa: E731
        h = nn.silu(linear(cfg, x, w1, wt=t("w1"))) * linear(cfg, x, w3, wt=t("w3"))
        h = nn.with_logical_constraint(h, ("batch", "seq", "mlp"))
        return linear(cfg, h, w2, wt=t("w2"))
