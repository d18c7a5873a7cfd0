"""GRPO's objective (DeepSeek-R1 §2.2.1, DeepSeekMath §4.1) and the variants that followed.

For a group of G completions o_i of one prompt with rewards r_i:

- advantages: A_i = (r_i - mean(r)) / (std(r) + eps) with the group's std (GRPO,
  `scale_rewards="group"`), the whole batch's std (`"batch"`), or no scaling (Dr. GRPO,
  `"none"`); std is the population std (ddof 0);
- ratio: per token, rho_t = pi(o_t) / pi_old(o_t), or GSPO's sequence ratio
  s_i = exp(mean_t log rho_t) for every token of o_i (`importance="sequence"`);
- per-token loss: -min(rho A, clip(rho, 1 - epsilon, 1 + epsilon_high) A) + beta KL_t,
  with the k3 estimator KL_t = exp(ref - logp) - (ref - logp) - 1 >= 0 to the frozen
  reference (DAPO's clip-higher is epsilon_high > epsilon);
- aggregation: `seq-mean-token-mean` (mean over tokens of each completion, then over
  completions: GRPO), `token-mean` (all tokens of the batch weigh alike: DAPO) or `dr_grpo`
  (token sum / (completions x max_tokens), a constant: Dr. GRPO).
"""

from __future__ import annotations

import jax.numpy as jnp

SCALES = ("group", "batch", "none")
AGGREGATIONS = ("seq-mean-token-mean", "token-mean", "dr_grpo")
IMPORTANCE = ("token", "sequence")


def group_advantages(rewards: jnp.ndarray, scale: str = "group", eps: float = 1e-4) -> jnp.ndarray:
    """rewards: float [P, G] (G completions per prompt) -> advantages [P, G]."""
    centered = rewards - rewards.mean(axis=1, keepdims=True)
    if scale == "group":
        return centered / (rewards.std(axis=1, keepdims=True) + eps)
    if scale == "batch":
        return centered / (rewards.std() + eps)
    if scale == "none":
        return centered
    raise ValueError(f"scale_rewards={scale!r} is not one of {list(SCALES)}")


def aggregate(per_token: jnp.ndarray, mask: jnp.ndarray, how: str, max_tokens: int) -> jnp.ndarray:
    """per_token: [B, T]; mask: bool [B, T] -> scalar, aggregated as `how`. Positions
    outside the mask are selected away, not multiplied by 0 (0 x inf would be NaN)."""
    m = mask.astype(jnp.float32)
    kept = jnp.where(mask, per_token, 0.0)
    if how == "seq-mean-token-mean":
        per_seq = jnp.sum(kept, axis=1) / jnp.maximum(m.sum(axis=1), 1.0)
        return jnp.mean(per_seq)
    if how == "token-mean":
        return jnp.sum(kept) / jnp.maximum(m.sum(), 1.0)
    if how == "dr_grpo":
        return jnp.sum(kept) / (per_token.shape[0] * max_tokens)
    raise ValueError(f"loss_agg={how!r} is not one of {list(AGGREGATIONS)}")


def policy_loss(logp, old_logp, ref_logp, advantages, mask, *, epsilon: float = 0.2, epsilon_high: float = 0.2,
                beta: float = 0.0, importance: str = "token", loss_agg: str = "seq-mean-token-mean",
                max_tokens: int = 1):
    """The clipped GRPO objective.

    Args:
      logp: float32 [B, T], log pi(token) of the policy being trained (carries the gradient).
      old_logp: [B, T], the rollout policy's log-probs (the same values, no gradient, when
        the update is on-policy).
      ref_logp: [B, T] of the reference policy, or None when beta = 0.
      advantages: [B]; mask: bool [B, T], the completion tokens.
    Returns:
      (loss scalar, metrics dict: pg_loss, kl, clip_frac_low, clip_frac_high, ratio_mean).

    Positions outside `mask` (prompt, padding) may hold any log-probs, even huge or
    infinite ones: they are replaced by 0 before `exp` (not multiplied by 0 after it),
    so neither the loss nor its gradient sees exp(89) = inf or 0 x inf = NaN.
    """
    if importance not in IMPORTANCE:
        raise ValueError(f"importance={importance!r} is not one of {list(IMPORTANCE)}")
    m = mask.astype(jnp.float32)
    log_ratio = jnp.where(mask, logp - old_logp, 0.0)
    if importance == "sequence":
        seq = jnp.sum(log_ratio, axis=1) / jnp.maximum(m.sum(axis=1), 1.0)
        log_ratio = jnp.broadcast_to(seq[:, None], logp.shape)
    ratio = jnp.exp(log_ratio)
    adv = advantages[:, None].astype(jnp.float32)
    clipped = jnp.clip(ratio, 1.0 - epsilon, 1.0 + epsilon_high)
    pg = -jnp.minimum(ratio * adv, clipped * adv)
    per_token = pg
    kl = jnp.zeros_like(pg)
    if beta:
        delta = jnp.where(mask, ref_logp - logp, 0.0)
        kl = jnp.exp(delta) - delta - 1.0
        per_token = pg + beta * kl
    loss = aggregate(per_token, mask, loss_agg, max_tokens)
    tokens = jnp.maximum(m.sum(), 1.0)
    metrics = {
        "pg_loss": aggregate(pg, mask, loss_agg, max_tokens),
        "kl": jnp.sum(jnp.where(mask, kl, 0.0)) / tokens,
        "clip_frac_low": jnp.sum((ratio < 1.0 - epsilon) & (adv < 0) & mask) / tokens,
        "clip_frac_high": jnp.sum((ratio > 1.0 + epsilon_high) & (adv > 0) & mask) / tokens,
        "ratio_mean": jnp.sum(jnp.where(mask, ratio, 0.0)) / tokens,
    }
    return loss, metrics
