"""DeepSeekMoE (DeepSeek-V2 §2.2, DeepSeek-V3 §2.1.2).

y = x + Σ shared_i(x) + Σ_{i in topk} g_i FFN_i(x), with fine-grained routed experts and
always-on shared experts (fused into one MLP of width n_shared * F).

Gate (`Gate`): affinities s = softmax(x W) (V2) or sigmoid(x W) (V3). Selection uses
s + b, where b is DeepSeek-V3's aux-loss-free `e_score_correction_bias` (collection
`moe_bias`, never trained by the optimizer); the weights use s itself (V3 eq. 15-16).
Group-limited routing keeps the `topk_group` best of `n_group` expert groups first
(group score = max for V2's `group_limited_greedy`, sum of top-2 for V3's `noaux_tc`).
Weights are renormalized when `norm_topk_prob` and scaled by `routed_scaling_factor`.

Dispatch, chosen by `moe_impl` (`auto`: ragged on GPUs and TPUs; on a CPU gather for up
to 2 token copies per expert (decoding), blocked otherwise; `ModelConfig.moe_dispatch`):
- `dense`: every expert on every token, weighted by a sparse combine matrix (reference;
  one batched GEMM per weight for a few tokens per expert);
- `ragged`: dropless; token copies sorted by expert and run through grouped GEMMs
  (`jax.lax.ragged_dot`), then scattered back;
- `blocked`: dropless; the sorted copies padded per expert into fixed-size row blocks,
  dense GEMMs block by block, a loop per expert (XLA:CPU runs ragged_dot over every expert);
- `gather`: a loop over the experts the token copies chose, each expert's weights sliced
  once and its copies run as matrix-vector products (decoding: reads the chosen experts,
  not all E).
Under a mesh that splits the tokens, ragged and blocked sort only each device's own
copies (`experts_local`, shard_map over the batch axes).
When the active mesh and logical-axis rules split `experts` over several devices, the
routed experts run expert-parallel under shard_map instead (`experts_expert_parallel`):
each token copy travels only to the device holding its expert and back, dropless.

Each call also returns the tokens routed to each expert (for the bias update and
MaxVio) and V3's sequence-wise balance loss Σ_i f_i P_i (eq. 17-20, without alpha).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsjax import cpu_kernels
from dsjax.config import DENSE_COPIES_PER_EXPERT, ModelConfig
from dsjax.fp8 import Recipe, fp8_matmul, fp8_ragged_dot
from dsjax.layers import MLP, dtype_of, param, transposed


def route(cfg: ModelConfig, logits: jnp.ndarray, bias: jnp.ndarray):
    """Top-k routing from router logits.

    Args:
      logits: float32 [N, E]; bias: float32 [E] (used for selection only under noaux_tc).
    Returns:
      weights float32 [N, k], indices int32 [N, k], affinities s float32 [N, E].
    """
    E, G, k = cfg.n_routed_experts, cfg.n_group, cfg.num_experts_per_tok
    scores = jax.nn.softmax(logits, axis=-1) if cfg.scoring_func == "softmax" else jax.nn.sigmoid(logits)
    choice = scores + bias if cfg.topk_method == "noaux_tc" else scores
    if cfg.topk_method != "greedy" and G > 1:
        grouped = choice.reshape(-1, G, E // G)
        if cfg.topk_method == "noaux_tc":
            group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)  # [N, G]
        else:
            group_scores = grouped.max(-1)
        _, top_groups = jax.lax.top_k(group_scores, cfg.topk_group)  # [N, topk_group]
        keep = jnp.zeros_like(group_scores, dtype=bool).at[
            jnp.arange(group_scores.shape[0])[:, None], top_groups].set(True)
        choice = jnp.where(jnp.repeat(keep, E // G, axis=-1), choice, -jnp.inf)
    _, indices = jax.lax.top_k(choice, k)
    weights = jnp.take_along_axis(scores, indices, axis=-1)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return weights * cfg.routed_scaling_factor, indices.astype(jnp.int32), scores


def expert_loads(cfg: ModelConfig, indices: jnp.ndarray) -> jnp.ndarray:
    """Tokens routed to each expert. indices: [N, k] -> float32 [E]."""
    return jnp.zeros((cfg.n_routed_experts,), jnp.float32).at[indices.reshape(-1)].add(1.0)


def sequence_balance_loss(cfg: ModelConfig, indices: jnp.ndarray, scores: jnp.ndarray,
                          batch: int) -> jnp.ndarray:
    """V3's sequence-wise balance loss Σ_i f_i P_i, averaged over sequences.

    f_i = E / (k T) * #{t: i in topk_t}; P_i = mean_t s_{i,t} / Σ_j s_{j,t}.
    Args: indices [B*T, k]; scores [B*T, E]. Returns: float32 scalar.
    """
    E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    counts = jax.nn.one_hot(indices, E, dtype=jnp.float32).sum(1).reshape(batch, -1, E)  # [B, T, E]
    T = counts.shape[1]
    f = jax.lax.stop_gradient(counts.sum(1) * (E / (k * T)))  # [B, E]
    p = (scores / scores.sum(-1, keepdims=True)).reshape(batch, T, E).mean(1)  # [B, E]
    return (f * p).sum(-1).mean()


def experts_dense(x, weights, indices, w1, w3, w2, fp8: Recipe | None = None):
    """Reference dispatch: all experts on all tokens, weighted by a sparse combine matrix.

    x: [N, D]; weights/indices: [N, k]; w1, w3: [E, D, F]; w2: [E, F, D] -> [N, D].
    For a few tokens per expert (`DENSE_COPIES_PER_EXPERT`), one batched
    GEMM per weight, [E, N, D] x [E, D, F]: each weight is read where it lies (the tokens
    broadcast over the experts pass an optimization barrier, which keeps XLA from folding
    the batch into one [D, E*F] GEMM that copies the weights transposed first). For more
    tokens, that copy costs less than the batched GEMMs: the experts are laid side by side
    as one [D, E*F] matmul. Either way the combine weights scale the hidden units, so the
    sum over experts happens inside the last GEMM. With `fp8` (a dsjax.fp8.Recipe) the
    side-by-side matmuls run through the FP8 recipe; its 128x128 weight blocks and 1x128
    hidden tiles stay within one expert when moe_intermediate_size is a multiple of 128 (as
    in every DeepSeek release), and span neighbouring experts otherwise.
    """
    N, E = x.shape[0], w1.shape[0]
    D, F = w1.shape[1], w1.shape[2]
    combine = jnp.zeros((N, E), jnp.float32).at[jnp.arange(N)[:, None], indices].add(weights)
    if fp8 is None and indices.size <= DENSE_COPIES_PER_EXPERT * E:
        xs = jax.lax.optimization_barrier(jnp.broadcast_to(x, (E,) + x.shape))  # [E, N, D]
        h = nn.silu(jnp.einsum("end,edf->enf", xs, w1)) * jnp.einsum("end,edf->enf", xs, w3)
        h = h * combine.T[:, :, None].astype(h.dtype)  # [E, N, F]
        return jnp.einsum("enf,efd->nd", h, w2)
    side_by_side = lambda w: w.transpose(1, 0, 2).reshape(D, E * F)
    mm = functools.partial(fp8_matmul, **fp8._asdict()) if fp8 else jnp.matmul
    h = nn.silu(mm(x, side_by_side(w1))) * mm(x, side_by_side(w3))  # [N, E*F]
    h = (h.reshape(N, E, F) * combine[:, :, None].astype(h.dtype)).reshape(N, E * F)
    return mm(h, w2.reshape(E * F, D))


def _grouped_swiglu(xs, w1, w3, w2, group_sizes, fp8: Recipe | None):
    """The experts' SwiGLU on rows sorted by expert: two grouped GEMMs in, one out. With
    `fp8` (a dsjax.fp8.Recipe) all three run through the FP8 recipe
    (dsjax.fp8.fp8_ragged_dot), forward and backward."""
    mm = functools.partial(fp8_ragged_dot, **fp8._asdict()) if fp8 else jax.lax.ragged_dot
    h = nn.silu(mm(xs, w1, group_sizes)) * mm(xs, w3, group_sizes)
    return mm(h, w2, group_sizes)


def experts_ragged(x, weights, indices, w1, w3, w2, fp8: Recipe | None = None):
    """Dropless grouped-GEMM dispatch: sort token copies by expert, ragged_dot, scatter back.

    Same shapes as `experts_dense`.
    """
    N, k = indices.shape
    E = w1.shape[0]
    flat = indices.reshape(-1)  # [N*k]
    order = jnp.argsort(flat, stable=True)
    token = order // k
    group_sizes = jnp.zeros((E,), jnp.int32).at[flat].add(1)
    xs = x[token]  # [N*k, D] sorted by expert
    ys = _grouped_swiglu(xs, w1, w3, w2, group_sizes, fp8)  # [N*k, D]
    ys = ys * weights.reshape(-1)[order][:, None].astype(ys.dtype)
    return jnp.zeros_like(x).at[token].add(ys)


def _gathered_swiglu(x, weights, indices, w1, w3, w2):
    """The gather dispatch as batched products: every token copy gathers its expert's
    weights (w1[idx]: [N*k, D, F]) for a batched matrix-vector product. Differentiable;
    `experts_gather`'s backward pass."""
    N, k = indices.shape
    flat = indices.reshape(-1)  # [N*k]
    xs = jnp.repeat(x, k, axis=0)  # [N*k, D]
    h = nn.silu(jnp.einsum("rd,rdf->rf", xs, w1[flat])) * jnp.einsum("rd,rdf->rf", xs, w3[flat])
    ys = jnp.einsum("rf,rfd->rd", h, w2[flat]) * weights.reshape(-1)[:, None].astype(h.dtype)
    return ys.reshape(N, k, -1).sum(1)


def _swiglu(x, s1, s3, s2):
    return (nn.silu(x @ s1) * (x @ s3)) @ s2


@functools.partial(jax.custom_vjp, nondiff_argnums=(9,))
def _looped_swiglu(x, weights, indices, w1, w3, w2, s1, s3, s2, kernel: bool = False):
    """The gather dispatch as a loop over the experts the token copies chose, in expert
    order: each chosen expert's three weights are sliced out once (read from memory once)
    and its copies run through them as matrix-vector products, so a call reads only the
    chosen experts, and computes only the routed copies; plus the shared experts' SwiGLU
    (s1, s3 [D, Fs], s2 [Fs, D]; Fs = 0: none). With `kernel`, on a CPU, the native kernel
    does both without copying the slices (`cpu_kernels.gather_swiglu`)."""

    def xla(x, c, i, w1, w3, w2, s1, s3, s2):
        y = _loop_experts(x, c, i, w1, w3, w2)
        return y + _swiglu(x, s1, s3, s2) if s1.shape[1] else y

    args = (x, weights, indices, w1, w3, w2, s1, s3, s2)
    if kernel:
        return jax.lax.platform_dependent(
            *args, cpu=lambda *a: cpu_kernels.gather_swiglu(*a[:6], a[6:]).astype(x.dtype), default=xla)
    return xla(*args)


def _loop_experts(x, weights, indices, w1, w3, w2):
    N, k = indices.shape
    R = N * k
    flat = indices.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # copies sorted by expert
    expert = flat[order]
    new = jnp.concatenate([jnp.ones((1,), bool), expert[1:] != expert[:-1]])
    starts = jnp.nonzero(new, size=R + 1, fill_value=R)[0]  # each chosen expert's first sorted copy, then R
    token, combine, chosen = order // k, weights.reshape(-1)[order], new.sum()

    def expert_step(carry):
        g, out = carry
        w1e, w3e, w2e = (_take(w, expert[starts[g]]) for w in (w1, w3, w2))

        def copy_step(j, out):
            t = token[j]
            xr = jax.lax.dynamic_slice_in_dim(x, t, 1)  # [1, D]
            y = (nn.silu(xr @ w1e) * (xr @ w3e)) @ w2e * combine[j].astype(x.dtype)
            return jax.lax.dynamic_update_slice_in_dim(
                out, jax.lax.dynamic_slice_in_dim(out, t, 1) + y.astype(out.dtype), t, 0)

        return g + 1, jax.lax.fori_loop(starts[g], starts[g + 1], copy_step, out)

    out = jnp.zeros(x.shape, jnp.float32)  # the k experts of a token add up in float32
    return jax.lax.while_loop(lambda c: c[0] < chosen, expert_step, (0, out))[1].astype(x.dtype)


def _looped_swiglu_fwd(x, weights, indices, w1, w3, w2, s1, s3, s2, kernel):
    res = (x, weights, indices, w1, w3, w2, s1, s3, s2)
    return _looped_swiglu(*res, kernel), res


def _looped_swiglu_bwd(kernel, res, dy):
    """The batched gather's gradient (`_gathered_swiglu`), plus the shared MLP's."""
    x, weights, indices, w1, w3, w2, s1, s3, s2 = res

    def f(x, c, w1, w3, w2, s1, s3, s2):
        y = _gathered_swiglu(x, c, indices, w1, w3, w2)
        return y + _swiglu(x, s1, s3, s2) if s1.shape[1] else y

    _, vjp = jax.vjp(f, x, weights, w1, w3, w2, s1, s3, s2)
    dx, dweights, d1, d3, d2, ds1, ds3, ds2 = vjp(dy)
    return dx, dweights, None, d1, d3, d2, ds1, ds3, ds2


_looped_swiglu.defvjp(_looped_swiglu_fwd, _looped_swiglu_bwd)


def gather_kernel_applies(*arrays) -> bool:
    """The gather dispatch runs the native kernel: float32 `arrays` on a CPU backend, no
    multi-device mesh, and the kernel built (`cpu_kernels.applies`)."""
    return cpu_kernels.applies(*(a.dtype for a in arrays))


def experts_gather(x, weights, indices, w1, w3, w2, fp8: Recipe | None = None, shared=None):
    """Per-copy dispatch for few tokens (decoding): a step reads only the experts the
    tokens chose, not all E. A loop over the chosen experts in expert order slices each
    one's weights once and runs its token copies as matrix-vector products
    (`_looped_swiglu`). On a CPU, greedy decoding of `small` at batch 8 took 41-44 ms a
    step with it against 60-62 ms gathering every copy's weights (w1[idx]: [N*k, D, F])
    for batched products, and 68 ms with the dense dispatch; at batch 1 the step moved
    within its noise. In float32 on a CPU without a multi-device mesh, the native kernel
    (`cpu_kernels.gather_swiglu`, where it builds) runs the forward instead: it reads the
    chosen experts in place, at about twice XLA's rate (see dsjax/cpu_kernels.py). Its
    gradient is that of the batched gather (`_gathered_swiglu`). Same shapes as
    `experts_dense`; no FP8 form (the FP8 recipe routes to `experts_dense`).

    `shared` = (s1, s3, s2), the layer's shared-experts MLP weights ([D, Fs], [D, Fs],
    [Fs, D]), where `gather_kernel_applies`: the kernel runs them as one more work item
    and the result includes them (`small` decoding: 0.35 ms less a step at batch 1, the
    shared MLP's few XLA ops per layer gone)."""
    if fp8 is not None:
        raise ValueError("moe_impl='gather' has no FP8 form")
    w1, w3, w2 = (jnp.asarray(w) for w in (w1, w3, w2))  # numpy weights cannot take traced indices
    kernel = gather_kernel_applies(x, w1, w3, w2)
    if shared is not None and not kernel:
        raise ValueError("experts_gather: shared experts are fused only where the native kernel runs "
                         "(gather_kernel_applies)")
    D = x.shape[-1]
    s1, s3, s2 = (jnp.asarray(w) for w in shared) if shared is not None else (
        jnp.zeros((D, 0), x.dtype), jnp.zeros((D, 0), x.dtype), jnp.zeros((0, D), x.dtype))
    return _looped_swiglu(x, weights, indices, w1, w3, w2, s1, s3, s2, kernel)


def block_rows(copies: int, experts: int) -> int:
    """Rows per block of `experts_blocked`: 128, halved (down to 8) while the padding of
    up to block - 1 rows per expert could exceed the token copies."""
    block = 128
    while block > 8 and block * experts > copies:
        block //= 2
    return block


@jax.custom_vjp
def _permute_rows(a, idx, inverse):
    """a [M, W] -> rows a[idx] [len(idx), W], index M giving a zero row. `inverse` is the
    reverse map, so the transpose is the same kind of gather (XLA:CPU gathers rows much
    faster than it scatter-adds them)."""
    return jnp.concatenate([a, jnp.zeros((1, a.shape[1]), a.dtype)])[idx]


def _permute_rows_fwd(a, idx, inverse):
    return _permute_rows(a, idx, inverse), (idx, inverse)


def _permute_rows_bwd(res, ct):
    idx, inverse = res
    return _permute_rows(ct, inverse, idx), None, None


_permute_rows.defvjp(_permute_rows_fwd, _permute_rows_bwd)


def _block_layout(indices, E: int, block: int):
    """Expert-sorted token copies padded per expert to a multiple of `block` rows.

    indices: [N, k]. Returns row [N*k] (padded row of each copy), copy [P] (the copy in
    each padded row, N*k for padding), first [E] (each expert's first block) and count [E]
    (its blocks), with P = nb * block and nb = ceil((N*k + E*(block-1)) / block), the
    static bound of the padded total; the blocks past the last expert's hold no copy.
    """
    R = indices.size
    flat = indices.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.zeros((E,), jnp.int32).at[flat].add(1)
    padded = (sizes + block - 1) // block * block
    end = jnp.cumsum(padded)  # [E] padded end of each expert's rows
    expert = flat[order]
    sorted_row = end[expert] - padded[expert] + jnp.arange(R) - (jnp.cumsum(sizes) - sizes)[expert]
    nb = -(-(R + E * (block - 1)) // block)
    row = jnp.zeros((R,), jnp.int32).at[order].set(sorted_row)
    copy = jnp.full((nb * block,), R, jnp.int32).at[sorted_row].set(order)
    return row, copy, ((end - padded) // block).astype(jnp.int32), (padded // block).astype(jnp.int32)


def _take(a, i):
    return jax.lax.dynamic_index_in_dim(a, i, keepdims=False)


def _put(a, v, i):
    return jax.lax.dynamic_update_index_in_dim(a, v, i, 0)


def _blocks_forward(xs, first, count, w1, w3, w2, residuals: bool = False):
    """SwiGLU output of every block [nb, b, D], and with `residuals` x W1 and x W3 [nb, b, F]:
    a scan over the experts (each expert's weights sliced out once), each running a loop
    over its own blocks; the blocks no expert holds stay zero."""
    nb, b, _ = xs.shape
    F = w1.shape[2]

    def expert(carry, a):
        w1e, w3e, w2e, start, n = a

        def block(i, carry):
            xb = _take(xs, i)
            a1, a3 = xb @ w1e, xb @ w3e
            out = (_put(carry[0], (nn.silu(a1) * a3) @ w2e, i),)
            return out + (_put(carry[1], a1, i), _put(carry[2], a3, i)) if residuals else out
        return jax.lax.fori_loop(start, start + n, block, carry), None

    init = (jnp.zeros_like(xs),) + ((jnp.zeros((nb, b, F), xs.dtype),) * 2 if residuals else ())
    return jax.lax.scan(expert, init, (w1, w3, w2, first, count))[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _blocked_swiglu(xs, first, count, w1, w3, w2, kernel: bool = False):
    """The experts' SwiGLU on blocks of rows, each block one expert's: dense [b, D] x
    [D, F] GEMMs. xs: [nb, b, D]; first, count: [E] (`_block_layout`) -> [nb, b, D].
    With `kernel`, on a CPU, the native kernel runs forward and backward
    (`cpu_kernels.blocked_swiglu_fwd`), each expert one work item."""
    if kernel:  # the kernel writes a1 and a3 as it goes; XLA's loops skip them here
        return _blocked_swiglu_fwd(xs, first, count, w1, w3, w2, kernel)[0]
    return _blocks_forward(xs, first, count, w1, w3, w2)[0]


def _blocked_swiglu_fwd(xs, first, count, w1, w3, w2, kernel: bool = False):
    def xla(xs, first, count, w1, w3, w2):
        return _blocks_forward(xs, first, count, w1, w3, w2, residuals=True)

    args = (xs, first, count, w1, w3, w2)
    if kernel:
        ys, a1, a3 = jax.lax.platform_dependent(*args, cpu=cpu_kernels.blocked_swiglu_fwd, default=xla)
    else:
        ys, a1, a3 = xla(*args)
    return ys, (xs, first, count, w1, w3, w2, a1, a3)  # a1, a3: [nb, b, F], 2F per row


def _blocked_swiglu_bwd(kernel, res, dys):
    if kernel:
        xs, first, count, w1, w3, w2, a1, a3 = res
        dxs, g1, g3, g2 = jax.lax.platform_dependent(
            xs, dys, a1, a3, first, count, w1, w3, w2, cpu=cpu_kernels.blocked_swiglu_bwd,
            default=lambda xs, dys, a1, a3, first, count, w1, w3, w2: _blocked_swiglu_xla_bwd(
                (xs, first, count, w1, w3, w2, a1, a3), dys))
        return dxs.astype(xs.dtype), None, None, g1.astype(w1.dtype), g3.astype(w3.dtype), g2.astype(w2.dtype)
    dxs, g1, g3, g2 = _blocked_swiglu_xla_bwd(res, dys)
    return dxs, None, None, g1, g3, g2


def _blocked_swiglu_xla_bwd(res, dys):
    # The same loops: each expert sums its blocks' weight gradients in float32 and the
    # scan stacks the sums, [E, ...].
    xs, first, count, w1, w3, w2, A1, A3 = res
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731

    def expert(dxs, a):
        w1e, w3e, w2e, start, n = a

        def block(i, carry):
            dxs, g1, g3, g2 = carry
            xb, dy, a1, a3 = (_take(t, i) for t in (xs, dys, A1, A3))
            sig = jax.nn.sigmoid(a1)
            silu = a1 * sig
            dh = dy @ w2e.T
            da3 = dh * silu
            da1 = dh * a3 * sig * (1 + a1 * (1 - sig))
            dxs = _put(dxs, da1 @ w1e.T + da3 @ w3e.T, i)
            xt, ht = transposed(xb), transposed(silu * a3)  # plain GEMMs on a CPU
            return dxs, g1 + f32(xt @ da1), g3 + f32(xt @ da3), g2 + f32(ht @ dy)

        zeros = tuple(jnp.zeros(w.shape, jnp.float32) for w in (w1e, w3e, w2e))
        dxs, *g = jax.lax.fori_loop(start, start + n, block, (dxs, *zeros))
        return dxs, tuple(gi.astype(w.dtype) for gi, w in zip(g, (w1e, w3e, w2e)))

    dxs, (g1, g3, g2) = jax.lax.scan(expert, jnp.zeros_like(xs), (w1, w3, w2, first, count))
    return dxs, g1, g3, g2


_blocked_swiglu.defvjp(_blocked_swiglu_fwd, _blocked_swiglu_bwd)


def blocked_kernel_applies(*arrays) -> bool:
    """The blocked dispatch's experts run the native kernel (`cpu_kernels.blocked_swiglu_fwd`
    and its backward): float32 `arrays` on a CPU backend, no multi-device mesh, and the
    kernels built (`cpu_kernels.applies`)."""
    return cpu_kernels.applies(*(a.dtype for a in arrays))


def blocked_rows(x, indices, E: int, block: int | None = None):
    """The blocked dispatch's rows: each token copy of x [N, D] (routed by indices [N, k])
    moved to its expert's blocks of `block` rows (default `block_rows`). Returns (xs [nb,
    block, D], row, copy, first, count) as `_block_layout` gives them."""
    N, k = indices.shape
    D = x.shape[-1]
    block = block or block_rows(N * k, E)
    row, copy, first, count = _block_layout(indices, E, block)
    copies = jnp.broadcast_to(x[:, None], (N, k, D)).reshape(N * k, D)
    return _permute_rows(copies, copy, row).reshape(-1, block, D), row, copy, first, count


def experts_blocked(x, weights, indices, w1, w3, w2, fp8: Recipe | None = None, block: int | None = None):
    """Dropless grouped GEMM in fixed-size row blocks, the fast dispatch on a CPU.

    Token copies are sorted by expert and each expert's group padded to a multiple of
    `block` rows (default `block_rows`), so every block belongs to one expert; a scan over
    the experts slices each expert's weights once and runs its own blocks through its
    SwiGLU as dense GEMMs (a loop of dynamic length: blocks past the last expert's are
    never run), then the rows are unsorted and combined with the routing weights. Only
    routed copies are computed (plus at most block - 1 padding rows per expert). Moving
    rows in and out is a gather both ways, forward and backward. In float32 on a CPU
    without a multi-device mesh (`blocked_kernel_applies`), the native kernel runs the
    experts' blocks instead of XLA's loops, forward and backward (1.2-1.5x XLA's rate
    on `small`, AVX2 or AVX-512; see dsjax/cpu_kernels.py). Same shapes as
    `experts_dense`; no FP8 form (the FP8 recipe routes to the other paths).
    """
    if fp8 is not None:
        raise ValueError("moe_impl='blocked' has no FP8 form")
    N, k = indices.shape
    w1, w3, w2 = (jnp.asarray(w) for w in (w1, w3, w2))  # numpy weights cannot take traced indices
    E, D = w1.shape[0], w1.shape[1]
    xs, row, copy, first, count = blocked_rows(x, indices, E, block)
    ys = _blocked_swiglu(xs, first, count, w1, w3, w2, blocked_kernel_applies(xs, w1, w3, w2)).reshape(-1, D)
    ys = _permute_rows(ys, row, copy).reshape(N, k, D)
    return jnp.einsum("nkd,nk->nd", ys, weights.astype(ys.dtype))


def _local_experts(x, weights, indices, w1, w3, w2, first_expert, fp8: Recipe | None = None):
    """Grouped GEMMs over the experts held here (ids first_expert ...); other rows give 0.

    x: [M, D]; weights/indices: [M, k]; w1, w3: [E_loc, D, F]; w2: [E_loc, F, D] -> [M, D].
    """
    M, k = indices.shape
    E_loc = w1.shape[0]
    local = indices.reshape(-1) - first_expert
    mine = (local >= 0) & (local < E_loc)
    flat = jnp.where(mine, local, E_loc)  # rows for other devices' experts sort last
    order = jnp.argsort(flat, stable=True)
    token = order // k
    group_sizes = jnp.zeros((E_loc + 1,), jnp.int32).at[flat].add(1)[:E_loc]
    xs = x[token]
    ys = _grouped_swiglu(xs, w1, w3, w2, group_sizes, fp8)  # rows past sum(group_sizes) are zero
    scale = jnp.where(mine, weights.reshape(-1), 0.0)[order][:, None]
    return jnp.zeros_like(x).at[token].add(ys * scale.astype(ys.dtype))


# Rows one device sends another in one exchange round, as a multiple of the mean
# (token copies per device / devices in the expert group). Copies past it wait for the
# next round: the dispatch stays dropless, and the grouped GEMMs never see more than
# EP_CAPACITY times the rows a device holds.
EP_CAPACITY = 1.5


class _Exchange(NamedTuple):
    """Static description of one device's expert-parallel exchange (hashable)."""

    axis: str  # the mesh axis the experts are split over
    tensor: str | None  # mesh axis splitting the experts' hidden units, if any
    ep: int  # devices in the expert group
    pair: int  # rows per device pair and round
    fp8: Recipe | None  # how the FP8 GEMMs run, or None outside the FP8 recipe
    ragged: bool  # jax.lax.ragged_all_to_all (GPU, TPU), else all_to_all of fixed slots


def _round_take(ex: _Exchange, S, done):
    """Rows each (source, destination) pair moves this round: [ep, ep] int32."""
    return jnp.minimum(S - done, ex.pair)


def _send(ex: _Exchange, rows, S, done):
    """Moves this round's rows to the devices holding their experts.

    rows: [R, W], this device's token copies sorted by destination; S: [ep, ep] copies
    per (source, destination); done: the rows each pair moved in earlier rounds.
    Returns [ep * pair, W]: slot s (rows s*pair ...) holds source s's rows, zeros past
    them.
    """
    me = jax.lax.axis_index(ex.axis)
    take = _round_take(ex, S, done)
    first = jnp.cumsum(S[me]) - S[me] + done[me]  # [ep]: where each destination's rows start
    if ex.ragged:
        out = jnp.zeros((ex.ep * ex.pair, rows.shape[1]), rows.dtype)
        return jax.lax.ragged_all_to_all(rows, out, first, take[me], jnp.full((ex.ep,), me * ex.pair, jnp.int32),
                                         take[:, me], axis_name=ex.axis)
    j = jnp.arange(ex.pair)
    idx = jnp.minimum(first[:, None] + j, rows.shape[0] - 1)  # [ep, pair]
    buf = jnp.where((j < take[me][:, None])[..., None], rows[idx], 0)
    return jax.lax.all_to_all(buf, ex.axis, 0, 0, tiled=True).reshape(ex.ep * ex.pair, -1)


def _return(ex: _Exchange, slots, acc, S, done):
    """Sends each slot of `slots` [ep * pair, W] back to its source, which writes the rows
    into `acc` [R, W] where they were taken from (the transpose of `_send`)."""
    me = jax.lax.axis_index(ex.axis)
    take = _round_take(ex, S, done)
    starts = jnp.cumsum(S, axis=1) - S + done  # [src, dst]: where dst's rows start at src
    if ex.ragged:
        return jax.lax.ragged_all_to_all(slots, acc, jnp.arange(ex.ep, dtype=jnp.int32) * ex.pair, take[:, me],
                                         starts[:, me], take[me], axis_name=ex.axis)
    back = jax.lax.all_to_all(slots.reshape(ex.ep, ex.pair, -1), ex.axis, 0, 0, tiled=True)  # [dst, pair, W]
    j = jnp.arange(ex.pair)
    idx = jnp.where(j < take[me][:, None], starts[me][:, None] + j, acc.shape[0])  # off the end: dropped
    return acc.at[idx.reshape(-1)].set(back.reshape(-1, acc.shape[1]), mode="drop")


def _received_experts(ex: _Exchange, ids, S, done, n_local: int):
    """Local expert of each received row (n_local for the empty ones): [ep * pair]."""
    got = _send(ex, ids, S, done)[:, 0] - 1
    return jnp.where(got < 0, n_local, got)


def _expert_ffn(ex: _Exchange, rows, experts, w1, w3, w2):
    """The local experts' SwiGLU on received rows in slot order; empty rows give 0."""
    n_local = w1.shape[0]
    order = jnp.argsort(experts, stable=True)
    sizes = jnp.zeros((n_local + 1,), jnp.int32).at[experts].add(1)[:n_local]
    ys = _grouped_swiglu(rows[order], w1, w3, w2, sizes, ex.fp8)
    ys = jnp.zeros_like(ys).at[order].set(ys)
    return jax.lax.psum(ys, ex.tensor) if ex.tensor else ys


def _plan(ex: _Exchange, experts_sorted, n_local: int):
    """(S [ep, ep] copies per (source, destination), ids [R, 1] local expert + 1)."""
    dest = experts_sorted // n_local
    send = jnp.zeros((ex.ep,), jnp.int32).at[dest].add(1)
    S = jax.lax.all_gather(send, ex.axis)  # the sizes travel first: ep x ep integers
    return S, (experts_sorted % n_local + 1)[:, None].astype(jnp.int32)


def _rounds(ex: _Exchange, S, body, init):
    """Runs `body(done, carry) -> carry` over exchange rounds until every row has moved.
    Every device sees the same S, so all take the same number of rounds."""
    def step(state):
        done, carry = state
        return done + _round_take(ex, S, done), body(done, carry)
    return jax.lax.while_loop(lambda state: jnp.any(state[0] < S), step,
                              (jnp.zeros_like(S), init))[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _exchange_ffn(ex: _Exchange, xs, w1, w3, w2, experts_sorted):
    """Expert outputs [R, D] for this device's token copies xs [R, D] (sorted by expert,
    ids `experts_sorted` [R]), computed on the devices that hold the experts."""
    n_local = w1.shape[0]
    S, ids = _plan(ex, experts_sorted, n_local)

    def body(done, acc):
        rows = _send(ex, xs, S, done)
        ys = _expert_ffn(ex, rows, _received_experts(ex, ids, S, done, n_local), w1, w3, w2)
        return _return(ex, ys.astype(acc.dtype), acc, S, done)

    return _rounds(ex, S, body, jnp.zeros_like(xs))


def _exchange_ffn_fwd(ex, xs, w1, w3, w2, experts_sorted):
    # Saves only the inputs: the backward pass moves the rows again and recomputes the
    # experts' hidden units, so no buffer of the rounds outlives the forward pass.
    return _exchange_ffn(ex, xs, w1, w3, w2, experts_sorted), (xs, w1, w3, w2, experts_sorted)


def _exchange_ffn_bwd(ex, res, dys):
    xs, w1, w3, w2, experts_sorted = res
    n_local = w1.shape[0]
    S, ids = _plan(ex, experts_sorted, n_local)
    D = xs.shape[1]

    def body(done, carry):
        dxs, g1, g3, g2 = carry
        both = _send(ex, jnp.concatenate([xs, dys.astype(xs.dtype)], axis=1), S, done)
        experts = _received_experts(ex, ids, S, done, n_local)
        _, vjp = jax.vjp(lambda r, a, b, c: _expert_ffn(ex, r, experts, a, b, c), both[:, :D], w1, w3, w2)
        dr, d1, d3, d2 = vjp(both[:, D:].astype(xs.dtype))
        return _return(ex, dr.astype(dxs.dtype), dxs, S, done), g1 + d1, g3 + d3, g2 + d2

    zeros = lambda a: jnp.zeros_like(a)
    dxs, g1, g3, g2 = _rounds(ex, S, body, (zeros(xs), zeros(w1), zeros(w3), zeros(w2)))
    return dxs, g1, g3, g2, None


_exchange_ffn.defvjp(_exchange_ffn_fwd, _exchange_ffn_bwd)


def experts_expert_parallel(x, weights, indices, w1, w3, w2, expert_axis: str, token_axes, tensor_axis,
                            fp8: Recipe | None = None, ragged: bool | None = None):
    """Dropless expert parallelism under shard_map (needs a mesh set with jax.set_mesh).

    Each device holds E / ep routed experts. When the tokens are split over
    `expert_axis` (the usual layout), each device routes its own tokens, sorts the copies
    by expert, and sends each copy only to the device holding its expert: the copy counts
    per device pair are exchanged first (an all-gather of ep x ep integers), then the
    rows move in rounds of at most EP_CAPACITY times the mean per pair
    (`jax.lax.ragged_all_to_all` on GPUs and TPUs, `all_to_all` of fixed slots on a CPU,
    which has no ragged collective; `ragged` overrides), the experts run their grouped
    GEMMs, and the outputs travel back the same way. When the tokens are replicated over
    `expert_axis`, each device computes its experts' share of every token and a psum adds
    them. The expert hidden axis may be split over `tensor_axis` (partial sums are added
    with psum). Same shapes as `experts_dense`; x and the routing are sharded over
    `token_axes`, the expert weights over `expert_axis`.
    """
    from jax.sharding import PartitionSpec as P

    mesh = jax.sharding.get_abstract_mesh()
    tokens_split = expert_axis in token_axes
    row = P(token_axes if token_axes else None, None)
    w_in, w_out = P(expert_axis, None, tensor_axis), P(expert_axis, tensor_axis, None)
    ragged = jax.default_backend() != "cpu" if ragged is None else ragged

    def local(x, weights, indices, w1, w3, w2):
        if not tokens_split:
            out = _local_experts(x, weights, indices, w1, w3, w2, jax.lax.axis_index(expert_axis) * w1.shape[0], fp8)
            if tensor_axis:
                out = jax.lax.psum(out, tensor_axis)
            return jax.lax.psum(out, expert_axis)
        M, k = indices.shape
        ep = mesh.shape[expert_axis]
        ex = _Exchange(expert_axis, tensor_axis, ep, max(1, int(EP_CAPACITY * M * k / ep)), fp8, ragged)
        flat = indices.reshape(-1)
        order = jnp.argsort(flat, stable=True)
        token = order // k
        ys = _exchange_ffn(ex, x[token], w1, w3, w2, flat[order])  # [M*k, D]
        ys = ys * weights.reshape(-1)[order][:, None].astype(ys.dtype)
        return jnp.zeros_like(x).at[token].add(ys)

    return jax.shard_map(local, in_specs=(row, row, row, w_in, w_in, w_out), out_specs=row,
                         check_vma=False)(x, weights, indices, w1, w3, w2)


def experts_local(x, weights, indices, w1, w3, w2, token_axes, tensor_axis, fp8: Recipe | None = None,
                  dispatch=None):
    """`dispatch` (default `experts_ragged`; or `experts_blocked`) on each device's own
    tokens under shard_map: data-parallel devices route, sort and gather only the rows
    they hold (GSPMD alone would sort the global batch's copies). The expert weights are
    gathered whole on each device (FSDP) except their hidden axis, which may be split
    over `tensor_axis`."""
    from jax.sharding import PartitionSpec as P

    row = P(token_axes, None)
    w_in, w_out = P(None, None, tensor_axis), P(None, tensor_axis, None)
    dispatch = dispatch or experts_ragged

    def local(x, weights, indices, w1, w3, w2):
        out = dispatch(x, weights, indices, w1, w3, w2, fp8)
        return jax.lax.psum(out, tensor_axis) if tensor_axis else out

    return jax.shard_map(local, in_specs=(row, row, row, w_in, w_in, w_out), out_specs=row,
                         check_vma=False)(x, weights, indices, w1, w3, w2)


DISPATCH = {"dense": experts_dense, "ragged": experts_ragged, "blocked": experts_blocked,
            "gather": experts_gather}


def _mesh_axes():
    """(experts, batch, expert hidden) mesh axes of size > 1 under the active mesh and
    logical-axis rules, or None without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    flat = lambda a: () if a is None else ((a,) if isinstance(a, str) else tuple(a))
    # One logical axis at a time: in one spec, Flax gives each mesh axis to the first
    # logical axis that names it, and the batch usually takes 'expert' too.
    return tuple(tuple(a for a in flat(nn.logical_to_mesh_axes((name,))[0]) if mesh.shape[a] > 1)
                 for name in ("experts", "batch", "expert_mlp"))


def expert_parallel_axes():
    """(expert axis, token axes, tensor axis) when the active mesh and logical-axis rules
    split the experts over more than one device, else None."""
    axes = _mesh_axes()
    if axes is None or len(axes[0]) != 1:
        return None
    experts, batch, hidden = axes
    return experts[0], batch, hidden[0] if len(hidden) == 1 else None


def data_parallel_axes():
    """(token axes, tensor axis) when the active mesh splits the tokens but not the
    experts (the routed experts then run per device with `experts_local`), else None."""
    axes = _mesh_axes()
    if axes is None or axes[0] or not axes[1]:
        return None
    return axes[1], axes[2][0] if len(axes[2]) == 1 else None


class Gate(nn.Module):
    """Router: float32 logits x W [N, E]; under noaux_tc, plus the `moe_bias` bias [E]."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jnp.ndarray):
        cfg = self.cfg
        w = param(self, "weight", (cfg.hidden_size, cfg.n_routed_experts), ("embed", "experts"),
                  dtype=jnp.float32)
        bias = jnp.zeros((cfg.n_routed_experts,), jnp.float32)
        if cfg.topk_method == "noaux_tc":  # only noaux_tc selects with the bias
            bias = self.variable("moe_bias", "bias", nn.with_logical_partitioning(
                lambda: jnp.zeros((cfg.n_routed_experts,), jnp.float32), ("experts",))).value
        logits = jnp.einsum("nd,de->ne", x.astype(jnp.float32), w)
        return route(cfg, logits, bias)


class MoE(nn.Module):
    """DeepSeekMoE FFN. x: [B, T, D] -> (y [B, T, D], loads [E], balance loss scalar)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jnp.ndarray):
        cfg, dt = self.cfg, dtype_of(self.cfg.dtype)
        B, T, D = x.shape
        E, F = cfg.n_routed_experts, cfg.moe_intermediate_size
        flat = x.reshape(B * T, D).astype(dt)
        with jax.named_scope("gate"):
            weights, indices, scores = Gate(cfg, name="gate")(flat)
        w1 = param(self, "w1", (E, D, F), ("experts", "embed", "expert_mlp")).astype(dt)
        w3 = param(self, "w3", (E, D, F), ("experts", "embed", "expert_mlp")).astype(dt)
        w2 = param(self, "w2", (E, F, D), ("experts", "expert_mlp", "embed")).astype(dt)
        shared = MLP(cfg, cfg.shared_intermediate_size, name="shared_experts") if cfg.n_shared_experts else None
        fused = None  # the shared experts' weights, where the gather kernel runs them too
        with jax.named_scope("routed_experts"):
            ep = expert_parallel_axes()
            fp8 = Recipe(cfg.fp8_gemm, cfg.fp8_pow2_scales) if cfg.precision == "fp8" else None
            dp = data_parallel_axes() if ep is None else None
            mesh = jax.sharding.get_abstract_mesh()
            shards = 1 if dp is None else math.prod(mesh.shape[a] for a in dp[0])
            impl = cfg.moe_dispatch(tokens=B * T // shards)  # a device's tokens pick the dispatch
            if ep is not None:
                y = experts_expert_parallel(flat, weights, indices, w1, w3, w2, *ep, fp8=fp8)
            elif dp is not None and impl in ("ragged", "blocked"):
                y = experts_local(flat, weights, indices, w1, w3, w2, *dp, fp8=fp8, dispatch=DISPATCH[impl])
            else:
                if (impl == "gather" and shared is not None and fp8 is None and not self.is_initializing()
                        and gather_kernel_applies(flat, w1, w3, w2)):
                    params = nn.unbox(shared.variables["params"])
                    fused = tuple(params[name].astype(dt) for name in ("w1", "w3", "w2"))
                extra = () if fused is None else (fused,)  # experts_gather's `shared`
                y = DISPATCH[impl](flat, weights, indices, w1, w3, w2, fp8, *extra)
            y = y.reshape(B, T, D)
        if shared is not None and fused is None:
            with jax.named_scope("shared_experts"):
                y = y + shared(x)
        loads = expert_loads(cfg, indices)
        balance = sequence_balance_loss(cfg, indices, scores, B)
        return y.astype(x.dtype), loads, balance
