"""The CPU wing's linear layers (`matmul_impl='cpu'`): weight gradients as plain GEMMs,
and a decode step's few-row products through the native kernel.

XLA:CPU runs a dot that contracts its left operand's leading dimension (autodiff's
weight gradient x^T dy) through Eigen, at about half the rate of its plain GEMMs, after
transposing the other operand; `matmul`'s custom VJP materializes x^T first
(`transposed`), so the weight gradient is a plain [K, M] x [M, N] GEMM. A product of up to
ROWS_KERNEL_MAX rows given the weight transposed (a decode step's copy,
`dsjax.cpu.decode.weight_copies`) runs as dot products of contiguous rows
(`kernels.rows_dot`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsjax import impl
from dsjax.cpu import kernels

# Few-row products (a decode step's rows) of up to this many rows run through the native
# kernel where it applies (`rows_kernel_applies`); a prefill's run XLA's GEMMs.
ROWS_KERNEL_MAX = 32


def transposed(a: jnp.ndarray) -> jnp.ndarray:
    """a.T [N, M], materialized: an optimization barrier keeps XLA from folding the
    transpose back into the dot that reads it, so a product such as a weight gradient
    a.T @ g runs as a plain GEMM."""
    return jax.lax.optimization_barrier(a.T)


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
    kernel (`kernels.rows_dot`, given the weight transposed) where the kernels run
    (`kernels.applies`: float32, no multi-device mesh, built)."""
    return rows <= ROWS_KERNEL_MAX and kernels.applies(dtype)


@jax.custom_vjp
def _rows_matmul(x: jnp.ndarray, wt: jnp.ndarray) -> jnp.ndarray:
    return jax.lax.platform_dependent(x, wt, cpu=kernels.rows_dot, default=lambda x, wt: x @ wt.T)


def _rows_matmul_fwd(x, wt):
    return _rows_matmul(x, wt), (x, wt)


def _rows_matmul_bwd(res, dy):
    x, wt = res
    return (dy @ wt).astype(x.dtype), (dy.T @ x).astype(wt.dtype)


_rows_matmul.defvjp(_rows_matmul_fwd, _rows_matmul_bwd)


def matmul(x: jnp.ndarray, w: jnp.ndarray, copy: jnp.ndarray | None = None) -> jnp.ndarray:
    """x [..., K] @ w [K, N], differentiable, its weight gradient from a materialized x^T.
    `copy`, the same weight transposed [N, K], lets a few-row product run through the
    native kernel (`rows_kernel_applies`)."""
    rows = 1
    for d in x.shape[:-1]:
        rows *= d
    if copy is not None and rows_kernel_applies(rows, x.dtype) and copy.dtype == x.dtype:
        y = _rows_matmul(x.reshape(rows, x.shape[-1]), copy)
        return y.reshape(x.shape[:-1] + (copy.shape[0],))
    return _matmul_t(x, w)


impl.register("matmul", "cpu", matmul)
