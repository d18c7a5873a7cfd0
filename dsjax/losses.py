"""Token-level objectives shared by pretraining, SFT, GRPO and evaluation.

Next-token cross-entropy (optionally masked: SFT scores response tokens only), the MTP
cross-entropy of DeepSeek-V3 §2.2 (module k at position t predicts token t+2+k), and
per-token log-probabilities and entropies of a policy (GRPO).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def token_logprobs(logits: jnp.ndarray, targets: jnp.ndarray) -> jnp.ndarray:
    """log p(target) per position. logits: [B, T, V]; targets: int [B, T] -> float32 [B, T]."""
    return -optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def token_entropy(logits: jnp.ndarray) -> jnp.ndarray:
    """Entropy of softmax(logits) per position. logits: [B, T, V] -> float32 [B, T]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def masked_mean(values: jnp.ndarray, mask: jnp.ndarray | None) -> jnp.ndarray:
    """Mean of `values` where `mask` is true (all of them when mask is None)."""
    if mask is None:
        return jnp.mean(values)
    m = mask.astype(jnp.float32)
    return jnp.sum(values * m) / jnp.maximum(jnp.sum(m), 1.0)


def cross_entropy(logits: jnp.ndarray, targets: jnp.ndarray, mask: jnp.ndarray | None = None) -> jnp.ndarray:
    """Mean next-token cross-entropy in nats over the positions where `mask` is true.

    logits: [B, T, V]; targets: int [B, T]; mask: bool [B, T] or None.
    """
    return masked_mean(optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets), mask)


def mtp_mask(mask: jnp.ndarray | None, segment_ids: jnp.ndarray | None, depth: int, length: int):
    """Which positions t of MTP module `depth` (0-based) are scored: its target (token
    t+2+depth = targets[t+1+depth]) is scored by `mask` and lies in t's segment.
    Returns bool [B, length - 1 - depth] or None when neither is given."""
    if mask is None and segment_ids is None:
        return None
    k = depth + 1
    out = None if mask is None else mask[:, k:]
    if segment_ids is not None:
        same = segment_ids[:, :length - k] == segment_ids[:, k:]
        out = same if out is None else out & same
    return out


def mtp_cross_entropy(mtp_logits: jnp.ndarray, targets: jnp.ndarray, mask: jnp.ndarray | None = None,
                      segment_ids: jnp.ndarray | None = None) -> jnp.ndarray:
    """Mean over MTP depths k of the CE of module k at t against token t+2+k.

    mtp_logits: [K, B, T, V]; targets: [B, T] (targets[t] = token t+1); mask: bool [B, T]
    (which targets count); segment_ids: int [B, T] of the inputs (packed examples).
    """
    T = targets.shape[1]
    losses = [cross_entropy(mtp_logits[k, :, :T - 1 - k], targets[:, k + 1:], mtp_mask(mask, segment_ids, k, T))
              for k in range(mtp_logits.shape[0])]
    return jnp.mean(jnp.stack(losses))


def model_variables(params, moe_bias) -> dict:
    """{'params', 'moe_bias'} for model.apply, without an empty router bias."""
    return {"params": params, "moe_bias": moe_bias} if moe_bias else {"params": params}


def make_eval_step(model, rules=()):
    """eval_step(params, moe_bias, batch) -> (summed next-token CE, scored targets).

    `batch` holds `inputs` and `targets` [B, T] and optionally `mask`, `segment_ids` and
    `positions` (packed SFT windows). Summing lets batches of any fill average exactly.
    """
    import flax.linen as nn

    def eval_step(params, moe_bias, batch):
        with nn.logical_axis_rules(rules):
            out = model.apply(model_variables(params, moe_bias), batch["inputs"], batch.get("positions"),
                              batch.get("segment_ids"), mtp=False)
        nll = optax.softmax_cross_entropy_with_integer_labels(out.logits, batch["targets"])
        mask = batch.get("mask")
        m = jnp.ones_like(nll) if mask is None else mask.astype(jnp.float32)
        return jnp.sum(nll * m), jnp.sum(m)

    return eval_step
