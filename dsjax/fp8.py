"""DeepSeek-V3's fine-grained FP8 recipe (§3.3, Figure 6-7), emulated with ml_dtypes'
float8_e4m3fn through jax.numpy.

- Activations get one scale per 1x128 tile along the contraction axis; weights one per
  128x128 block. scale = amax / 448 (E4M3's largest value), optionally rounded up to a
  power of two. A zero tile gets scale 1.
- The GEMM multiplies FP8 operands with float32 results for each 128-wide block of the
  contraction axis, scales each partial product by its two scales and accumulates in
  float32 (V3's promotion of partial sums to CUDA cores).
  On a CPU (no FP8 units) it multiplies exact float32 copies of the scaled E4M3 values
  instead: the same float32 accumulation in another order (`blockwise_dot`'s fp8_dot).
- `fp8_matmul` is a custom_vjp: Fprop (x @ W), Dgrad (dy @ W^T, dy in 1x128 tiles) and
  Wgrad (x^T @ dy, both in 128x1 tiles along the token axis) all run through the FP8
  GEMM; the backward pass keeps x and W in their own precision, as the master copies.
- `fp8_ragged_dot` is the same recipe for the experts' grouped GEMM (jax.lax.ragged_dot),
  with 128x128 blocks per expert.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0
TILE = 128


def _scale(amax: jnp.ndarray, pow2: bool) -> jnp.ndarray:
    s = amax.astype(jnp.float32) / E4M3_MAX
    s = jnp.where(s > 0, s, 1.0)
    if pow2:
        s = jnp.exp2(jnp.ceil(jnp.log2(s)))
    return s


def _pad_to(x: jnp.ndarray, axis: int, multiple: int) -> jnp.ndarray:
    extra = -x.shape[axis] % multiple
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def quantize_tiles(x: jnp.ndarray, tile: int = TILE, pow2: bool = False):
    """1 x `tile` tiles along the last axis.

    x: [M, K] -> (q float8_e4m3fn [M, Kp], scales float32 [M, Kp / tile]), Kp = K rounded up
    to a multiple of `tile` (zero padded).
    """
    x = _pad_to(x, -1, tile)
    M, K = x.shape
    tiles = x.reshape(M, K // tile, tile).astype(jnp.float32)
    s = _scale(jnp.max(jnp.abs(tiles), axis=-1), pow2)
    q = (tiles / s[..., None]).astype(E4M3).reshape(M, K)
    return q, s


def quantize_blocks(w: jnp.ndarray, block: int = TILE, pow2: bool = False):
    """`block` x `block` blocks. w: [K, N] -> (q [Kp, Np], scales [Kp / block, Np / block])."""
    w = _pad_to(_pad_to(w, 0, block), 1, block)
    K, N = w.shape
    blocks = w.reshape(K // block, block, N // block, block).astype(jnp.float32)
    s = _scale(jnp.max(jnp.abs(blocks), axis=(1, 3)), pow2)
    q = (blocks / s[:, None, :, None]).astype(E4M3).reshape(K, N)
    return q, s


def dequantize_tiles(q, s, tile: int = TILE):
    M, K = q.shape
    return (q.astype(jnp.float32).reshape(M, K // tile, tile) * s[..., None]).reshape(M, K)


def dequantize_blocks(q, s, block: int = TILE):
    K, N = q.shape
    b = q.astype(jnp.float32).reshape(K // block, block, N // block, block)
    return (b * s[:, None, :, None]).reshape(K, N)


def blockwise_dot(qa, sa, qb, sb, tile: int = TILE, fp8_dot: bool | None = None) -> jnp.ndarray:
    """FP8 GEMM with float32 accumulation over 128-wide contraction blocks.

    qa: [M, K] fp8 with sa [M, K / tile] (one scale per row and block);
    qb: [K, N] fp8 with sb [K / tile, N] (one scale per block and column).
    Returns float32 [M, N] = Σ_blocks (qa_blk @ qb_blk) * sa_blk * sb_blk.
    fp8_dot: multiply the FP8 operands block by block (default off the CPU), or their exact
    float32 copies in one GEMM (default on the CPU, which has no FP8 units).
    """
    M, K = qa.shape
    N = qb.shape[1]
    KB = K // tile
    if fp8_dot is None:
        fp8_dot = jax.default_backend() != "cpu"
    if not fp8_dot:
        # Multiply the exact float32 copies of the scaled FP8 values. Each
        # product is exact in float32 (3-bit mantissas), so this is the same float32
        # accumulation in another order, without the [K / tile, M, N] partial products.
        a = (qa.astype(jnp.float32).reshape(M, KB, tile) * sa[..., None]).reshape(M, K)
        b = (qb.astype(jnp.float32).reshape(KB, tile, N) * sb[:, None, :]).reshape(K, N)
        return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
    partial = jax.lax.dot_general(qa.reshape(M, KB, tile), qb.reshape(KB, tile, N),
                                  (((2,), (1,)), ((1,), (0,))), preferred_element_type=jnp.float32)  # [KB, M, N]
    return jnp.einsum("bmn,mb,bn->mn", partial, sa, sb)


def _block_scales_per_column(s: jnp.ndarray, n: int, block: int = TILE) -> jnp.ndarray:
    """[KB, NB] block scales -> [KB, N] per column."""
    return jnp.repeat(s, block, axis=1)[:, :n]


def _fp8_forward(x2, w, pow2):
    K, N = w.shape
    qx, sx = quantize_tiles(x2, pow2=pow2)
    qw, sw = quantize_blocks(w, pow2=pow2)
    y = blockwise_dot(qx, sx, qw, _block_scales_per_column(sw, qw.shape[1]))
    return y[:, :N]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _fp8_matmul_2d(x2, w, pow2):
    return _fp8_forward(x2, w, pow2)


def _fwd(x2, w, pow2):
    return _fp8_forward(x2, w, pow2), (x2, w)


def _bwd(pow2, res, dy):
    x2, w = res
    M, K = x2.shape
    N = w.shape[1]
    # Dgrad: dy [M, N] in 1x128 tiles along N, W^T [N, K] in 128x128 blocks.
    qd, sd = quantize_tiles(dy, pow2=pow2)
    qwt, swt = quantize_blocks(w.T, pow2=pow2)
    dx = blockwise_dot(qd, sd, qwt, _block_scales_per_column(swt, qwt.shape[1]))[:M, :K]
    # Wgrad: x^T [K, M] and dy [M, N], both in tiles of 128 tokens (128x1 in [M, *] layout).
    qxt, sxt = quantize_tiles(x2.T, pow2=pow2)
    qdt, sdt = quantize_tiles(dy.T, pow2=pow2)  # [N, Mp], [N, Mp / 128]
    dw = blockwise_dot(qxt, sxt, qdt.T, sdt.T)[:K, :N]
    return dx.astype(x2.dtype), dw.astype(w.dtype)


_fp8_matmul_2d.defvjp(_fwd, _bwd)


def fp8_matmul(x: jnp.ndarray, w: jnp.ndarray, pow2: bool = False) -> jnp.ndarray:
    """x [..., K] @ w [K, N] through the FP8 recipe, forward and backward.

    Returns [..., N] in x's dtype.
    """
    lead = x.shape[:-1]
    y = _fp8_matmul_2d(x.reshape(-1, x.shape[-1]), w, pow2)
    return y.reshape(lead + (w.shape[1],)).astype(x.dtype)


def tile_values(x: jnp.ndarray, pow2: bool = False) -> jnp.ndarray:
    """x [M, K] as the FP8 GEMM sees it after 1x128-tile E4M3 quantization, in float32.

    The values are exact: an E4M3 value times its float32 scale is representable in float32.
    """
    q, s = quantize_tiles(x, pow2=pow2)
    return dequantize_tiles(q, s)[:, :x.shape[1]]


def expert_block_values(w: jnp.ndarray, pow2: bool = False) -> jnp.ndarray:
    """Stacked expert weights [E, K, N] after 128x128-block E4M3 quantization of each
    expert, in float32."""
    def one(m):
        q, s = quantize_blocks(m, pow2=pow2)
        return dequantize_blocks(q, s)[:m.shape[0], :m.shape[1]]
    return jax.vmap(one)(w)


def _grouped(x, w, group_sizes):
    return jax.lax.ragged_dot(x, w, group_sizes, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fp8_ragged_dot(x, w, group_sizes, pow2):
    return _grouped(tile_values(x, pow2), expert_block_values(w, pow2), group_sizes)


def _ragged_fwd(x, w, group_sizes, pow2):
    return _fp8_ragged_dot(x, w, group_sizes, pow2), (x, w, group_sizes)


def _ragged_bwd(pow2, res, dy):
    x, w, group_sizes = res
    # Dgrad: dy in 1x128 tiles along N, each W_e^T in 128x128 blocks (the blocks of W_e).
    dx = _grouped(tile_values(dy, pow2), jnp.swapaxes(expert_block_values(w, pow2), 1, 2), group_sizes)
    # Wgrad: dW_e = x_e^T dy_e with x and dy in 128x1 tiles along the token axis. A tile that
    # straddles two experts' rows shares one scale between them, which is still a valid
    # per-tile quantization (DeepSeek pads each expert's rows to 128 instead).
    xt = tile_values(x.T, pow2).T
    dyt = tile_values(dy.T, pow2).T
    transpose = jax.linear_transpose(lambda m: _grouped(xt, m, group_sizes),
                                     jax.ShapeDtypeStruct(w.shape, jnp.float32))
    (dw,) = transpose(dyt)
    return dx.astype(x.dtype), dw.astype(w.dtype), None


_fp8_ragged_dot.defvjp(_ragged_fwd, _ragged_bwd)


def fp8_ragged_dot(x: jnp.ndarray, w: jnp.ndarray, group_sizes: jnp.ndarray, pow2: bool = False) -> jnp.ndarray:
    """Grouped GEMM (jax.lax.ragged_dot) through the FP8 recipe, forward and backward.

    x: [M, K] rows sorted by group; w: [G, K, N]; group_sizes: [G] int32 (rows past their
    sum give 0). Returns [M, N] in x's dtype. Fprop and Dgrad quantize activations in 1x128
    tiles and each expert's weights in 128x128 blocks; Wgrad quantizes x and dy in 128x1
    tiles along the rows. The products of these E4M3 values are accumulated in float32:
    emulated here on exact float32 copies of the FP8 values, which is what an FP8 tensor
    core with float32 promotion computes, up to summation order.
    """
    return _fp8_ragged_dot(x, w, group_sizes, pow2).astype(x.dtype)
