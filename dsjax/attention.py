"""Blockwise attention in plain JAX: the online softmax of FlashAttention (Dao et al.,
2022), forward and backward, so the float32 scores [B, H, T, S] are never all live at
once. Runs on every backend (CPU included); it is MLA's `model.attn_kernel=blockwise`.

The forward pass walks key blocks with a running max and sum per query row and keeps
only the output and its log-sum-exp; the backward pass recomputes each block's
probabilities from them, once per block pair (a custom VJP), so memory grows with
T x (block + head dims), not T x S. Masked scores are set to -1e30 as the dense softmax
does, so the two agree on every row that attends to at least one key (causal masks have
no other kind).

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


def _forward(q, k, v, mask, scale, bq, bk):
    """Padded, head-major inputs (q [B, H, T, K], k [B, H or 1, S, K], v [B, H or 1, S, V])
    -> (o [B, H, T, V] float32, lse [B, H, T])."""
    kbs, vbs = _blocks(k, 2, bk), _blocks(v, 2, bk)

    def one_query_block(args):
        qb, mq = args  # [B, H, bq, K], [B, bq, S]
        mqb = _blocks(mq, 2, bk)  # [nk, B, bq, bk]
        B, H, n, _ = qb.shape
        init = (jnp.full((B, H, n), -jnp.inf, jnp.float32), jnp.zeros((B, H, n), jnp.float32),
                jnp.zeros((B, H, n, v.shape[-1]), jnp.float32))

        def step(carry, blk):
            m, l, acc = carry
            kb, vb, mb = blk
            s = _scores(qb, kb, mb, scale)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            fix = jnp.exp(m - m_new)
            return (m_new, l * fix + p.sum(-1), acc * fix[..., None] + _mix(p.astype(vb.dtype), vb)), None

        (m, l, acc), _ = jax.lax.scan(step, init, (kbs, vbs, mqb))
        return acc / l[..., None], m + jnp.log(l)

    o, lse = jax.lax.map(one_query_block, (_blocks(q, 2, bq), _blocks(mask, 1, bq)))
    return _unblock(o, 2), _unblock(lse, 2)  # [B, H, T, V], [B, H, T]


def _backward(q, k, v, mask, o, lse, do, scale, bq, bk):
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
            p = jnp.exp(_scores(qb, kb, mb, scale) - lse_b[..., None])  # [B, H, bq, bk]
            ds = p * (_dots(dob, vb) - delta_b[..., None])
            dv = dv + _key_grad(p, dob, vb)
            dk = dk + _key_grad(ds, qb, kb) * scale
            return (dk, dv), _mix(ds, kb) * scale

        init = (jnp.zeros(kb.shape, jnp.float32), jnp.zeros(vb.shape, jnp.float32))
        (dk, dv), dq_j = jax.lax.scan(step, init, (qbs, dobs, mqs, lses, deltas))
        return dq + dq_j, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros(qbs.shape, jnp.float32),
                                (_blocks(k, 2, bk), _blocks(v, 2, bk), jnp.arange(k.shape[2] // bk)))
    return _unblock(dq, 2), _unblock(dk, 2), _unblock(dv, 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attention(q, k, v, mask, scale, bq, bk):
    return _forward(q, k, v, mask, scale, bq, bk)[0]


def _attention_fwd(q, k, v, mask, scale, bq, bk):
    o, lse = _forward(q, k, v, mask, scale, bq, bk)
    return o, (q, k, v, mask, o, lse)


def _attention_bwd(scale, bq, bk, res, do):
    q, k, v, mask, o, lse = res
    dq, dk, dv = _backward(q, k, v, mask, o, lse, do, scale, bq, bk)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)


# Fewest rows per query chunk of a short causal call (see `blockwise_attention`), and most chunks.
CAUSAL_CHUNK = 128
CAUSAL_CHUNKS = 4


def causal_chunks(T: int, block_q: int = 512) -> int:
    """Query chunks of a causal call with T queries and keys (1: not chunked); see
    `blockwise_attention`."""
    return min(CAUSAL_CHUNKS, T // CAUSAL_CHUNK) if 2 * CAUSAL_CHUNK <= T <= block_q else 1


def blockwise_attention(q, k, v, mask, scale: float, block_q: int = 512, block_k: int = 512,
                        causal: bool = False, heads_first: bool = False) -> jnp.ndarray:
    """softmax(q k^T * scale, masked) v without materializing the scores.

    q: [B, T, H, K]; k: [B, S, H, K]; v: [B, S, H, V] (or one head [B, S, 1, *] shared by
    all H); mask: bool [B, T, S] (True attends). Returns float32 [B, T, H, V]. T and S are
    padded to the block sizes internally. `heads_first`: q, k, v and the result are
    [B, H, T, *] instead, the layout the kernel works in (the others are transposed to it
    once, on the way in and out, not block by block).

    `causal`: the caller promises that the mask never lets query t see a key s > t (queries
    and keys at the same positions, T == S; causal masks with or without segments). A call
    that fits one query block then runs as up to CAUSAL_CHUNKS chunks of queries, each
    against the keys up to its own end, and skips the masked upper triangle: 3/4 of the
    scores at 2 chunks, 5/8 at 4. Chunks hold at least CAUSAL_CHUNK queries, so that each
    chunk's GEMMs stay large (docs/benchmarks.md).
    """
    if not heads_first:
        t = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
        return t(blockwise_attention(t(q), t(k), t(v), mask, scale, block_q, block_k, causal, heads_first=True))
    T, S = q.shape[2], k.shape[2]
    n = causal_chunks(T, block_q) if causal and T == S else 1
    if n > 1:
        ends = [round(i * T / n) for i in range(n + 1)]
        return jnp.concatenate([blockwise_attention(q[:, :, a:b], k[:, :, :b], v[:, :, :b], mask[:, a:b, :b], scale,
                                                    block_q, block_k, heads_first=True)
                                for a, b in zip(ends, ends[1:])], axis=2)
    bq, bk = min(block_q, T), min(block_k, S)
    qp, kp, vp = _pad(q, 2, bq), _pad(k, 2, bk), _pad(v, 2, bk)
    mp = _pad(_pad(mask, 1, bq), 2, bk)
    return _attention(qp, kp, vp, mp, float(scale), bq, bk)[:, :, :T]


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


def cudnn_or_blockwise(q, k, v, mask, scale: float, fallback: bool, causal: bool = False) -> jnp.ndarray:
    """`fused_attention` on cuDNN; where cuDNN refuses the shapes or the machine (it says so
    while tracing), `blockwise_attention` (with `causal`) when `fallback`, else its error."""
    try:
        return fused_attention(q, k, v, mask, scale, implementation="cudnn")
    except (NotImplementedError, RuntimeError, ValueError):
        if not fallback:
            raise
        return blockwise_attention(q, k, v, mask, scale, causal=causal)
