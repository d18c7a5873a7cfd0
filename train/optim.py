"""Optimizer: AdamW (beta1 0.9, beta2 0.95, weight decay off norms and biases), global-norm
clipping, and learning-rate schedules (warmup then cosine, constant or step decay)."""

from __future__ import annotations

import flax.linen as nn
import jax
import optax


def lr_schedule(tcfg) -> optax.Schedule:
    """Linear warmup to `lr`, then `schedule`: cosine to lr * min_lr_ratio, constant, or
    step decay (times `step_decay_factor` every `step_decay_every` steps)."""
    warmup = optax.linear_schedule(0.0, tcfg.lr, max(tcfg.warmup_steps, 1))
    rest = max(tcfg.steps - tcfg.warmup_steps, 1)
    if tcfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(tcfg.lr, rest, alpha=tcfg.min_lr_ratio)
    elif tcfg.schedule == "constant":
        after = optax.constant_schedule(tcfg.lr)
    else:
        after = optax.exponential_decay(tcfg.lr, tcfg.step_decay_every, tcfg.step_decay_factor, staircase=True)
    return optax.join_schedules([warmup, after], [tcfg.warmup_steps])


def applied_updates(opt_state) -> jax.Array:
    """How many updates the optimizer has applied (its schedule's count): a skipped
    non-finite step advances the training step but not this, so the learning rate the
    next update uses is `schedule(applied_updates(opt_state))`."""
    counts = [v for _, v in optax.tree_utils.tree_get_all_with_path(opt_state, "count")]
    if not counts:
        raise ValueError("the optimizer state holds no update count")
    return counts[0]


def decay_mask(boxed_params):
    """True for matrices (decayed), False for norms and vectors.

    Takes the boxed (logically annotated) params so that a norm stacked over layers,
    [L, D], still counts as a vector.
    """
    def one(p):
        names = getattr(p, "names", None)
        ndim = len([n for n in names if n != "layers"]) if names is not None else p.ndim
        return ndim >= 2

    return jax.tree.map(one, boxed_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def make_optimizer(tcfg, boxed_params, updates_per_step: int = 1) -> tuple[optax.GradientTransformation,
                                                                            optax.Schedule]:
    """AdamW with clipping; float32 moments whatever the parameter dtype.

    Args:
      tcfg: the TrainConfig (lr, schedule, steps, AdamW and clipping settings).
      boxed_params: the model's boxed abstract parameters (for the weight-decay mask).
      updates_per_step: optimizer updates per training step (GRPO: mu x minibatches);
        the schedule is counted in training steps, so update u uses the schedule at
        step u // updates_per_step.

    Returns:
      (the optimizer, the schedule as a function of the update count).
    """
    if updates_per_step < 1:
        raise ValueError(f"updates_per_step={updates_per_step} must be at least 1")
    base = lr_schedule(tcfg)
    schedule = base if updates_per_step == 1 else (lambda count: base(count // updates_per_step))
    tx = optax.chain(
        optax.clip_by_global_norm(tcfg.grad_clip),
        optax.adamw(schedule, b1=tcfg.b1, b2=tcfg.b2, eps=tcfg.eps, weight_decay=tcfg.weight_decay,
                    mask=decay_mask(boxed_params), mu_dtype="float32"),
    )
    return tx, schedule
