"""DeepSeek-V3's fine-grained FP8 recipe (§3.3, Figure 6-7) with ml_dtypes' float8_e4m3fn.

- Activations get one scale per 1x128 tile along the contraction axis; weights one per
  128x128 block. scale = amax / 448 (E4M3's largest value), rounded up to a power of two
  with `pow2` (ModelConfig.fp8_pow2_scales: the exponent-only UE8M0 scales of later
  DeepSeek recipes; V3's keeps them exact). A zero tile gets scale 1.
- The GEMM multiplies FP8 operands with float32 results for each 128-wide block of the
  contraction axis, scales each partial product by its two scales and accumulates in
  float32 (V3's promotion of partial sums to CUDA cores): a loop over the blocks, so no
  [K / 128, M, N] partial products are ever live ('native', the default off the CPU).
  On a CPU (no FP8 units) it multiplies exact float32 copies of the scaled E4M3 values
  in one GEMM instead: the same float32 accumulation in another order ('emulated').
  Every function takes `gemm`: 'auto', 'native' or 'emulated' (ModelConfig.fp8_gemm).
- `fp8_matmul` is a custom_vjp: Fprop (x @ W), Dgrad (dy @ W^T, dy in 1x128 tiles) and
  Wgrad (x^T @ dy, both in 128x1 tiles along the token axis) all run through the FP8
  GEMM; the backward pass keeps x and W in their own precision, as the master copies.
- `fp8_ragged_dot` is the same recipe for the experts' grouped GEMM (jax.lax.ragged_dot),
  with 128x128 blocks per expert; natively, Fprop and Dgrad are one FP8 ragged_dot per
  contraction block, Wgrad one FP8 GEMM per (128-row tile, expert) piece of the rows.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dsjax import impl

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0
TILE = 128
UNROLL = 8  # contraction blocks per iteration of the native GEMMs' loops


class Recipe(NamedTuple):
    """How a model's FP8 GEMMs run: the keyword arguments of `fp8_matmul` and
    `fp8_ragged_dot` (hashable, so it can be a static argument)."""

    gemm: str = "auto"  # ModelConfig.fp8_gemm
    pow2: bool = False  # ModelConfig.fp8_pow2_scales


def native_gemm(gemm: str) -> bool:
    """Whether `gemm` ('auto', 'native' or 'emulated') multiplies FP8 operands; 'auto' does
    off the CPU (the platform of the mesh set with `jax.set_mesh`, else of the default
    device; a model passes its resolved `fp8_gemm`)."""
    if gemm not in impl.FP8_GEMMS:
        raise ValueError(f"fp8 gemm={gemm!r} is not one of {list(impl.FP8_GEMMS)}")
    return gemm == "native" or (gemm == "auto" and impl.platform_of() != "cpu")


def _over_blocks(n: int, body, acc):
    """body(i, acc) for i in range(n), unrolled UNROLL iterations at a time."""
    return jax.lax.fori_loop(0, n, body, acc, unroll=UNROLL)


def _block(x: jnp.ndarray, i, axis: int, tile: int = TILE) -> jnp.ndarray:
    """The i-th `tile`-wide slice of x along `axis`."""
    return jax.lax.dynamic_slice_in_dim(x, i * tile, tile, axis=axis)


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


def blockwise_dot(qa, sa, qb, sb, tile: int = TILE, gemm: str = "auto") -> jnp.ndarray:
    """FP8 GEMM with float32 accumulation over 128-wide contraction blocks.

    qa: [M, K] fp8 with sa [M, K / tile] (one scale per row and block);
    qb: [K, N] fp8 with sb [K / tile, N] (one scale per block and column).
    Returns float32 [M, N] = Σ_blocks (qa_blk @ qb_blk) * sa_blk * sb_blk.
    gemm 'native' multiplies the FP8 operands block by block, 'emulated' their exact float32
    copies in one GEMM (the same float32 accumulation in another order).
    """
    M, K = qa.shape
    N = qb.shape[1]
    KB = K // tile
    if not native_gemm(gemm):
        a = (qa.astype(jnp.float32).reshape(M, KB, tile) * sa[..., None]).reshape(M, K)
        b = (qb.astype(jnp.float32).reshape(KB, tile, N) * sb[:, None, :]).reshape(K, N)
        return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)

    def body(i, acc):
        part = jnp.matmul(_block(qa, i, 1, tile), _block(qb, i, 0, tile), preferred_element_type=jnp.float32)
        return acc + part * sa[:, i, None] * sb[i][None, :]

    return _over_blocks(KB, body, jnp.zeros((M, N), jnp.float32))


def grouped_blockwise_dot(qa, sa, qw, sw, group_sizes, tile: int = TILE) -> jnp.ndarray:
    """Native FP8 grouped GEMM: one FP8 ragged_dot per contraction block, float32 accumulation.

    qa: [M, K] fp8 rows sorted by group, sa [M, K / tile]; qw: [G, K, N] fp8 with per-group
    block scales sw [G, K / tile, N / tile]; group_sizes: [G] int32.
    Returns float32 [M, N]: row m of group g gets Σ_blocks (qa_blk qw_g,blk)[m] * sa_blk[m] *
    sw_g,blk; rows past sum(group_sizes) get 0.
    """
    M, K = qa.shape
    G, _, N = qw.shape
    group = jnp.minimum(jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(M), side="right"), G - 1)  # [M]

    def body(i, acc):
        part = jax.lax.ragged_dot(_block(qa, i, 1, tile), _block(qw, i, 1, tile), group_sizes,
                                  preferred_element_type=jnp.float32)  # [M, N]
        scale = sa[:, i, None] * sw[group, i]  # [M, N / tile]
        return acc + (part.reshape(M, N // tile, tile) * scale[..., None]).reshape(M, N)

    return _over_blocks(K // tile, body, jnp.zeros((M, N), jnp.float32))


def grouped_wgrad_dot(qat, sat, qbt, sbt, group_sizes, tile: int = TILE) -> jnp.ndarray:
    """Native FP8 Wgrad of the grouped GEMM: Σ over each group's rows of a^T b, float32.

    qat: [K, Mp] fp8 (a^T), sat [K, Mp / tile]; qbt: [N, Mp] fp8 (b^T), sbt [N, Mp / tile]:
    128x1 tiles along the rows, sorted by group; group_sizes: [G] int32.
    Returns float32 [G, K, N]. The rows split into pieces that lie in one tile and one group
    (at most Mp / tile + G of them); each is one FP8 GEMM, scaled by its tile's scales and
    added to its group's sum.
    """
    K, Mp = qat.shape
    N = qbt.shape[0]
    G = group_sizes.shape[0]
    MB = Mp // tile
    ends = jnp.cumsum(group_sizes)
    lo = jnp.sort(jnp.concatenate([jnp.arange(MB) * tile, ends - group_sizes]))  # [MB + G] piece starts
    hi = jnp.minimum(jnp.append(lo[1:], Mp), ends[-1])  # piece ends (rows past the groups dropped)
    group = jnp.minimum(jnp.searchsorted(ends, lo, side="right"), G - 1)

    def body(p, acc):
        i = jnp.minimum(lo[p] // tile, MB - 1)
        rows = i * tile + jnp.arange(tile)
        a = _block(qat, i, 1, tile)  # [K, tile]
        a = jnp.where((rows >= lo[p]) & (rows < hi[p]), a, jnp.zeros((), a.dtype))
        part = jax.lax.dot_general(a, _block(qbt, i, 1, tile), (((1,), (1,)), ((), ())),
                                   preferred_element_type=jnp.float32)  # [K, N]
        part = part * sat[:, i, None] * sbt[:, i][None, :]
        g = group[p]
        return jax.lax.dynamic_update_index_in_dim(acc, jax.lax.dynamic_index_in_dim(acc, g, 0, False) + part, g, 0)

    return _over_blocks(MB + G, body, jnp.zeros((G, K, N), jnp.float32))


def _block_scales_per_column(s: jnp.ndarray, n: int, block: int = TILE) -> jnp.ndarray:
    """[KB, NB] block scales -> [KB, N] per column."""
    return jnp.repeat(s, block, axis=1)[:, :n]


def _fp8_forward(x2, w, pow2, gemm):
    K, N = w.shape
    qx, sx = quantize_tiles(x2, pow2=pow2)
    qw, sw = quantize_blocks(w, pow2=pow2)
    y = blockwise_dot(qx, sx, qw, _block_scales_per_column(sw, qw.shape[1]), gemm=gemm)
    return y[:, :N]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _fp8_matmul_2d(x2, w, pow2, gemm):
    return _fp8_forward(x2, w, pow2, gemm)


def _fwd(x2, w, pow2, gemm):
    return _fp8_forward(x2, w, pow2, gemm), (x2, w)


def _bwd(pow2, gemm, res, dy):
    x2, w = res
    M, K = x2.shape
    N = w.shape[1]
    # Dgrad: dy [M, N] in 1x128 tiles along N, W^T [N, K] in 128x128 blocks.
    qd, sd = quantize_tiles(dy, pow2=pow2)
    qwt, swt = quantize_blocks(w.T, pow2=pow2)
    dx = blockwise_dot(qd, sd, qwt, _block_scales_per_column(swt, qwt.shape[1]), gemm=gemm)[:M, :K]
    # Wgrad: x^T [K, M] and dy [M, N], both in tiles of 128 tokens (128x1 in [M, *] layout).
    qxt, sxt = quantize_tiles(x2.T, pow2=pow2)
    qdt, sdt = quantize_tiles(dy.T, pow2=pow2)  # [N, Mp], [N, Mp / 128]
    dw = blockwise_dot(qxt, sxt, qdt.T, sdt.T, gemm=gemm)[:K, :N]
    return dx.astype(x2.dtype), dw.astype(w.dtype)


_fp8_matmul_2d.defvjp(_fwd, _bwd)


def fp8_matmul(x: jnp.ndarray, w: jnp.ndarray, pow2: bool = False, gemm: str = "auto") -> jnp.ndarray:
    """x [..., K] @ w [K, N] through the FP8 recipe, forward and backward.

    gemm: 'auto', 'native' (FP8 operands) or 'emulated' (their float32 copies), as in
    `blockwise_dot`. Returns [..., N] in x's dtype.
    """
    lead = x.shape[:-1]
    y = _fp8_matmul_2d(x.reshape(-1, x.shape[-1]), w, pow2, gemm)
    return y.reshape(lead + (w.shape[1],)).astype(x.dtype)


def tile_values(x: jnp.ndarray, pow2: bool = False) -> jnp.ndarray:
    """x [M, K] as the FP8 GEMM sees it after 1x128-tile E4M3 quantization, in float32.

    The values are exact: an E4M3 value times its float32 scale is representable in float32.
    """
    q, s = quantize_tiles(x, pow2=pow2)
    return dequantize_tiles(q, s)[:, :x.shape[1]]


def expert_blocks(w: jnp.ndarray, pow2: bool = False):
    """128x128-block E4M3 quantization of each expert. w: [E, K, N] -> (q [E, Kp, Np],
    scales [E, Kp / 128, Np / 128])."""
    return jax.vmap(functools.partial(quantize_blocks, pow2=pow2))(w)


def expert_block_values(w: jnp.ndarray, pow2: bool = False) -> jnp.ndarray:
    """Stacked expert weights [E, K, N] after 128x128-block E4M3 quantization of each
    expert, in float32."""
    q, s = expert_blocks(w, pow2)
    return jax.vmap(dequantize_blocks)(q, s)[:, :w.shape[1], :w.shape[2]]


def _grouped(x, w, group_sizes):
    return jax.lax.ragged_dot(x, w, group_sizes, preferred_element_type=jnp.float32)


def _ragged_forward(x, w, group_sizes, pow2, gemm):
    if not native_gemm(gemm):
        return _grouped(tile_values(x, pow2), expert_block_values(w, pow2), group_sizes)
    qx, sx = quantize_tiles(x, pow2=pow2)
    qw, sw = expert_blocks(w, pow2)
    return grouped_blockwise_dot(qx, sx, qw, sw, group_sizes)[:, :w.shape[2]]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fp8_ragged_dot(x, w, group_sizes, pow2, gemm):
    return _ragged_forward(x, w, group_sizes, pow2, gemm)


def _ragged_fwd(x, w, group_sizes, pow2, gemm):
    return _ragged_forward(x, w, group_sizes, pow2, gemm), (x, w, group_sizes)


def _ragged_bwd(pow2, gemm, res, dy):
    x, w, group_sizes = res
    K = x.shape[1]
    # Dgrad: dy in 1x128 tiles along N, each W_e^T in 128x128 blocks (the blocks of W_e).
    # Wgrad: dW_e = x_e^T dy_e with x and dy in 128x1 tiles along the token axis. A tile that
    # straddles two experts' rows shares one scale between them, which is still a valid
    # per-tile quantization (DeepSeek pads each expert's rows to 128 instead).
    if native_gemm(gemm):
        qd, sd = quantize_tiles(dy, pow2=pow2)
        qw, sw = expert_blocks(w, pow2)
        dx = grouped_blockwise_dot(qd, sd, jnp.swapaxes(qw, 1, 2), jnp.swapaxes(sw, 1, 2), group_sizes)[:, :K]
        qxt, sxt = quantize_tiles(x.T, pow2=pow2)
        qdt, sdt = quantize_tiles(dy.T, pow2=pow2)
        dw = grouped_wgrad_dot(qxt, sxt, qdt, sdt, group_sizes)
    else:
        dx = _grouped(tile_values(dy, pow2), jnp.swapaxes(expert_block_values(w, pow2), 1, 2), group_sizes)
        xt = tile_values(x.T, pow2).T
        dyt = tile_values(dy.T, pow2).T
        transpose = jax.linear_transpose(lambda m: _grouped(xt, m, group_sizes),
                                         jax.ShapeDtypeStruct(w.shape, jnp.float32))
        (dw,) = transpose(dyt)
    return dx.astype(x.dtype), dw.astype(w.dtype), None


_fp8_ragged_dot.defvjp(_ragged_fwd, _ragged_bwd)


def fp8_ragged_dot(x: jnp.ndarray, w: jnp.ndarray, group_sizes: jnp.ndarray, pow2: bool = False,
                   gemm: str = "auto") -> jnp.ndarray:
    """Grouped GEMM (jax.lax.ragged_dot) through the FP8 recipe, forward and backward.

    x: [M, K] rows sorted by group; w: [G, K, N]; group_sizes: [G] int32 (rows past their
    sum give 0). Returns [M, N] in x's dtype. Fprop and Dgrad quantize activations in 1x128
    tiles and each expert's weights in 128x128 blocks; Wgrad quantizes x and dy in 128x1
    tiles along the rows. The products of these E4M3 values are accumulated in float32:
    on FP8 operands block by block (gemm 'native'), or on their exact float32 copies
    ('emulated'), which is what an FP8 tensor core with float32 promotion computes, up to
    summation order. 'auto' is native off the CPU.
    """
    return _fp8_ragged_dot(x, w, group_sizes, pow2, gemm).astype(x.dtype)
