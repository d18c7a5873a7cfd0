"""The routed experts' local dispatches (DeepSeekMoE's Σ_{i in topk} g_i FFN_i(x)).

- `experts_dense`: every expert on every token, weighted by a sparse combine matrix (the
  reference);
- `experts_ragged`: dropless; token copies sorted by expert and run through grouped GEMMs
  (`jax.lax.ragged_dot`, `grouped_swiglu`), then scattered back;
- `experts_local`: a dispatch on each device's own tokens under shard_map (data
  parallelism: each device sorts only the copies it holds).

Every dispatch maps x [N, D], routing weights and indices [N, k] and the stacked expert
weights w1, w3 [E, D, F], w2 [E, F, D] to [N, D]. They are registered in `dsjax.impl`
under kind 'moe' by name (`moe_impl`); the CPU wing adds its own there.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsjax import impl
from dsjax.fp8 import Recipe, fp8_matmul, fp8_ragged_dot

# Up to this many token copies per routed expert on average, a call's experts are a few
# GEMM rows each: reading every expert's weights costs about what the rows cost, so the
# dense dispatch runs one batched GEMM per weight instead of laying the experts side by side.
DENSE_COPIES_PER_EXPERT = 16


def swiglu(x, w1, w3, w2):
    """One SwiGLU MLP: x [..., D], w1 and w3 [D, F], w2 [F, D] -> [..., D]."""
    return (nn.silu(x @ w1) * (x @ w3)) @ w2


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

def grouped_swiglu(xs, w1, w3, w2, group_sizes, fp8: Recipe | None):
    """The experts' SwiGLU on rows xs [M, D] sorted by expert, group_sizes [E] rows each:
    two grouped GEMMs in, one out -> [M, D]. With
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
    ys = grouped_swiglu(xs, w1, w3, w2, group_sizes, fp8)  # [N*k, D]
    ys = ys * weights.reshape(-1)[order][:, None].astype(ys.dtype)
    return jnp.zeros_like(x).at[token].add(ys)

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



impl.register("moe", "dense", experts_dense)
impl.register("moe", "ragged", experts_ragged)
