"""The supervised step (pretraining and SFT): loss, gradients, AdamW update and the
aux-loss-free bias update.

Objective (DeepSeek-V3 §2.2, §2.1.2): next-token cross-entropy + lambda * mean MTP
cross-entropy + alpha * Σ_layers sequence-wise balance loss. After the update, each
routed-expert bias moves by gamma * sign(mean load - load) with loads counted over the
global batch (the batch is one sharded array, so the counts are global). `moe_bias` has
no gradient and no optimizer state.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from dsjax.losses import apply_model, cross_entropy, mtp_cross_entropy
from dsjax.model import ModelOutput, Transformer, unbox
from sharding.rules import tree_shardings
from train.optim import applied_updates


@flax.struct.dataclass
class TrainState:
    """What a checkpoint holds: the step, parameters, optimizer state, the router bias
    (`moe_bias`, {} for dense models) and GRPO's frozen reference parameters ({} when the
    stage keeps none)."""

    step: jnp.ndarray
    params: Any
    opt_state: Any
    moe_bias: Any
    ref_params: Any = flax.struct.field(default_factory=dict)

    @classmethod
    def start(cls, variables: dict, tx: optax.GradientTransformation, reference: bool = False) -> "TrainState":
        """Step 0 from {'params', 'moe_bias'}: `tx`'s initial optimizer state, and with
        `reference` the parameters kept as GRPO's frozen reference too."""
        params = variables["params"]
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                   moe_bias=variables.get("moe_bias", {}), ref_params=params if reference else {})


def max_violation(loads: jnp.ndarray) -> jnp.ndarray:
    """DeepSeek-V3's MaxVio per layer, max load / mean load - 1, averaged. loads: [L, E]."""
    return jnp.mean(loads.max(-1) / jnp.maximum(loads.mean(-1), 1e-9) - 1.0)


def _bias_step(bias: jnp.ndarray, loads: jnp.ndarray, gamma) -> jnp.ndarray:
    """b_i += gamma * sign(mean load - load_i), per layer. bias, loads: [..., E]."""
    return bias + gamma * jnp.sign(loads.mean(-1, keepdims=True) - loads)


def update_moe_bias(moe_bias: dict, out: ModelOutput, gamma) -> dict:
    """The aux-loss-free update of every `moe_bias` leaf from this step's expert loads."""
    new = dict(moe_bias)
    if "moe_layers" in new:
        b = new["moe_layers"]["ffn"]["gate"]["bias"]
        new["moe_layers"] = {"ffn": {"gate": {"bias": _bias_step(b, out.expert_loads, gamma)}}}
    for k in range(0 if out.mtp_expert_loads is None else out.mtp_expert_loads.shape[0]):
        key = f"mtp_{k}"
        if key in new:
            b = new[key]["block"]["ffn"]["gate"]["bias"]
            new[key] = {"block": {"ffn": {"gate": {"bias": _bias_step(b, out.mtp_expert_loads[k], gamma)}}}}
    return new


def schedules(tcfg, updates_per_step: int = 1):
    """(mtp lambda, bias gamma) as functions of the update count, for use inside jit. A
    switch at 1.0 (never) leaves train.steps out of the program, so runs that differ only
    in their length compile the same step (and share the compilation cache).

    `updates_per_step` optimizer updates make one training step (GRPO: mu x minibatches);
    the switches fall on training steps, so update u counts as step u // updates_per_step.
    """
    if updates_per_step < 1:
        raise ValueError(f"updates_per_step={updates_per_step} must be at least 1")
    switch = int(tcfg.mtp_lambda_switch * tcfg.steps) if tcfg.mtp_lambda_switch < 1 else None
    stop = int(tcfg.bias_update_stop * tcfg.steps) if tcfg.bias_update_stop < 1 else None

    def mtp_lambda(update):
        return jnp.asarray(tcfg.mtp_lambda) if switch is None else jnp.where(
            update // updates_per_step < switch, tcfg.mtp_lambda, tcfg.mtp_lambda_final)

    def gamma(update):
        return jnp.asarray(tcfg.bias_update_speed) if stop is None else jnp.where(
            update // updates_per_step < stop, tcfg.bias_update_speed, 0.0)

    return mtp_lambda, gamma


def guarded_update(state: "TrainState", tx: optax.GradientTransformation, loss, grads, metrics: dict,
                   moe_bias: Callable | None = None) -> tuple["TrainState", dict]:
    """`state` after one optimizer step on `grads` (and `moe_bias(state.moe_bias)` for the
    router bias, when given) if the loss and every gradient are finite; else `state` with
    only the step advanced (a NaN or Inf never reaches the parameters, the optimizer state
    or the router bias). Metrics get `skipped` (1.0 for a skipped step).

    The test is the gradients' global norm (one reduction, shared with the metrics and the
    clipping: any NaN or Inf makes it non-finite). The choice is a `lax.cond` around the
    optimizer: a per-element select between the old and the new parameters and moments
    would read and write every one of them again (docs/benchmarks.md)."""
    finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree_utils.tree_norm(grads))

    def advance(params, opt_state, bias):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, bias if moe_bias is None else moe_bias(bias)

    params, opt_state, bias = jax.lax.cond(finite, advance, lambda *held: held,
                                           state.params, state.opt_state, state.moe_bias)
    state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, moe_bias=bias)
    return state, {**metrics, "skipped": 1.0 - finite.astype(jnp.float32)}


def supervised_loss(model: Transformer, tcfg, rules=()) -> Callable:
    """Returns loss_fn(params, moe_bias, batch, step) -> (loss, (ModelOutput, parts)):
    DeepSeek-V3's objective on one batch, with `parts` the terms {'ce', 'mtp_loss',
    'balance_loss'} for the metrics.

    `batch`: `inputs`, `targets` int32 [B, T]; for packed SFT windows also `positions`,
    `segment_ids` [B, T] and `mask` bool [B, T] (the targets that are scored).
    """
    mtp_lambda, _ = schedules(tcfg)

    def loss_fn(params, moe_bias, batch, step):
        out = apply_model(model, params, moe_bias, batch["inputs"], batch.get("positions"),
                          batch.get("segment_ids"), rules=rules)
        mask, segments = batch.get("mask"), batch.get("segment_ids")
        ce = cross_entropy(out.logits, batch["targets"], mask)
        mtp = 0.0
        if out.mtp_logits is not None:
            mtp = mtp_cross_entropy(out.mtp_logits, batch["targets"], mask, segments)
        balance = 0.0
        if out.balance_loss is not None:
            balance = balance + out.balance_loss.sum()
        if out.mtp_balance_loss is not None:
            balance = balance + out.mtp_balance_loss.sum()
        loss = ce + mtp_lambda(step) * mtp + tcfg.balance_alpha * balance
        parts = {"ce": ce, "mtp_loss": jnp.asarray(mtp, jnp.float32), "balance_loss": jnp.asarray(balance, jnp.float32)}
        return loss, (out, parts)

    return loss_fn


def supervised_update(state: TrainState, tx: optax.GradientTransformation, tcfg, lr_schedule: Callable,
                      loss, out: ModelOutput, grads, metrics: dict) -> tuple[TrainState, dict]:
    """The optimizer step of a supervised loss (`guarded_update`) with the aux-loss-free
    router bias update from `out`'s expert loads; metrics add `loss`, `grad_norm`, `lr`
    and (for MoE models) `max_vio`."""
    _, gamma = schedules(tcfg)
    metrics = {"loss": loss, **metrics, "grad_norm": optax.tree_utils.tree_norm(grads),
               "lr": lr_schedule(applied_updates(state.opt_state))}
    if out.expert_loads is not None:
        metrics["max_vio"] = max_violation(out.expert_loads)
    bias = (lambda b: update_moe_bias(b, out, gamma(state.step))) if state.moe_bias else None
    return guarded_update(state, tx, loss, grads, metrics, bias)


def make_train_step(model: Transformer, tx: optax.GradientTransformation, tcfg,
                    lr_schedule: Callable, rules=()) -> Callable:
    """Returns train_step(state, batch) -> (state, metrics), to be jitted by the caller
    (`batch` as `supervised_loss` takes it)."""
    loss_fn = supervised_loss(model, tcfg, rules)

    def train_step(state: TrainState, batch):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (out, parts)), grads = grad_fn(state.params, state.moe_bias, batch, state.step)
        return supervised_update(state, tx, tcfg, lr_schedule, loss, out, grads, parts)

    return train_step


def flops_per_token(cfg, seq_len: int) -> float:
    """Training FLOPs per token: 6 x activated parameters (MTP included) + causal attention
    (3 passes x 2 FLOPs x H x (K + R + V) x T/2 per layer)."""
    from dsjax.config import param_counts

    counts = param_counts(cfg)
    layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    attention = 3 * layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len
    return 6 * (counts["activated"] + counts["mtp_activated"]) + attention


def state_shardings(boxed, tx, mesh, preset, reference: bool = False):
    """Shardings of a TrainState from the model's abstract boxed variables (their logical
    annotations) and the rules `preset`; optimizer moments and the reference parameters
    (with `reference`) follow their parameter."""
    var_shardings = tree_shardings(boxed, mesh, preset)
    abstract = unbox(boxed)
    param_sh = var_shardings["params"]
    opt_abstract = jax.eval_shape(tx.init, abstract["params"])
    replicated = NamedSharding(mesh, P())
    opt_sh = optax.tree_map_params(tx, lambda _, sh: sh, opt_abstract, param_sh,
                                   transform_non_params=lambda _: replicated)
    return TrainState(step=replicated, params=param_sh, opt_state=opt_sh,
                      moe_bias=var_shardings.get("moe_bias", {}), ref_params=param_sh if reference else {})
