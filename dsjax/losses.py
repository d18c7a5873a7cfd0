"""Token-level objectives shared by pretraining, SFT, GRPO and evaluation.

Next-token cross-entropy (optionally masked: SFT scores response tokens only), the MTP
cross-entropy of DeepSeek-V3 §2.2 (module k at position t predicts token t+2+k), and
per-token log-probabilities and entropies of a policy (GRPO).
"""

from __future__ import annotations

import flax.linen as nn
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
    """Mean of `values` where `mask` is true (all of them when mask is None); what the
    other positions hold (a NaN or an infinity included) does not reach the mean."""
    if mask is None:
        return jnp.mean(values)
    total = jnp.sum(jnp.where(mask, values, 0))
    return total / jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)


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


def distillation_kl(teacher_logits: jnp.ndarray, student_logits: jnp.ndarray, temperature: float = 1.0,
                    chunks: int = 4) -> jnp.ndarray:
    """KL(teacher || student) per position between the softmaxes of logits / temperature,
    summed over the vocabulary a chunk at a time (each chunk's float32 log-probabilities
    are the only [B, T, V / chunks] temporaries; the log-partition functions come first).

    teacher_logits, student_logits: [B, T, V] (any float dtype) -> float32 [B, T].
    """
    V = student_logits.shape[-1]
    lse_t = jax.nn.logsumexp(teacher_logits.astype(jnp.float32) / temperature, axis=-1, keepdims=True)
    lse_s = jax.nn.logsumexp(student_logits.astype(jnp.float32) / temperature, axis=-1, keepdims=True)
    size = -(-V // max(chunks, 1))
    total = jnp.zeros(student_logits.shape[:-1], jnp.float32)
    for start in range(0, V, size):
        t = teacher_logits[..., start:start + size].astype(jnp.float32) / temperature - lse_t
        s = student_logits[..., start:start + size].astype(jnp.float32) / temperature - lse_s
        total = total + jnp.sum(jnp.exp(t) * (t - s), axis=-1)
    return total


def model_variables(params, moe_bias) -> dict:
    """{'params', 'moe_bias'} for model.apply, without an empty router bias."""
    return {"params": params, "moe_bias": moe_bias} if moe_bias else {"params": params}


def apply_model(model, params, moe_bias, *args, rules=(), **kwargs):
    """`model.apply` on {'params', 'moe_bias'} under the logical-axis rules `rules` (the
    activation constraints of sharding.rules.activation_rules; () for none).

    Args:
      model: a flax.linen Module (a Transformer, a RewardModel, ...).
      params / moe_bias: its parameters and router bias ({} for a dense model).
      *args / **kwargs: the module's call arguments (tokens [B, T], ...).
    Returns:
      what the module returns (a ModelOutput for a Transformer).
    """
    with nn.logical_axis_rules(rules):
        return model.apply(model_variables(params, moe_bias), *args, **kwargs)


def make_eval_step(model, rules=()):
    """eval_step(params, moe_bias, batch) -> (summed next-token CE, scored targets).

    `batch` holds `inputs` and `targets` [B, T] and optionally `mask`, `segment_ids` and
    `positions` (packed SFT windows). Summing lets batches of any fill average exactly.
    """
    def eval_step(params, moe_bias, batch):
        out = apply_model(model, params, moe_bias, batch["inputs"], batch.get("positions"),
                          batch.get("segment_ids"), mtp=False, rules=rules)
        nll = optax.softmax_cross_entropy_with_integer_labels(out.logits, batch["targets"])
        mask = batch.get("mask")
        m = jnp.ones_like(nll) if mask is None else mask.astype(jnp.float32)
        return jnp.sum(nll * m), jnp.sum(m)

    return eval_step
