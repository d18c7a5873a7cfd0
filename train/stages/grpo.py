"""`python -m train grpo`: GRPO (DeepSeek-R1 §2.2) as a learner.

One step: draw `prompts_per_step` prompts from the sources (train.rl.sources), sample
`group_size` completions of each with the step's own parameters (train.rl.rollout), score
them with the run's rewards (train.rl.rewards), turn the rewards into group-normalized
advantages, then run `mu` passes of `minibatches` updates of the clipped objective
(train.rl.loss), each one `jax.jit` with explicit shardings (the same model and optimizer
code as pretraining). The learner recomputes the rollout policy's log-probabilities and
logs how far they are from the sampler's (`rollout_logprob_diff`); train.rl.metrics adds
the rollout figures and the reward-hacking guard.

On many hosts (`--coordinator ...`, one process each) every process draws the same
prompts, decodes the rows its devices hold, scores the rows it answers for, and shares the
per-row scores, so advantages and metrics come from the global groups and are the same on
every process; each update's rows are the ones each device decoded (`minibatch_rows`), so
no completion crosses between hosts unless dynamic sampling moves a kept group.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Sharding

from dsjax.config import ConfigError
from dsjax.losses import apply_model, masked_mean, model_variables, token_entropy, token_logprobs
from dsjax.model import Transformer
from dsjax.splash_attention import SPLASH_BLOCKS
from eval.completions import prompt_width
from eval.reasoning import evaluate
from train.config import model_context
from train.loop import Run, Stage, StageSpec
from train.optim import applied_updates
from train.report import plot_grpo
from train.rl.config import GRPOConfig
from train.rl.loss import group_advantages, policy_loss
from train.rl.metrics import HackGuard, rollout_metrics
from train.rl.rewards import RewardSet
from train.rl.rollout import GroupSampler, Rollout
from train.rl.sources import PromptSampler
from train.steps import guarded_update, max_violation, schedules, update_moe_bias


def make_grpo_step(model, tx, g: GRPOConfig, tcfg, lr_schedule, max_tokens: int, rules=(),
                   use_old: bool = False, update_bias: bool = False):
    """Returns grpo_step(state, batch) -> (state, metrics), to be jitted by the caller.

    `batch`: `inputs`, `targets` int32 [B, T]; `mask` bool [B, T] (completion tokens
    among the targets); `advantages` float32 [B]; `rollout_logp` float32 [B, T] (the
    sampler's log-probs at temperature 1); `ref_logp` [B, T] when beta > 0; `old_logp`
    [B, T] with `use_old` (several updates per rollout), otherwise the policy's own
    log-probs without gradient (the on-policy ratio is 1 with the right gradient).
    """
    _, gamma = schedules(tcfg, g.mu * g.minibatches)

    def loss_fn(params, moe_bias, batch):
        out = apply_model(model, params, moe_bias, batch["inputs"], mtp=False, rules=rules)
        logits = out.logits / g.temperature
        logp = token_logprobs(logits, batch["targets"])
        old = batch["old_logp"] if use_old else jax.lax.stop_gradient(logp)
        loss, metrics = policy_loss(logp, old, batch.get("ref_logp"), batch["advantages"], batch["mask"],
                                    epsilon=g.epsilon, epsilon_high=g.epsilon_high, beta=g.beta,
                                    importance=g.importance, loss_agg=g.loss_agg, max_tokens=max_tokens)
        logp1 = logp if g.temperature == 1 else token_logprobs(out.logits, batch["targets"])
        sg = jax.lax.stop_gradient
        metrics["clip_frac"] = metrics["clip_frac_low"] + metrics["clip_frac_high"]
        metrics["entropy"] = masked_mean(token_entropy(sg(logits)), batch["mask"])
        metrics["rollout_logprob_diff"] = masked_mean(jnp.abs(sg(logp1) - batch["rollout_logp"]), batch["mask"])
        return loss, (out, metrics)

    def grpo_step(state, batch):
        (loss, (out, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, state.moe_bias,
                                                                                  batch)
        metrics.update(loss=loss, grad_norm=optax.tree_utils.tree_norm(grads),
                       lr=lr_schedule(applied_updates(state.opt_state)))
        if out.expert_loads is not None:
            metrics["max_vio"] = max_violation(out.expert_loads)
        bias = (lambda b: update_moe_bias(b, out, gamma(state.step))) if update_bias and state.moe_bias else None
        return guarded_update(state, tx, loss, grads, metrics, bias)

    return grpo_step


def make_score(model, temperature: float, rules=()):
    """score(params, moe_bias, batch) -> log-probs [B, T] of the targets at `temperature`
    (the reference's, or the rollout policy's before several updates)."""

    def score(params, moe_bias, batch):
        out = apply_model(model, params, moe_bias, batch["inputs"], mtp=False, rules=rules)
        return token_logprobs(out.logits / temperature, batch["targets"])

    return score


def minibatch_rows(rollout: Sharding, batch: Sharding, rows: int, minibatches: int) -> list[np.ndarray]:
    """Which rollout rows each update trains on: update i takes the i-th slice of the rows
    each device holds (as it decoded them), so the rows stay where they are.

    Args:
      rollout: how the rollout's `rows` are split over the devices.
      batch: how an update's rows / minibatches rows are split (the training batch's).
      rows / minibatches: the rollout's rows and the updates they are split into.
    Returns:
      `minibatches` int arrays [rows / minibatches]: the rollout row at each position.
    Raises:
      ValueError when a device's share of an update is not a slice of its rollout rows.
    """
    size = rows // minibatches
    held = rollout.devices_indices_map((rows,))
    out = [np.full(size, -1) for _ in range(minibatches)]
    for device, index in batch.devices_indices_map((size,)).items():
        mine, at = np.arange(rows)[held[device][0]], np.arange(size)[index[0]]
        if len(mine) != minibatches * len(at):
            raise ValueError(f"a device holds {len(mine)} rollout rows but {len(at)} rows of each of "
                             f"{minibatches} updates")
        for i in range(minibatches):
            out[i][at] = mine[i * len(at):(i + 1) * len(at)]
    return out


class GRPOStage(Stage):
    """R1-style RL on prompt sources with rule-based rewards and reward models (R1-Zero:
    one task source scored by rules)."""

    name = "grpo"
    eval_at_start = True

    @classmethod
    def needs_reference(cls, cfg) -> bool:
        return cfg.grpo.beta > 0

    @classmethod
    def schedules(cls, cfg) -> tuple[str, ...]:
        """The learning rate, and the router-bias speed where RL updates the bias (the
        GRPO step trains no MTP loss)."""
        return ("lr", "bias") if cfg.grpo.moe_bias == "update" else ("lr",)

    @classmethod
    def updates_per_step(cls, cfg) -> int:
        return cfg.grpo.mu * cfg.grpo.minibatches

    def __init__(self, run: Run):
        super().__init__(run)
        cfg, g = run.cfg, run.cfg.grpo
        shards = run.batch_devices
        update_rows = g.prompts_per_step * g.group_size // g.minibatches
        if update_rows % shards:
            raise ConfigError(f"an update's {update_rows} completions (grpo.prompts_per_step x grpo.group_size / "
                              f"grpo.minibatches) do not divide over the {shards} devices of the mesh's batch axes "
                              f"(data x fsdp x expert)")
        self.stop = g.stop_token if g.stop_token is not None else run.tokenizer.eos_id
        if self.stop is None:
            raise ConfigError("grpo needs a stop token: the tokenizer has no end-of-sequence token; "
                              "set grpo.stop_token")
        if not 0 <= self.stop < cfg.model.vocab_size:
            raise ConfigError(f"grpo.stop_token={self.stop} is outside the vocabulary of {cfg.model.vocab_size}")
        if g.speculative and cfg.model.num_nextn_predict_layers < 1:
            raise ConfigError("grpo.speculative needs an MTP module (model.num_nextn_predict_layers >= 1)")
        self.sources = g.resolved_sources()
        self.labels = [src.label for src in self.sources]
        self.rewards = RewardSet.load(g, self.sources)
        self.prompts = PromptSampler(self.sources, g, cfg.train.seed,
                                     join_steps=[g.rm_from_step if rm else 0 for rm in self.rewards.uses_rm])
        self.test = self.prompts.test
        self.width = prompt_width(run.tokenizer, [p.prompt for pool in self.prompts.pools for p in pool] +
                                  [p.prompt for p in self.test])
        context, why = model_context(cfg.model)
        if self.width + g.max_new_tokens > context:
            raise ConfigError(f"prompts of {self.width} tokens + grpo.max_new_tokens={g.max_new_tokens} exceed "
                              f"the model's context of {context} tokens ({why})")
        self.seq = self.width + g.max_new_tokens  # prompt + completion, left-aligned
        if run.model.cfg.attn_kernel == "splash":
            # A TPU's attention kernel takes lengths that are a multiple of its block (else
            # the blockwise form runs): the rows are padded to one, masked like a short completion.
            block = SPLASH_BLOCKS[-1]
            self.seq = min(1 + -(-(self.seq - 1) // block) * block, context + 1)
        self.rows = g.prompts_per_step * g.group_size
        self.tokens_per_step = self.rows * (self.seq - 1)
        self.generator = Transformer(cfg.model.replace(attn_impl=g.rollout_attn_impl))
        self.sampler = GroupSampler(self.generator, run.tokenizer, self.width, self.stop, g, run.mesh, run.rules)
        self.guard = HackGuard(self.labels, g.hack_rule, g.hack_warn, cfg.train.eval_every)
        self.use_old = g.mu > 1 or g.minibatches > 1
        for src, pool, rm in zip(self.sources, self.prompts.pools, self.rewards.uses_rm):
            what = f"{src.task} (difficulty {src.difficulty or 'default'})" if src.task else src.prompts
            when = f", from step {g.rm_from_step}" if rm and g.rm_from_step else ""
            run.log(f"grpo source {src.label}: {what}, {len(pool)} prompts, weight {src.weight:g}, "
                    f"rewards {src.rewards}{when}")
        run.log(f"grpo: {len(self.test)} held-out test problems; {g.prompts_per_step} prompts x {g.group_size} "
                f"completions of up to {g.max_new_tokens} tokens per step")

    def data_state(self) -> dict:
        return self.prompts.state()

    def set_data_state(self, state: dict) -> None:
        self.prompts.set_state(state)

    def compile(self) -> None:
        run, g = self.run, self.run.cfg.grpo
        step = make_grpo_step(run.model, run.tx, g, run.cfg.train, run.lr_schedule, g.max_new_tokens, run.rules,
                              use_old=self.use_old, update_bias=g.moe_bias == "update")
        self.update = jax.jit(step, in_shardings=(run.state_sh, run.batch_sh), out_shardings=(run.state_sh, None),
                              donate_argnums=(0,))
        self.logprobs = jax.jit(make_score(run.model, g.temperature, run.rules),
                                in_shardings=(run.state_sh.params, run.state_sh.moe_bias, run.batch_sh))
        self.copy_reference = jax.jit(lambda s: s.replace(ref_params=jax.tree.map(jnp.copy, s.params)),
                                      in_shardings=(run.state_sh,), out_shardings=run.state_sh, donate_argnums=(0,))

    def rollout(self, state, step: int) -> Rollout:
        """The step's groups: prompts drawn from the sources, completed with the step's
        parameters, scored by the run's rewards."""
        rng = jax.random.fold_in(jax.random.key(self.run.cfg.train.seed), step)
        return self.sampler(model_variables(state.params, state.moe_bias), lambda: self.prompts.draw(step),
                            self.rewards.score, rng)

    def batch(self, ro: Rollout) -> list[dict[str, jax.Array]]:
        """The updates' batches: the rollout's training rows with each completion's
        group-normalized advantage (from every row's rewards), as global arrays split over
        the batch axes; each process fills them with the rows its devices hold."""
        g, run = self.run.cfg.grpo, self.run
        adv = group_advantages(jnp.asarray(ro.scores.reward.reshape(-1, g.group_size)), g.scale_rewards)
        local = ro.batch(run.tokenizer, self.width, self.seq, np.asarray(adv).reshape(-1))
        at = np.full(self.rows, -1)
        at[ro.held] = np.arange(len(ro.held))
        size = self.rows // g.minibatches

        def rows_of(values, picked):
            def fill(index):
                where = at[picked[index[0]]]
                if (where < 0).any():
                    raise ValueError("an update's rows are not on the devices that decoded them")
                return values[where][(slice(None),) + tuple(index[1:])]

            return jax.make_array_from_callback((size,) + values.shape[1:], run.batch_sh, fill)

        return [{k: rows_of(v, picked) for k, v in local.items()}
                for picked in minibatch_rows(ro.sharding, run.batch_sh, self.rows, g.minibatches)]

    def learn(self, state, minibatches: list[dict[str, jax.Array]]):
        """`mu` passes of `minibatches` updates on the rollout's rows; (state, the updates'
        metrics). The reference's log-probs (beta > 0) and the rollout policy's (several
        updates) are computed once, before the first update."""
        g = self.run.cfg.grpo
        for mb in minibatches:
            if g.beta:
                mb["ref_logp"] = self.logprobs(state.ref_params, state.moe_bias, mb)
            if self.use_old:
                mb["old_logp"] = self.logprobs(state.params, state.moe_bias, mb)
        updates = []
        for _ in range(g.mu):
            for mb in minibatches:
                state, m = self.update(state, mb)
                updates.append(m)
        return state, jax.device_get(updates)

    def step(self, state, step):
        g, run = self.run.cfg.grpo, self.run
        if g.rm_from_step and step == g.rm_from_step and any(self.rewards.uses_rm):
            run.log(f"step {step}: the reward models join: sources "
                    f"{', '.join(src.label for src, rm in zip(self.sources, self.rewards.uses_rm) if rm)}")
        ro = self.rollout(state, step)
        t0 = time.time()
        state, updates = self.learn(state, self.batch(ro))
        if g.ref_update_every and (step + 1) % g.ref_update_every == 0 and g.beta:
            state = self.copy_reference(state)
        metrics = {k: float(np.mean([u[k] for u in updates])) for k in updates[0]}
        metrics["rollout_logprob_diff"] = float(updates[0]["rollout_logprob_diff"])  # before any update
        metrics["update_s"] = time.time() - t0
        metrics.update(rollout_metrics(ro, self.labels, g.speculative))
        for line in self.guard.check(step, metrics):
            run.log(line)
        return state, metrics

    def evaluate(self, state) -> dict[str, float]:
        if not self.test:
            return {}
        got = evaluate(self.generator, model_variables(state.params, state.moe_bias), self.run.tokenizer, self.test,
                       max_new_tokens=self.run.cfg.grpo.max_new_tokens, width=self.width, stop_token=self.stop,
                       mesh=self.run.mesh, rules=self.run.rules)
        return {f"test_{k}": v for k, v in got.items()}

    def progress(self, record: dict) -> dict[str, str]:
        out = {"reward": f"{record['reward_mean']:.3f}"}
        if "accuracy" in record:
            out["acc"] = f"{record['accuracy']:.2f}"
        if "rm_score" in record:
            out["rm"] = f"{record['rm_score']:.2f}"
        return out

    def plot(self) -> str | None:
        return plot_grpo(self.run.workdir)

    def summary(self, last_eval) -> str:
        if "test_accuracy" not in last_eval:
            return ""
        return (f"held-out greedy accuracy {last_eval['test_accuracy']:.3f}, format rate "
                f"{last_eval['test_format_rate']:.3f}")

    def sample_prompt(self) -> str:
        return (self.test or self.prompts.pools[0])[0].prompt


STAGE = StageSpec(name="grpo", section="grpo", config=GRPOConfig, stage=GRPOStage, default_config="grpo")
