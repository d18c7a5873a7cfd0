"""GRPO (DeepSeek-R1 §2.2): rollouts from the current policy, rule-based rewards,
group-normalized advantages and the clipped objective of `train/grpo_loss.py`.

One step: draw `prompts_per_step` training problems, sample `group_size` completions of
each with `dsjax.generate` on the current parameters (no copy of the model), score them
with the reward registry, compute advantages, then run `mu` passes of `minibatches`
updates, each one `jax.jit` with explicit shardings (the same model and optimizer code
as pretraining). The trainer recomputes the rollout policy's log-probabilities and logs
how far they are from the sampler's (`rollout_logprob_diff`).
"""

from __future__ import annotations

import dataclasses
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dsjax.config import ConfigError
from dsjax.losses import masked_mean, model_variables, token_entropy, token_logprobs
from dsjax.model import Transformer
from eval import rewards, tasks
from eval.sampling import Completions, complete, encode_prompts, evaluate, prompt_width, score
from train.grpo_loss import AGGREGATIONS, IMPORTANCE, SCALES, group_advantages, policy_loss
from train.loop import Run, Stage
from train.report import plot_grpo
from train.steps import guarded, max_violation, schedules, update_moe_bias

MOE_BIAS_MODES = ("frozen", "update")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """Attributes:
      task / difficulty / template: the eval.tasks problems (train split) and their prompt
        template ('short' or R1's 'r1').
      train_problems: size of the pool of training problems drawn in order (then again).
      prompts_per_step / group_size: prompts per step and completions per prompt (G).
      max_new_tokens / temperature / top_p / top_k: sampling.
      stop_token: the token id that ends a completion (default: the tokenizer's EOS).
      rewards: weighted reward names, e.g. 'accuracy:1,format:0.1' (eval.rewards).
      overlong_buffer: tokens before max_new_tokens where DAPO's `overlong` reward falls.
      scale_rewards: advantage scaling, 'group' (GRPO), 'batch' or 'none' (Dr. GRPO).
      loss_agg: 'seq-mean-token-mean' (GRPO), 'token-mean' (DAPO) or 'dr_grpo'.
      importance: 'token' ratios, or 'sequence' (GSPO).
      epsilon / epsilon_high: clip range [1 - epsilon, 1 + epsilon_high] (DAPO: 0.2 / 0.28).
      beta: KL weight to the frozen reference (0 keeps no reference copy).
      ref_update_every: copy the policy into the reference every this many steps (0: never;
        R1 refreshed it every 400 steps).
      mu: passes over each rollout batch; minibatches: updates per pass.
      dynamic_sampling: drop groups whose rewards are all equal and refill them from new
        prompts (DAPO), up to `max_sampling_rounds` rollouts per step.
      speculative: draft rollouts with the policy's own MTP module (exact sampling).
      rollout_attn_impl: MLA form used to generate ('absorb' caches only the latent).
      moe_bias: the aux-loss-free router bias during RL: 'frozen' or 'update' (as pretraining).
      eval_problems: held-out test problems scored greedily at each evaluation.
      reward_seed: seed of the 'random' control reward.
    """

    task: str = "addition"
    difficulty: int = 2
    template: str = "short"
    train_problems: int = 2000
    prompts_per_step: int = 16
    group_size: int = 8
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_token: int | None = None
    rewards: str = "accuracy:1,format:0.1"
    overlong_buffer: int = 0
    scale_rewards: str = "group"
    loss_agg: str = "seq-mean-token-mean"
    importance: str = "token"
    epsilon: float = 0.2
    epsilon_high: float = 0.2
    beta: float = 0.001
    ref_update_every: int = 0
    mu: int = 1
    minibatches: int = 1
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 3
    speculative: bool = False
    rollout_attn_impl: str = "absorb"
    moe_bias: str = "frozen"
    eval_problems: int = 200
    reward_seed: int = 0

    def validate(self) -> None:
        if self.group_size < 2:
            raise ConfigError(f"grpo.group_size must be at least 2 (advantages compare completions of one "
                              f"prompt), got {self.group_size}")
        for name in ("prompts_per_step", "max_new_tokens", "mu", "minibatches", "max_sampling_rounds",
                     "train_problems"):
            if getattr(self, name) < 1:
                raise ConfigError(f"grpo.{name} must be positive, got {getattr(self, name)}")
        for name in ("beta", "epsilon", "epsilon_high", "overlong_buffer", "ref_update_every", "eval_problems",
                     "top_k", "temperature"):
            if getattr(self, name) < 0:
                raise ConfigError(f"grpo.{name} must be >= 0, got {getattr(self, name)}")
        if self.temperature == 0:
            raise ConfigError("grpo.temperature must be positive: a group of greedy rollouts has no spread")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"grpo.top_p must be in (0, 1], got {self.top_p}")
        if (self.prompts_per_step * self.group_size) % self.minibatches:
            raise ConfigError(f"grpo.minibatches={self.minibatches} does not divide the "
                              f"{self.prompts_per_step * self.group_size} completions of a step")
        choices = {"scale_rewards": SCALES, "loss_agg": AGGREGATIONS, "importance": IMPORTANCE,
                   "moe_bias": MOE_BIAS_MODES, "rollout_attn_impl": ("absorb", "naive")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"grpo.{name}={getattr(self, name)!r} is not one of {list(allowed)}")
        try:
            rewards.parse_spec(self.rewards)
            tasks.get(self.task, self.difficulty, template=self.template)
        except ValueError as e:
            raise ConfigError(f"grpo: {e}") from None


def make_grpo_step(model, tx, g: GRPOConfig, tcfg, lr_schedule, max_tokens: int, rules=(),
                   use_old: bool = False, update_bias: bool = False):
    """Returns grpo_step(state, batch) -> (state, metrics), to be jitted by the caller.

    `batch`: `inputs`, `targets` int32 [B, T]; `mask` bool [B, T] (completion tokens
    among the targets); `advantages` float32 [B]; `rollout_logp` float32 [B, T] (the
    sampler's log-probs at temperature 1); `ref_logp` [B, T] when beta > 0; `old_logp`
    [B, T] with `use_old` (several updates per rollout), otherwise the policy's own
    log-probs without gradient (the on-policy ratio is 1 with the right gradient).
    """
    _, gamma = schedules(tcfg)

    def loss_fn(params, moe_bias, batch):
        with nn.logical_axis_rules(rules):
            out = model.apply(model_variables(params, moe_bias), batch["inputs"], mtp=False)
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
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        moe_bias = state.moe_bias
        if update_bias and moe_bias:
            moe_bias = update_moe_bias(moe_bias, out, gamma(state.step))
        metrics.update(loss=loss, grad_norm=optax.tree_utils.tree_norm(grads), lr=lr_schedule(state.step))
        if out.expert_loads is not None:
            metrics["max_vio"] = max_violation(out.expert_loads)
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, moe_bias=moe_bias)
        return guarded(state, new, loss, grads, metrics)

    return grpo_step


def make_score(model, temperature: float, rules=()):
    """score(params, moe_bias, batch) -> log-probs [B, T] of the targets at `temperature`
    (the reference's, or the rollout policy's before several updates)."""

    def score(params, moe_bias, batch):
        with nn.logical_axis_rules(rules):
            out = model.apply(model_variables(params, moe_bias), batch["inputs"], mtp=False)
        return token_logprobs(out.logits / temperature, batch["targets"])

    return score


@dataclasses.dataclass
class Rollout:
    """One step's sampled groups: problems [P], completions [P * G] in group order and
    their scores, plus what sampling them cost."""

    problems: list
    completions: Completions
    scores: dict
    first_round_zero_std: float
    rounds: int
    seconds: float


class GRPOStage(Stage):
    """`python -m train grpo`: R1-Zero-style RL on a generated task with rule-based rewards."""

    name = "grpo"
    eval_at_start = True

    @classmethod
    def needs_reference(cls, cfg) -> bool:
        return cfg.grpo.beta > 0

    def __init__(self, run: Run):
        super().__init__(run)
        cfg, g = run.cfg, run.cfg.grpo
        if run.process_count > 1:
            raise ConfigError("grpo runs in one process (any number of local devices) for now")
        self.stop = g.stop_token if g.stop_token is not None else run.tokenizer.eos_id
        if self.stop is None:
            raise ConfigError("grpo needs a stop token: the tokenizer has no end-of-sequence token; set grpo.stop_token")
        if not 0 <= self.stop < cfg.model.vocab_size:
            raise ConfigError(f"grpo.stop_token={self.stop} is outside the vocabulary of {cfg.model.vocab_size}")
        if g.speculative and cfg.model.num_nextn_predict_layers < 1:
            raise ConfigError("grpo.speculative needs an MTP module (model.num_nextn_predict_layers >= 1)")
        task = tasks.get(g.task, g.difficulty, template=g.template)
        try:
            self.pool = task.split("train", g.train_problems, seed=cfg.train.seed)
            self.test = task.split("test", g.eval_problems, seed=cfg.train.seed) if g.eval_problems else []
        except ValueError as e:
            raise ConfigError(f"grpo: {e}") from None
        self.order = np.random.default_rng(cfg.train.seed).permutation(len(self.pool))
        self.cursor = 0
        self.reward_fn = rewards.combine(g.rewards)
        self.rows = g.prompts_per_step * g.group_size
        self.width = prompt_width(run.tokenizer, [p.prompt for p in self.pool + self.test])
        if self.width + g.max_new_tokens > cfg.model.max_position_embeddings:
            raise ConfigError(f"prompts of {self.width} tokens + grpo.max_new_tokens={g.max_new_tokens} exceed "
                              f"model.max_position_embeddings={cfg.model.max_position_embeddings}")
        self.seq = self.width + g.max_new_tokens  # prompt + completion, left-aligned
        self.tokens_per_step = self.rows * (self.seq - 1)
        self.generator = Transformer(cfg.model.replace(attn_impl=g.rollout_attn_impl))
        self.use_old = g.mu > 1 or g.minibatches > 1
        run.log(f"grpo: {g.task} (difficulty {g.difficulty}), {len(self.pool)} training / {len(self.test)} test "
                f"problems; {g.prompts_per_step} prompts x {g.group_size} completions of up to "
                f"{g.max_new_tokens} tokens per step; rewards {g.rewards}")

    def data_state(self) -> dict:
        return {"cursor": self.cursor}

    def set_data_state(self, state: dict) -> None:
        self.cursor = int(state["cursor"])

    def compile(self) -> None:
        run, g = self.run, self.run.cfg.grpo
        step = make_grpo_step(run.model, run.tx, g, run.cfg.train, run.lr_schedule, g.max_new_tokens, run.rules,
                              use_old=self.use_old, update_bias=g.moe_bias == "update")
        self.update = jax.jit(step, in_shardings=(run.state_sh, run.batch_sh), out_shardings=(run.state_sh, None),
                              donate_argnums=(0,))
        self.score = jax.jit(make_score(run.model, g.temperature, run.rules),
                             in_shardings=(run.state_sh.params, run.state_sh.moe_bias, run.batch_sh))
        self.copy_reference = jax.jit(lambda s: s.replace(ref_params=jax.tree.map(jnp.copy, s.params)),
                                      in_shardings=(run.state_sh,), out_shardings=run.state_sh, donate_argnums=(0,))

    # ------------------------------------------------------------------ rollouts
    def _next_problems(self) -> list:
        n = self.run.cfg.grpo.prompts_per_step
        picked = [self.pool[self.order[(self.cursor + i) % len(self.pool)]] for i in range(n)]
        self.cursor += n
        return picked

    def _variables(self, state) -> dict:
        return model_variables(state.params, state.moe_bias)

    def rollout(self, state, rng) -> Rollout:
        """Samples groups until prompts_per_step of them have reward spread (dynamic
        sampling) or one round (otherwise); groups without spread fill what is missing."""
        g, run = self.run.cfg.grpo, self.run
        t0 = time.time()
        kept, flat = [], []
        first_zero = None
        rounds = 0
        while rounds < (g.max_sampling_rounds if g.dynamic_sampling else 1):
            problems = self._next_problems()
            repeated = [p for p in problems for _ in range(g.group_size)]
            comp = complete(self.generator, self._variables(state), run.tokenizer, [p.prompt for p in repeated],
                            self.width, max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
                            top_k=g.top_k, rng=jax.random.fold_in(rng, rounds), speculative=g.speculative,
                            stop_token=self.stop, mesh=run.mesh, rules=run.rules)
            scores = score(repeated, comp, self.reward_fn, max_tokens=g.max_new_tokens,
                           overlong_buffer=g.overlong_buffer, reward_seed=g.reward_seed)
            spread = scores["reward"].reshape(-1, g.group_size).std(axis=1) > 0
            if first_zero is None:
                first_zero = float(1.0 - spread.mean())
            for i, problem in enumerate(problems):
                rows = slice(i * g.group_size, (i + 1) * g.group_size)
                group = (problem, comp, rows, scores)
                (kept if spread[i] or not g.dynamic_sampling else flat).append(group)
            rounds += 1
            if len(kept) >= g.prompts_per_step:
                break
        groups = (kept + flat)[:g.prompts_per_step]
        return Rollout(problems=[grp[0] for grp in groups], completions=_gather(groups),
                       scores=_gather_scores(groups), first_round_zero_std=first_zero, rounds=rounds,
                       seconds=time.time() - t0)

    def batch(self, ro: Rollout) -> dict[str, np.ndarray]:
        g = self.run.cfg.grpo
        ids, lengths = encode_prompts(self.run.tokenizer, [p.prompt for p in ro.problems], self.width)
        adv = group_advantages(jnp.asarray(ro.scores["reward"].reshape(-1, g.group_size)), g.scale_rewards)
        return rollout_batch(np.repeat(ids, g.group_size, axis=0), np.repeat(lengths, g.group_size),
                             ro.completions, self.seq, np.asarray(adv).reshape(-1))

    # ------------------------------------------------------------------ the step
    def step(self, state, step):
        g, run = self.run.cfg.grpo, self.run
        ro = self.rollout(state, jax.random.fold_in(jax.random.key(run.cfg.train.seed), step))
        t0 = time.time()
        full = self.batch(ro)
        size = self.rows // g.minibatches
        minibatches = [run.to_global({k: v[i * size:(i + 1) * size] for k, v in full.items()})
                       for i in range(g.minibatches)]
        for mb in minibatches:
            if g.beta:
                mb["ref_logp"] = self.score(state.ref_params, state.moe_bias, mb)
            if self.use_old:
                mb["old_logp"] = self.score(state.params, state.moe_bias, mb)
        updates = []
        for _ in range(g.mu):
            for mb in minibatches:
                state, m = self.update(state, mb)
                updates.append(m)
        if g.ref_update_every and (step + 1) % g.ref_update_every == 0 and g.beta:
            state = self.copy_reference(state)
        metrics = {k: float(np.mean([u[k] for u in jax.device_get(updates)])) for k in updates[0]}
        metrics["rollout_logprob_diff"] = float(jax.device_get(updates[0]["rollout_logprob_diff"]))
        metrics["update_s"] = time.time() - t0
        metrics.update(self._rollout_metrics(ro))
        return state, metrics

    def _rollout_metrics(self, ro: Rollout) -> dict[str, float]:
        comp, s = ro.completions, ro.scores
        generated = float(comp.lengths.sum())
        out = {"reward_mean": float(s["reward"].mean()), "reward_std": float(s["reward"].std()),
               "accuracy": float(s["accuracy"].mean()), "format_rate": float(s["format"].mean()),
               "frac_reward_zero_std": ro.first_round_zero_std, "completion_len": float(comp.lengths.mean()),
               "completion_len_max": float(comp.lengths.max()), "truncated_frac": float(comp.truncated.mean()),
               "rollout_s": ro.seconds, "rollout_tokens_per_s": generated * ro.rounds / max(ro.seconds, 1e-9),
               "sampling_rounds": float(ro.rounds)}
        for name, values in s["parts"].items():
            out[f"reward/{name}"] = float(values.mean())
        if self.run.cfg.grpo.speculative:
            out.update(spec_acceptance=comp.acceptance_rate, spec_tokens_per_forward=comp.tokens_per_forward)
        return out

    def evaluate(self, state) -> dict[str, float]:
        if not self.test:
            return {}
        got = evaluate(self.generator, self._variables(state), self.run.tokenizer, self.test,
                       max_new_tokens=self.run.cfg.grpo.max_new_tokens, width=self.width, stop_token=self.stop,
                       mesh=self.run.mesh, rules=self.run.rules)
        return {f"test_{k}": v for k, v in got.items()}

    def progress(self, record: dict) -> dict[str, str]:
        return {"reward": f"{record['reward_mean']:.3f}", "acc": f"{record['accuracy']:.2f}"}

    def plot(self) -> str | None:
        return plot_grpo(self.run.workdir)

    def summary(self, last_eval) -> str:
        if "test_accuracy" not in last_eval:
            return ""
        return (f"held-out greedy accuracy {last_eval['test_accuracy']:.3f}, format rate "
                f"{last_eval['test_format_rate']:.3f}")

    def sample_prompt(self) -> str:
        return (self.test or self.pool)[0].prompt


def rollout_batch(prompt_ids: np.ndarray, prompt_lengths: np.ndarray, comp: Completions, seq: int,
                  advantages: np.ndarray) -> dict[str, np.ndarray]:
    """Training rows of sampled completions: prompt + completion left-aligned in `seq`
    tokens. prompt_ids: int [B, P] (right-padded); comp: B completions; advantages: [B].
    Returns inputs/targets int32 [B, seq - 1], mask bool (targets that are completion
    tokens, the stop token included), advantages float32 [B] and rollout_logp [B, seq - 1]."""
    rows = len(prompt_lengths)
    tokens = np.zeros((rows, seq), np.int32)
    mask = np.zeros((rows, seq - 1), bool)
    rollout_logp = np.zeros((rows, seq - 1), np.float32)
    for r in range(rows):
        lp, n = int(prompt_lengths[r]), int(comp.lengths[r])
        tokens[r, :lp] = prompt_ids[r, :lp]
        tokens[r, lp:lp + n] = comp.tokens[r, :n]
        mask[r, lp - 1:lp - 1 + n] = True
        rollout_logp[r, lp - 1:lp - 1 + n] = comp.logprobs[r, :n]
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask,
            "advantages": np.asarray(advantages, np.float32), "rollout_logp": rollout_logp}


def _gather(groups) -> Completions:
    """Concatenates the rows of (problem, Completions, rows, scores) groups."""
    parts = [(c, rows) for _, c, rows, _ in groups]
    cat = lambda name: np.concatenate([getattr(c, name)[rows] for c, rows in parts])
    texts = [t for c, rows in parts for t in c.texts[rows]]
    first = parts[0][0]
    return Completions(tokens=cat("tokens"), logprobs=cat("logprobs"), lengths=cat("lengths"), texts=texts,
                       truncated=cat("truncated"), acceptance_rate=first.acceptance_rate,
                       tokens_per_forward=first.tokens_per_forward)


def _gather_scores(groups) -> dict:
    out = {k: np.concatenate([s[k][rows] for _, _, rows, s in groups]) for k in ("reward", "accuracy", "format")}
    out["parts"] = {name: np.concatenate([s["parts"][name][rows] for _, _, rows, s in groups])
                    for name in groups[0][3]["parts"]}
    return out
