"""The CPU wing's MoE dispatches: `gather` for a few tokens (decoding) and `blocked` for
many (training, prefill), and the per-call choice between them (`moe_impl='cpu'`).

XLA:CPU runs `jax.lax.ragged_dot` as a masked GEMM over every expert, so the grouped
GEMM of the core (`dsjax.moe.dispatch.experts_ragged`) reads and multiplies all E
experts' weights for every row. Both dispatches here compute only the routed copies:

- `experts_gather`: a loop over the experts the token copies chose, each one's weights
  sliced once and its copies run as matrix-vector products (a step reads only the chosen
  experts); in float32 the native kernel (`kernels.gather_swiglu`) does the same without
  copying the slices, and can run the layer's shared experts in the same call
  (`experts_gather_with_shared`, registered as 'moe_shared').
- `experts_blocked`: dropless; the copies sorted by expert and padded per expert into
  fixed-size row blocks, each block one expert's, run as dense GEMMs; in float32 the
  native kernel (`kernels.blocked_swiglu_fwd` / `_bwd`) runs the blocks.

Both are checked against the dense reference in tests/test_moe_dispatch.py. Neither has
an FP8 form (the FP8 recipe on a CPU resolves to the dense dispatch).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsjax import impl
from dsjax.cpu import kernels
from dsjax.cpu.linear import transposed
from dsjax.fp8 import Recipe
from dsjax.moe.dispatch import swiglu

# Up to this many token copies per routed expert on average, `moe_impl='cpu'` runs the
# gather dispatch (a loop over the chosen experts, matrix-vector products), else blocked.
GATHER_COPIES_PER_EXPERT = 2


def choose(cfg, tokens: int | None) -> str:
    """'gather' or 'blocked', the dispatch `moe_impl='cpu'` runs for a call on `tokens`
    tokens (None: a training-sized call): gather for c = tokens * num_experts_per_tok
    token copies up to GATHER_COPIES_PER_EXPERT per expert, blocked otherwise."""
    copies = None if tokens is None else tokens * cfg.num_experts_per_tok
    if copies is not None and copies <= GATHER_COPIES_PER_EXPERT * cfg.n_routed_experts:
        return "gather"
    return "blocked"


def _per_copy(x, weights, indices, w1, w3, w2):
    """The gather dispatch as batched products: every token copy gathers its expert's
    weights (w1[idx]: [N*k, D, F]) for a batched matrix-vector product. Differentiable;
    `experts_gather`'s backward pass."""
    N, k = indices.shape
    flat = indices.reshape(-1)  # [N*k]
    xs = jnp.repeat(x, k, axis=0)  # [N*k, D]
    h = nn.silu(jnp.einsum("rd,rdf->rf", xs, w1[flat])) * jnp.einsum("rd,rdf->rf", xs, w3[flat])
    ys = jnp.einsum("rf,rfd->rd", h, w2[flat]) * weights.reshape(-1)[:, None].astype(h.dtype)
    return ys.reshape(N, k, -1).sum(1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(9,))
def _gather_loop(x, weights, indices, w1, w3, w2, s1, s3, s2, kernel: bool = False):
    """The gather dispatch as a loop over the experts the token copies chose, in expert
    order: each chosen expert's three weights are sliced out once (read from memory once)
    and its copies run through them as matrix-vector products, so a call reads only the
    chosen experts, and computes only the routed copies; plus the shared experts' SwiGLU
    (s1, s3 [D, Fs], s2 [Fs, D]; Fs = 0: none). With `kernel`, on a CPU, the native kernel
    does both without copying the slices (`kernels.gather_swiglu`)."""

    def xla(x, c, i, w1, w3, w2, s1, s3, s2):
        y = _loop_experts(x, c, i, w1, w3, w2)
        return y + swiglu(x, s1, s3, s2) if s1.shape[1] else y

    args = (x, weights, indices, w1, w3, w2, s1, s3, s2)
    if kernel:
        return jax.lax.platform_dependent(
            *args, cpu=lambda *a: kernels.gather_swiglu(*a[:6], a[6:]).astype(x.dtype), default=xla)
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


def _gather_loop_fwd(x, weights, indices, w1, w3, w2, s1, s3, s2, kernel):
    res = (x, weights, indices, w1, w3, w2, s1, s3, s2)
    return _gather_loop(*res, kernel), res


def _gather_loop_bwd(kernel, res, dy):
    """The batched gather's gradient (`_per_copy`), plus the shared MLP's."""
    x, weights, indices, w1, w3, w2, s1, s3, s2 = res

    def f(x, c, w1, w3, w2, s1, s3, s2):
        y = _per_copy(x, c, indices, w1, w3, w2)
        return y + swiglu(x, s1, s3, s2) if s1.shape[1] else y

    _, vjp = jax.vjp(f, x, weights, w1, w3, w2, s1, s3, s2)
    dx, dweights, d1, d3, d2, ds1, ds3, ds2 = vjp(dy)
    return dx, dweights, None, d1, d3, d2, ds1, ds3, ds2


_gather_loop.defvjp(_gather_loop_fwd, _gather_loop_bwd)


def gather_kernel_applies(*arrays) -> bool:
    """The gather dispatch runs the native kernel: float32 `arrays`, no multi-device mesh,
    and the kernel built (`kernels.applies`)."""
    return kernels.applies(*(a.dtype for a in arrays))


def experts_gather(x, weights, indices, w1, w3, w2, fp8: Recipe | None = None, shared=None):
    """Per-copy dispatch for few tokens (decoding): a step reads only the experts the
    tokens chose, not all E. A loop over the chosen experts in expert order slices each
    one's weights once and runs its token copies as matrix-vector products
    (`_gather_loop`), where gathering every copy's weights (w1[idx]: [N*k, D, F]) for
    batched products would copy each chosen expert once per copy. In float32 without a
    multi-device mesh the native kernel (`kernels.gather_swiglu`, where it builds) runs
    the forward instead, reading the chosen experts in place. Its gradient is that of the
    batched gather (`_per_copy`). Same shapes as `dsjax.moe.dispatch.experts_dense`; no
    FP8 form.

    `shared` = (s1, s3, s2), the layer's shared-experts MLP weights ([D, Fs], [D, Fs],
    [Fs, D]), where `gather_kernel_applies`: the kernel runs them as one more work item
    and the result includes them."""
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
    return _gather_loop(x, weights, indices, w1, w3, w2, s1, s3, s2, kernel)


def experts_gather_with_shared(x, weights, indices, w1, w3, w2, shared):
    """`experts_gather` plus the shared experts' SwiGLU (`shared` = (s1, s3, s2)) in the
    native kernel's one call, where it runs (`gather_kernel_applies`); else None (the
    layer then runs the shared experts itself)."""
    if not gather_kernel_applies(x, w1, w3, w2, *shared):
        return None
    return experts_gather(x, weights, indices, w1, w3, w2, shared=shared)


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
    (`kernels.blocked_swiglu_fwd`), each expert one work item."""
    if kernel:  # the kernel writes a1 and a3 as it goes; XLA's loops skip them here
        return _blocked_swiglu_fwd(xs, first, count, w1, w3, w2, kernel)[0]
    return _blocks_forward(xs, first, count, w1, w3, w2)[0]


def _blocked_swiglu_fwd(xs, first, count, w1, w3, w2, kernel: bool = False):
    def xla(xs, first, count, w1, w3, w2):
        return _blocks_forward(xs, first, count, w1, w3, w2, residuals=True)

    args = (xs, first, count, w1, w3, w2)
    if kernel:
        ys, a1, a3 = jax.lax.platform_dependent(*args, cpu=kernels.blocked_swiglu_fwd, default=xla)
    else:
        ys, a1, a3 = xla(*args)
    return ys, (xs, first, count, w1, w3, w2, a1, a3)  # a1, a3: [nb, b, F], 2F per row


def _blocked_swiglu_bwd(kernel, res, dys):
    if kernel:
        xs, first, count, w1, w3, w2, a1, a3 = res
        dxs, g1, g3, g2 = jax.lax.platform_dependent(
            xs, dys, a1, a3, first, count, w1, w3, w2, cpu=kernels.blocked_swiglu_bwd,
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
            xt, ht = transposed(xb), transposed(silu * a3)  # plain GEMMs
            return dxs, g1 + f32(xt @ da1), g3 + f32(xt @ da3), g2 + f32(ht @ dy)

        zeros = tuple(jnp.zeros(w.shape, jnp.float32) for w in (w1e, w3e, w2e))
        dxs, *g = jax.lax.fori_loop(start, start + n, block, (dxs, *zeros))
        return dxs, tuple(gi.astype(w.dtype) for gi, w in zip(g, (w1e, w3e, w2e)))

    dxs, (g1, g3, g2) = jax.lax.scan(expert, jnp.zeros_like(xs), (w1, w3, w2, first, count))
    return dxs, g1, g3, g2


_blocked_swiglu.defvjp(_blocked_swiglu_fwd, _blocked_swiglu_bwd)


def blocked_kernel_applies(*arrays) -> bool:
    """The blocked dispatch's experts run the native kernel (`kernels.blocked_swiglu_fwd`
    and its backward): float32 `arrays`, no multi-device mesh, and the kernels built
    (`kernels.applies`)."""
    return kernels.applies(*(a.dtype for a in arrays))


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
    rows in and out is a gather both ways, forward and backward. In float32 without a
    multi-device mesh (`blocked_kernel_applies`), the native kernel runs the experts'
    blocks instead of XLA's loops, forward and backward. Same shapes as
    `dsjax.moe.dispatch.experts_dense`; no FP8 form.
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


impl.register("moe", "gather", experts_gather)
impl.register("moe", "blocked", experts_blocked)
impl.register("moe_choice", "cpu", choose)
impl.register("moe_shared", "gather", experts_gather_with_shared)
