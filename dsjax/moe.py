"""DeepSeekMoE (DeepSeek-V2 §2.2, DeepSeek-V3 §2.1.2).

y = x + Σ shared_i(x) + Σ_{i in topk} g_i FFN_i(x), with fine-grained routed experts and
always-on shared experts (fused into one MLP of width n_shared * F).

Gate (`Gate`): affinities s = softmax(x W) (V2) or sigmoid(x W) (V3). Selection uses
s + b, where b is DeepSeek-V3's aux-loss-free `e_score_correction_bias` (collection
`moe_bias`, never trained by the optimizer); the weights use s itself (V3 eq. 15-16).
Group-limited routing keeps the `topk_group` best of `n_group` expert groups first
(group score = max for V2's `group_limited_greedy`, sum of top-2 for V3's `noaux_tc`).
Weights are renormalized when `norm_topk_prob` and scaled by `routed_scaling_factor`.

Dispatch, chosen by `moe_impl`:
- `dense`: every expert on every token, weighted by a sparse combine matrix (reference);
- `ragged`: dropless; token copies sorted by expert and run through grouped GEMMs
  (`jax.lax.ragged_dot`), then scattered back.
When the active mesh and logical-axis rules split `experts` over several devices, the
routed experts run expert-parallel under shard_map instead (`experts_expert_parallel`).

Each call also returns the tokens routed to each expert (for the bias update and
MaxVio) and V3's sequence-wise balance loss Σ_i f_i P_i (eq. 17-20, without alpha).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsjax.config import ModelConfig
from dsjax.fp8 import fp8_matmul, fp8_ragged_dot
from dsjax.layers import MLP, dtype_of, param


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


def experts_dense(x, weights, indices, w1, w3, w2, fp8: str | None = None):
    """Reference dispatch: all experts on all tokens, weighted by a sparse combine matrix.

    x: [N, D]; weights/indices: [N, k]; w1, w3: [E, D, F]; w2: [E, F, D] -> [N, D].
    The experts are laid side by side as one [D, E*F] matmul; the combine weights scale
    the hidden units, so the sum over experts happens inside the second matmul. With
    `fp8` (a ModelConfig.fp8_gemm mode), both matmuls run through the FP8 recipe; its 128x128 weight blocks and 1x128
    hidden tiles stay within one expert when moe_intermediate_size is a multiple of 128 (as
    in every DeepSeek release), and span neighbouring experts otherwise.
    """
    N, E = x.shape[0], w1.shape[0]
    D, F = w1.shape[1], w1.shape[2]
    combine = jnp.zeros((N, E), jnp.float32).at[jnp.arange(N)[:, None], indices].add(weights)
    side_by_side = lambda w: w.transpose(1, 0, 2).reshape(D, E * F)
    mm = functools.partial(fp8_matmul, gemm=fp8) if fp8 else jnp.matmul
    h = nn.silu(mm(x, side_by_side(w1))) * mm(x, side_by_side(w3))  # [N, E*F]
    h = (h.reshape(N, E, F) * combine[:, :, None].astype(h.dtype)).reshape(N, E * F)
    return mm(h, w2.reshape(E * F, D))


def _grouped_swiglu(xs, w1, w3, w2, group_sizes, fp8: str | None):
    """The experts' SwiGLU on rows sorted by expert: two grouped GEMMs in, one out. With
    `fp8` (a ModelConfig.fp8_gemm mode) all three run through the FP8 recipe
    (dsjax.fp8.fp8_ragged_dot), forward and backward."""
    mm = functools.partial(fp8_ragged_dot, gemm=fp8) if fp8 else jax.lax.ragged_dot
    h = nn.silu(mm(xs, w1, group_sizes)) * mm(xs, w3, group_sizes)
    return mm(h, w2, group_sizes)


def experts_ragged(x, weights, indices, w1, w3, w2, fp8: str | None = None):
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


def _local_experts(x, weights, indices, w1, w3, w2, first_expert, fp8: str | None = None):
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


def experts_expert_parallel(x, weights, indices, w1, w3, w2, expert_axis: str, token_axes, tensor_axis,
                            fp8: str | None = None):
    """Dropless expert parallelism under shard_map (needs a mesh set with jax.set_mesh).

    Each device holds E / ep routed experts. The tokens of the `expert_axis` group are
    all-gathered, each device runs the grouped GEMMs of its own experts on the copies
    routed to them, and a reduce-scatter returns every token's combined output to the
    device it came from. The expert hidden axis may be split over `tensor_axis` (partial
    sums are added with psum). Same shapes as `experts_dense`; x and the routing are
    sharded over `token_axes`, the expert weights over `expert_axis`.
    """
    from jax.sharding import PartitionSpec as P

    tokens_split = expert_axis in token_axes
    row = P(token_axes if token_axes else None, None)
    w_in, w_out = P(expert_axis, None, tensor_axis), P(expert_axis, tensor_axis, None)

    def local(x, weights, indices, w1, w3, w2):
        first = jax.lax.axis_index(expert_axis) * w1.shape[0]
        if tokens_split:
            gather = lambda a: jax.lax.all_gather(a, expert_axis, tiled=True)
            x, weights, indices = gather(x), gather(weights), gather(indices)
        out = _local_experts(x, weights, indices, w1, w3, w2, first, fp8)
        if tensor_axis:
            out = jax.lax.psum(out, tensor_axis)
        if tokens_split:
            return jax.lax.psum_scatter(out, expert_axis, scatter_dimension=0, tiled=True)
        return jax.lax.psum(out, expert_axis)

    return jax.shard_map(local, in_specs=(row, row, row, w_in, w_in, w_out), out_specs=row,
                         check_vma=False)(x, weights, indices, w1, w3, w2)


def expert_parallel_axes():
    """(expert axis, token axes, tensor axis) when the active mesh and logical-axis rules
    split the experts over more than one device, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    # One logical axis at a time: in one spec, Flax gives each mesh axis to the first
    # logical axis that names it, and the batch usually takes 'expert' too.
    flat = lambda a: () if a is None else ((a,) if isinstance(a, str) else tuple(a))
    batch, experts, hidden = (flat(nn.logical_to_mesh_axes((name,))[0]) for name in ("batch", "experts", "expert_mlp"))
    if len(experts) != 1 or mesh.shape[experts[0]] == 1:
        return None
    tensor = hidden[0] if len(hidden) == 1 and mesh.shape[hidden[0]] > 1 else None
    return experts[0], tuple(a for a in batch if mesh.shape[a] > 1), tensor


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
        with jax.named_scope("routed_experts"):
            ep = expert_parallel_axes()
            fp8 = cfg.fp8_gemm if cfg.precision == "fp8" else None
            if ep is not None:
                y = experts_expert_parallel(flat, weights, indices, w1, w3, w2, *ep, fp8=fp8)
            else:
                dispatch = experts_ragged if cfg.moe_impl == "ragged" else experts_dense
                y = dispatch(flat, weights, indices, w1, w3, w2, fp8)
            y = y.reshape(B, T, D)
        if cfg.n_shared_experts:
            with jax.named_scope("shared_experts"):
                y = y + MLP(cfg, cfg.shared_intermediate_size, name="shared_experts")(x)
        loads = expert_loads(cfg, indices)
        balance = sequence_balance_loss(cfg, indices, scores, B)
        return y.astype(x.dtype), loads, balance
