"""Dropless expert parallelism: the routed experts split over a mesh axis.

Each token copy travels only to the device holding its expert and back
(`experts_expert_parallel`, under shard_map): the copy counts per device pair are
exchanged first, then the rows move in rounds of bounded size, the experts run their
grouped GEMMs (`dsjax.moe.dispatch.grouped_swiglu`), and the outputs travel back. Also the
mesh axes the active logical-axis rules give the experts and the tokens
(`expert_parallel_axes`, `data_parallel_axes`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsjax import impl
from dsjax.fp8 import Recipe
from dsjax.moe.dispatch import grouped_swiglu


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
    ys = grouped_swiglu(xs, w1, w3, w2, group_sizes, fp8)  # rows past sum(group_sizes) are zero
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
    ys = grouped_swiglu(rows[order], w1, w3, w2, sizes, ex.fp8)
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
    which has no ragged collective: the platform the program is compiled for,
    `compiled_for`; `ragged` overrides), the experts run their grouped
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
    ragged = compiled_for() != "cpu" if ragged is None else ragged

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

def compiled_for() -> str:
    """'cpu', 'gpu' or 'tpu': the platform of the devices the traced program is compiled
    for. Under jit the active abstract mesh carries its devices' platform
    (`AbstractMesh.abstract_device`), also for an abstract TPU topology lowered from a CPU
    host; without one, `impl.platform_of()` (the concrete mesh, else the default device)."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    if device is None:
        return impl.platform_of()
    platform = str(device.platform).lower()
    return "gpu" if platform in ("cuda", "rocm") else platform


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
