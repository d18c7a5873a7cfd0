"""Blockwise attention in plain JAX: the online softmax of FlashAttention (Dao et al.,
2022), forward and backward, so the float32 scores [B, H, T, S] are never all live at
once. Runs on every backend (CPU included); it is MLA's `model.attn_kernel=blockwise`.

The forward pass walks key blocks with a running max and sum per query row and keeps
only the output and its log-sum-exp; the backward pass recomputes each block's
probabilities from them, once per block pair (a custom VJP), so memory grows with
T x (block + head dims), not T x S. Masked scores are set to -1e30 as the dense softmax
does, so the two agree on every row that attends to at least one key (causal masks have
no other kind).

Causal calls (queries and keys at the same positions) skip the key blocks that lie
wholly above the diagonal at every length: a long call walks only the n(n+1)/2 block
pairs (i, j <= i) of its n query and key blocks, one scan over that list in each pass;
a call that fits one query block runs as a few query chunks, each against the keys up to
its own end (see `blockwise_attention`).

The kernel works head-major ([B, H, T, *], the layout its GEMMs batch over); callers'
[B, T, H, *] arrays are transposed once on the way in and out. Keys and values may have
one head shared by every query head (absorbed MLA attends to the latents [B, S, 1, C + R]
this way): the GEMMs then batch over B only and contract (or sum) the query heads in
place, so the shared keys are never copied per head.

`fused_attention` is the same product through `jax.nn.dot_product_attention` (cuDNN's
flash attention on GPUs): MLA's value head is narrower than its query/key head, so V is
zero-padded to the key width and the output cut back.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

_NEG = -1e30


def _pad(x, axis: int, multiple: int):
    n = x.shape[axis]
    extra = -n % multiple
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def _blocks(x, axis: int, size: int):
    """[..., N, ...] -> [N / size, ..., size, ...] (blocks first, for lax.scan)."""
    shape = x.shape[:axis] + (x.shape[axis] // size, size) + x.shape[axis + 1:]
    return jnp.moveaxis(x.reshape(shape), axis, 0)


def _unblock(x, axis: int):
    """Inverse of _blocks: [N / size, ..., size, ...] -> [..., N, ...]."""
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2:])


def _dots(qb, kb):
    """qb [B, H, bq, K] . kb [B, H or 1, bk, K] -> float32 [B, H, bq, bk]."""
    if kb.shape[1] == 1 < qb.shape[1]:  # shared key head: one GEMM per batch row, no copy per head
        return jnp.einsum("bhtk,bsk->bhts", qb, kb[:, 0], preferred_element_type=jnp.float32)
    return jnp.einsum("bhtk,bhsk->bhts", qb, kb, preferred_element_type=jnp.float32)


def _scores(qb, kb, mb, scale):
    """Masked, scaled scores: mb [B, bq, bk] -> float32 [B, H, bq, bk]."""
    return jnp.where(mb[:, None], _dots(qb, kb) * scale, _NEG)


def _mix(p, vb):
    """p [B, H, bq, bk] x values (or keys) [B, H or 1, bk, V] -> float32 [B, H, bq, V]."""
    if vb.shape[1] == 1 < p.shape[1]:
        return jnp.einsum("bhts,bsv->bhtv", p, vb[:, 0], preferred_element_type=jnp.float32)
    return jnp.einsum("bhts,bhsv->bhtv", p, vb, preferred_element_type=jnp.float32)


def _key_grad(g, x, like):
    """g [B, H, bq, bk] (scores' gradient or probabilities), x [B, H, bq, W] -> float32
    gradient of a key or value block like `like` [B, H or 1, bk, W] (summed over the query
    heads when they share one)."""
    if like.shape[1] == 1 < g.shape[1]:
        return jnp.einsum("bhts,bhtw->bsw", g, x, preferred_element_type=jnp.float32)[:, None]
    return jnp.einsum("bhts,bhtw->bhsw", g, x, preferred_element_type=jnp.float32)


def _forward(q, k, v, mask, scale, bq, bk, unroll=False):
    """Padded, head-major inputs (q [B, H, T, K], k [B, H or 1, S, K], v [B, H or 1, S, V])
    -> (o [B, H, T, V] float32, lse [B, H, T]): every query block against every key block."""
    kbs, vbs = _blocks(k, 2, bk), _blocks(v, 2, bk)

    def one_query_block(_, args):
        qb, mq = args  # [B, H, bq, K], [B, bq, S]
        mqb = _blocks(mq, 2, bk)  # [nk, B, bq, bk]
        B, H, n, _ = qb.shape
        init = (jnp.full((B, H, n), -jnp.inf, jnp.float32), jnp.zeros((B, H, n), jnp.float32),
                jnp.zeros((B, H, n, v.shape[-1]), jnp.float32))

        def step(carry, blk):
            kb, vb, mb = blk
            return _online_step(carry, _scores(qb, kb, mb, scale), vb), None

        (m, l, acc), _ = jax.lax.scan(step, init, (kbs, vbs, mqb), unroll=unroll)
        return None, (acc / l[..., None], m + jnp.log(l))

    _, (o, lse) = jax.lax.scan(one_query_block, None, (_blocks(q, 2, bq), _blocks(mask, 1, bq)), unroll=unroll)
    return _unblock(o, 2), _unblock(lse, 2)  # [B, H, T, V], [B, H, T]


def _online_step(carry, s, vb):
    """One key block of the online softmax: running (max m [B, H, bq], sum l [B, H, bq],
    output acc [B, H, bq, V]) updated with the block's scores s [B, H, bq, bk] and values vb."""
    m, l, acc = carry
    m_new = jnp.maximum(m, s.max(-1))
    p = jnp.exp(s - m_new[..., None])
    fix = jnp.exp(m - m_new)
    return m_new, l * fix + p.sum(-1), acc * fix[..., None] + _mix(p.astype(vb.dtype), vb)


def _backward(q, k, v, mask, o, lse, do, scale, bq, bk, unroll=False):
    """Gradients of the padded, head-major inputs, recomputing each block's probabilities
    once (FlashAttention-2's order): a scan over the key blocks, each running a scan over
    the query blocks that sums its dk and dv and hands back every query block's share of
    dq, which the outer scan adds up (dq stays the size of q)."""
    delta = (do.astype(jnp.float32) * o).sum(-1)  # [B, H, T] (an einsum here runs as B*H*T tiny dots)
    qbs, dobs, mqs = _blocks(q, 2, bq), _blocks(do, 2, bq), _blocks(mask, 1, bq)
    lses, deltas = _blocks(lse, 2, bq), _blocks(delta, 2, bq)

    def key_block(dq, args):
        kb, vb, j = args

        def step(carry, blk):
            dk, dv = carry
            qb, dob, mq, lse_b, delta_b = blk
            mb = jax.lax.dynamic_slice_in_dim(mq, j * bk, bk, axis=2)
            p, ds = _probs_and_grads(qb, kb, vb, mb, dob, lse_b, delta_b, scale)
            dv = dv + _key_grad(p, dob, vb)
            dk = dk + _key_grad(ds, qb, kb) * scale
            return (dk, dv), _mix(ds, kb) * scale

        init = (jnp.zeros(kb.shape, jnp.float32), jnp.zeros(vb.shape, jnp.float32))
        (dk, dv), dq_j = jax.lax.scan(step, init, (qbs, dobs, mqs, lses, deltas), unroll=unroll)
        return dq + dq_j, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros(qbs.shape, jnp.float32),
                                (_blocks(k, 2, bk), _blocks(v, 2, bk), jnp.arange(k.shape[2] // bk)),
                                unroll=unroll)
    return _unblock(dq, 2), _unblock(dk, 2), _unblock(dv, 2)


def _probs_and_grads(qb, kb, vb, mb, dob, lse_b, delta_b, scale):
    """One block pair's probabilities p [B, H, bq, bk], recomputed from the log-sum-exp
    lse_b [B, H, bq], and the gradient of its scaled scores ds = p * (dO V^T - delta)."""
    p = jnp.exp(_scores(qb, kb, mb, scale) - lse_b[..., None])
    return p, p * (_dots(dob, vb) - delta_b[..., None])


def _slice(x, axis: int, i, size: int):
    return jax.lax.dynamic_slice_in_dim(x, i * size, size, axis=axis)


def _put(x, axis: int, i, size: int, value):
    return jax.lax.dynamic_update_slice_in_dim(x, value.astype(x.dtype), i * size, axis=axis)


def _mask_block(mask, i, j, b: int):
    """mask [B, T, T] -> its block [B, b, b] of query block i and key block j."""
    return jax.lax.dynamic_slice(mask, (0, i * b, j * b), (mask.shape[0], b, b))


def _forward_causal(q, k, v, mask, scale, b, unroll=False):
    """`_forward` for a causal call (T == S, both padded to n blocks of b): one scan over
    the n(n+1)/2 block pairs (i, j) with j <= i, row by row; the running softmax restarts
    at each row's first pair and the row's output and log-sum-exp are written at its
    last (the diagonal block, where the row sees its last keys)."""
    B, H, T, _ = q.shape
    n = T // b
    rows, cols = (jnp.asarray(a, jnp.int32) for a in np.tril_indices(n))  # (0,0), (1,0), (1,1), (2,0), ...
    fresh = (jnp.full((B, H, b), -jnp.inf, jnp.float32), jnp.zeros((B, H, b), jnp.float32),
             jnp.zeros((B, H, b, v.shape[-1]), jnp.float32))

    def step(carry, ij):
        state, o, lse = carry
        i, j = ij
        state = jax.tree.map(lambda new, old: jnp.where(j == 0, new, old), fresh, state)
        s = _scores(_slice(q, 2, i, b), _slice(k, 2, j, b), _mask_block(mask, i, j, b), scale)
        m, l, acc = state = _online_step(state, s, _slice(v, 2, j, b))
        # written at every pair of the row; the row's last pair (j == i) writes the final values
        return (state, _put(o, 2, i, b, acc / l[..., None]), _put(lse, 2, i, b, m + jnp.log(l))), None

    init = (fresh, jnp.zeros((B, H, T, v.shape[-1]), jnp.float32), jnp.zeros((B, H, T), jnp.float32))
    (_, o, lse), _ = jax.lax.scan(step, init, (rows, cols), unroll=unroll)
    return o, lse


def _backward_causal(q, k, v, mask, o, lse, do, scale, b, unroll=False):
    """`_backward` for a causal call: one scan over the block pairs (j, i) with i >= j, key
    block by key block (FlashAttention-2's order); dk and dv of key block j are summed over
    its query blocks and written at its last pair (i = n - 1), each pair adds its share
    into dq."""
    B, H, T, K = q.shape
    n = T // b
    delta = (do.astype(jnp.float32) * o).sum(-1)  # [B, H, T]
    cols, rows = (jnp.asarray(a, jnp.int32) for a in np.triu_indices(n))  # (j, i): (0,0), (0,1), ..., (1,1), ...
    kh = k.shape[1]
    fresh = (jnp.zeros((B, kh, b, K), jnp.float32), jnp.zeros((B, kh, b, v.shape[-1]), jnp.float32))

    def step(carry, ji):
        (dk_j, dv_j), dq, dk, dv = carry
        j, i = ji
        dk_j, dv_j = jax.tree.map(lambda new, old: jnp.where(i == j, new, old), fresh, (dk_j, dv_j))
        qb, kb, vb, dob = _slice(q, 2, i, b), _slice(k, 2, j, b), _slice(v, 2, j, b), _slice(do, 2, i, b)
        p, ds = _probs_and_grads(qb, kb, vb, _mask_block(mask, i, j, b), dob, _slice(lse, 2, i, b),
                                 _slice(delta, 2, i, b), scale)
        dv_j = dv_j + _key_grad(p, dob, vb)
        dk_j = dk_j + _key_grad(ds, qb, kb) * scale
        dq = _put(dq, 2, i, b, _slice(dq, 2, i, b) + _mix(ds, kb) * scale)
        # written at every pair of the column; its last pair (i == n - 1) writes the sums
        return ((dk_j, dv_j), dq, _put(dk, 2, j, b, dk_j), _put(dv, 2, j, b, dv_j)), None

    init = (fresh, jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    (_, dq, dk, dv), _ = jax.lax.scan(step, init, (cols, rows), unroll=unroll)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _attention(q, k, v, mask, scale, bq, bk, causal=False, unroll=False):
    return _attention_fwd(q, k, v, mask, scale, bq, bk, causal, unroll)[0]


def _attention_fwd(q, k, v, mask, scale, bq, bk, causal=False, unroll=False):
    if causal:
        o, lse = _forward_causal(q, k, v, mask, scale, bq, unroll)
    else:
        o, lse = _forward(q, k, v, mask, scale, bq, bk, unroll)
    return o, (q, k, v, mask, o, lse)


def _attention_bwd(scale, bq, bk, causal, unroll, res, do):
    q, k, v, mask, o, lse = res
    if causal:
        dq, dk, dv = _backward_causal(q, k, v, mask, o, lse, do, scale, bq, unroll)
    else:
        dq, dk, dv = _backward(q, k, v, mask, o, lse, do, scale, bq, bk, unroll)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)


# Fewest rows per query chunk of a short causal call (see `blockwise_attention`), and most chunks.
CAUSAL_CHUNK = 128
CAUSAL_CHUNKS = 4
# Fewest blocks a long causal call is cut into (its blocks no smaller than CAUSAL_CHUNK rows):
# the diagonal blocks, computed whole, then cost at most 1/CAUSAL_BLOCKS of the causal work.
CAUSAL_BLOCKS = 16


def causal_chunks(T: int, block_q: int = 512) -> int:
    """Query chunks of a causal call with T queries and keys that fits one query block (1:
    not chunked, or a longer call, which `causal_block` cuts instead); see
    `blockwise_attention`."""
    return min(CAUSAL_CHUNKS, T // CAUSAL_CHUNK) if 2 * CAUSAL_CHUNK <= T <= block_q else 1


def causal_block(T: int, block_q: int = 512, block_k: int = 512) -> int:
    """Rows (and keys) per block of a causal call with T > block_q queries and keys: at
    least CAUSAL_BLOCKS blocks where that leaves CAUSAL_CHUNK rows or more, a multiple of
    CAUSAL_CHUNK, at most the block sizes given (T = 4096: 256, 16 blocks)."""
    rows = -(-T // CAUSAL_BLOCKS)
    rows = max(CAUSAL_CHUNK, -(-rows // CAUSAL_CHUNK) * CAUSAL_CHUNK)
    return min(block_q, block_k, rows)


def blockwise_attention(q, k, v, mask, scale: float, block_q: int = 512, block_k: int = 512,
                        causal: bool = False, heads_first: bool = False, unroll: bool = False) -> jnp.ndarray:
    """softmax(q k^T * scale, masked) v without materializing the scores.

    q: [B, T, H, K]; k: [B, S, H, K]; v: [B, S, H, V] (or one head [B, S, 1, *] shared by
    all H); mask: bool [B, T, S] (True attends). Returns float32 [B, T, H, V]. T and S are
    padded to the block sizes internally. `heads_first`: q, k, v and the result are
    [B, H, T, *] instead, the layout the kernel works in (the others are transposed to it
    once, on the way in and out, not block by block). `unroll`: the block loops are
    unrolled (no while loop in the program; XLA's cost analysis counts a loop body once).

    `causal`: the caller promises that the mask never lets query t see a key s > t (queries
    and keys at the same positions, T == S; causal masks with or without segments), and
    the key blocks above the diagonal are skipped:
    - T > block_q: queries and keys are cut into n blocks of `causal_block(T)` rows and
      only the n(n+1)/2 pairs on or below the diagonal are computed, forward and backward
      ((n + 1) / n times the causal work; 17/16 at T = 4096);
    - a call that fits one query block runs as up to CAUSAL_CHUNKS chunks of queries, each
      against the keys up to its own end: 3/4 of the scores at 2 chunks, 5/8 at 4. Chunks
      hold at least CAUSAL_CHUNK queries, so that each chunk's GEMMs stay large
      (docs/benchmarks.md).
    """
    if not heads_first:
        t = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
        return t(blockwise_attention(t(q), t(k), t(v), mask, scale, block_q, block_k, causal, heads_first=True,
                                     unroll=unroll))
    T, S = q.shape[2], k.shape[2]
    causal = causal and T == S
    n = causal_chunks(T, block_q) if causal else 1
    if n > 1:
        ends = [round(i * T / n) for i in range(n + 1)]
        return jnp.concatenate([blockwise_attention(q[:, :, a:b], k[:, :, :b], v[:, :, :b], mask[:, a:b, :b], scale,
                                                    block_q, block_k, heads_first=True, unroll=unroll)
                                for a, b in zip(ends, ends[1:])], axis=2)
    if causal and T > block_q:
        b = causal_block(T, block_q, block_k)
        qp, kp, vp = _pad(q, 2, b), _pad(k, 2, b), _pad(v, 2, b)
        mp = _pad(_pad(mask, 1, b), 2, b)
        return _attention(qp, kp, vp, mp, float(scale), b, b, True, unroll)[:, :, :T]
    bq, bk = min(block_q, T), min(block_k, S)
    qp, kp, vp = _pad(q, 2, bq), _pad(k, 2, bk), _pad(v, 2, bk)
    mp = _pad(_pad(mask, 1, bq), 2, bk)
    return _attention(qp, kp, vp, mp, float(scale), bq, bk, False, unroll)[:, :, :T]


def fused_attention(q, k, v, mask, scale: float, implementation: str | None = "cudnn") -> jnp.ndarray:
    """softmax(q k^T * scale, masked) v through `jax.nn.dot_product_attention`
    (`implementation='cudnn'`: cuDNN's flash attention on a GPU, bfloat16 or float16; 'xla'
    runs the same call anywhere). q: [B, T, H, K]; k: [B, S, H, K]; v: [B, S, H, V] with
    V <= K, zero-padded to K (cuDNN wants one head width); mask: bool [B, T, S].
    Returns [B, T, H, V] in q's dtype."""
    V, K = v.shape[-1], q.shape[-1]
    if V > K:
        raise ValueError(f"fused_attention: value head {V} wider than the key head {K}")
    vp = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, K - V))) if V < K else v
    o = jax.nn.dot_product_attention(q, k, vp, mask=mask[:, None], scale=float(scale), implementation=implementation)
    return o[..., :V]


def cudnn_or_blockwise(q, k, v, mask, scale: float, causal: bool = False) -> jnp.ndarray:
    """`fused_attention` on cuDNN; where cuDNN refuses the shapes or the machine (it raises
    one of these while tracing), `blockwise_attention` (with `causal`)."""
    try:
        return fused_attention(q, k, v, mask, scale, implementation="cudnn")
    except (NotImplementedError, RuntimeError, ValueError):
        return blockwise_attention(q, k, v, mask, scale, causal=causal)
