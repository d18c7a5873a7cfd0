"""DeepSeekMoE routing (DeepSeek-V2 §2.2, DeepSeek-V3 §2.1.2, equations 12-20).

Gate (`Gate`): affinities s = softmax(x W) (V2) or sigmoid(x W) (V3). Selection uses
s + b, where b is DeepSeek-V3's aux-loss-free `e_score_correction_bias` (collection
`moe_bias`, never trained by the optimizer); the weights use s itself (V3 eq. 15-16).
Group-limited routing keeps the `topk_group` best of `n_group` expert groups first
(group score = max for V2's `group_limited_greedy`, sum of top-2 for V3's `noaux_tc`).
Weights are renormalized when `norm_topk_prob` and scaled by `routed_scaling_factor`.
Also the tokens routed to each expert (for the bias update and MaxVio) and V3's
sequence-wise balance loss.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsjax.config import ModelConfig
from dsjax.layers import param


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
