"""GRPO (DeepSeek-R1 §2.2): rollouts from the current policy, rule-based rewards,
group-normalized advantages and the clipped objective of `train/grpo_loss.py`.

One step: draw `prompts_per_step` training problems, sample `group_size` completions of
each with `dsjax.generate` on the current parameters (no copy of the model), score them
with the reward registry, compute advantages, then run `mu` passes of `minibatches`
updates, each one `jax.jit` with explicit shardings (the same model and optimizer code
as pretraining). The trainer recomputes the rollout policy's log-probabilities and logs
how far they are from the sampler's (`rollout_logprob_diff`).

R1's last RL stage mixes prompt sources (`grpo.sources`): task problems scored by rules
and general prompts scored by reward models (`grpo.reward_models`, switched on from
`grpo.rm_from_step`), each source drawn in proportion to its weight, with its own
metrics (`<source>/reward_mean`, ...) and a reward-hacking guard
(`<source>/rm_high_rule_fail`: completions the reward model ranks with those that pass
`grpo.hack_rule` while they fail it).
"""

from __future__ import annotations

import dataclasses
import json
import os
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
from train.steps import guarded_update, max_violation, schedules, update_moe_bias

MOE_BIAS_MODES = ("frozen", "update")


@dataclasses.dataclass(frozen=True)
class PromptSource:
    """One source of GRPO prompts (R1's last RL stage mixes several).

    Attributes:
      name: the metrics prefix (`<name>/reward_mean`, ...); default: the task's name, or
        the prompt file's stem.
      task / difficulty / template: problems of an eval.tasks task (its train split; the
        held-out evaluation uses the first task source's test split).
      prompts: or a JSONL file of general prompts, one {"prompt": ..., other fields} per
        line; the other fields reach the rewards (`answer`, `language`, ...).
      rewards: this source's weighted rewards: rule-based ones and reward models named in
        grpo.reward_models, e.g. 'helpful:1,format:0.1'.
      weight: its share of each step's prompts, relative to the active sources (a source
        scored by a reward model is active from grpo.rm_from_step on; dynamic sampling
        then keeps the groups with reward spread, whatever their source).
      problems: how many training problems a task source draws (a prompt file gives all).
      language: the target script of the `language` reward for this source's prompts
        (eval.rewards.SCRIPTS; a prompt's own `language` field wins).
    """

    name: str = ""
    task: str = ""
    difficulty: int | None = None
    template: str = "short"
    prompts: str = ""
    rewards: str = "accuracy:1,format:0.1"
    weight: float = 1.0
    problems: int = 2000
    language: str = ""

    @property
    def label(self) -> str:
        return self.name or self.task or os.path.splitext(os.path.basename(self.prompts))[0]


def parse_reward_models(spec: str) -> dict[str, str]:
    """'helpful=DIR,harmless=DIR2' -> {'helpful': 'DIR', 'harmless': 'DIR2'}; ValueError if malformed."""
    out = {}
    for item in str(spec or "").split(","):
        if not item.strip():
            continue
        name, sep, workdir = item.partition("=")
        if not sep or not name.strip() or not workdir.strip():
            raise ValueError(f"grpo.reward_models item {item.strip()!r}: expected name=WORKDIR")
        out[name.strip()] = workdir.strip()
    return out


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
      sources: prompt sources mixed by weight (PromptSource list); empty: one source, the
        task above with `rewards` and `train_problems`.
      reward_models: reward models the sources' rewards name, 'name=WORKDIR,...' (each a
        `python -m train rm` workdir; eval.rewards.register_reward_model).
      rm_from_step: sources scored by a reward model join the mixture at this step (R1
        used its reward models only in the last 400 of 1,700 steps).
      hack_rule: the rule-based reward of the reward-hacking guard (a completion fails it
        when it scores <= 0); hack_warn: the guard share above which the log warns.
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
    sources: tuple[PromptSource, ...] = ()
    reward_models: str = ""
    rm_from_step: int = 0
    hack_rule: str = "format"
    hack_warn: float = 0.25

    def resolved_sources(self) -> tuple[PromptSource, ...]:
        """The sources of the run: `sources`, or the single task source of task/rewards."""
        if self.sources:
            return self.sources
        return (PromptSource(task=self.task, difficulty=self.difficulty, template=self.template,
                             rewards=self.rewards, problems=self.train_problems),)

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
        if self.rm_from_step < 0:
            raise ConfigError(f"grpo.rm_from_step must be >= 0, got {self.rm_from_step}")
        try:
            models = tuple(parse_reward_models(self.reward_models))
            rewards.parse_spec(self.hack_rule)
            if not self.sources:
                rewards.parse_spec(self.rewards)
                tasks.get(self.task, self.difficulty, template=self.template)
        except ValueError as e:
            raise ConfigError(f"grpo: {e}") from None
        labels = [src.label for src in self.sources]
        for i, src in enumerate(self.sources):
            where = f"grpo.sources[{i}] ({src.label or 'unnamed'})"
            if bool(src.task) == bool(src.prompts):
                raise ConfigError(f"{where}: give exactly one of task= and prompts=")
            if labels.count(src.label) > 1:
                raise ConfigError(f"{where}: another source has the name {src.label!r}; set name=")
            if src.weight <= 0 or src.problems < 1:
                raise ConfigError(f"{where}: weight and problems must be positive")
            try:
                rewards.parse_spec(src.rewards, known=models)
                if src.task:
                    tasks.get(src.task, src.difficulty, template=src.template)
                if src.language:
                    rewards.script_share("", src.language)
            except ValueError as e:
                raise ConfigError(f"{where}: {e}") from None
        if self.sources and all(_uses_reward_model(src, models) for src in self.sources) and self.rm_from_step:
            raise ConfigError("grpo.rm_from_step: every source is scored by a reward model, so no source "
                              "would be active before that step")


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
        metrics.update(loss=loss, grad_norm=optax.tree_utils.tree_norm(grads), lr=lr_schedule(state.step))
        if out.expert_loads is not None:
            metrics["max_vio"] = max_violation(out.expert_loads)
        bias = (lambda b: update_moe_bias(b, out, gamma(state.step))) if update_bias and state.moe_bias else None
        return guarded_update(state, tx, loss, grads, metrics, bias)

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
    """`python -m train grpo`: R1-style RL on prompt sources with rule-based rewards and
    reward models (R1-Zero: one task source with rules)."""

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
        models = parse_reward_models(g.reward_models)
        for name, workdir in models.items():
            try:
                rewards.register_reward_model(name, workdir, batch_size=min(64, g.prompts_per_step * g.group_size))
            except ValueError as e:
                raise ConfigError(f"grpo.reward_models {name}: {e}") from None
        self.sources = g.resolved_sources()
        self.pools, self.test = [], []
        for src in self.sources:
            pool, test = _source_problems(src, g, cfg.train.seed)
            self.pools.append(pool)
            if test and not self.test:
                self.test = test
        # The first source keeps the single-source order, so runs and checkpoints from
        # before sources existed go on drawing the same problems.
        self.orders = [np.random.default_rng(cfg.train.seed if i == 0 else [cfg.train.seed, i]).permutation(len(p))
                       for i, p in enumerate(self.pools)]
        self.cursors = [0] * len(self.sources)
        self.mixture = Mixture([src.weight for src in self.sources])
        self.reward_fns = [rewards.combine(src.rewards) for src in self.sources]
        self.uses_rm = [_uses_reward_model(src, models) for src in self.sources]
        self.hack_rule = rewards.combine(g.hack_rule)
        self.rm_names = sorted({name for src in self.sources for name, _ in rewards.parse_spec(src.rewards)
                                if rewards.is_batch(name)})
        self.warned_at = None
        self.rows = g.prompts_per_step * g.group_size
        self.width = prompt_width(run.tokenizer, [p.prompt for pool in self.pools for p in pool] +
                                  [p.prompt for p in self.test])
        if self.width + g.max_new_tokens > cfg.model.max_position_embeddings:
            raise ConfigError(f"prompts of {self.width} tokens + grpo.max_new_tokens={g.max_new_tokens} exceed "
                              f"model.max_position_embeddings={cfg.model.max_position_embeddings}")
        self.seq = self.width + g.max_new_tokens  # prompt + completion, left-aligned
        self.tokens_per_step = self.rows * (self.seq - 1)
        self.generator = Transformer(cfg.model.replace(attn_impl=g.rollout_attn_impl))
        self.use_old = g.mu > 1 or g.minibatches > 1
        for src, pool, rm in zip(self.sources, self.pools, self.uses_rm):
            what = f"{src.task} (difficulty {src.difficulty or 'default'})" if src.task else src.prompts
            when = f", from step {g.rm_from_step}" if rm and g.rm_from_step else ""
            run.log(f"grpo source {src.label}: {what}, {len(pool)} prompts, weight {src.weight:g}, "
                    f"rewards {src.rewards}{when}")
        run.log(f"grpo: {len(self.test)} held-out test problems; {g.prompts_per_step} prompts x {g.group_size} "
                f"completions of up to {g.max_new_tokens} tokens per step")

    def data_state(self) -> dict:
        return {"cursors": list(self.cursors), "carry": [float(c) for c in self.mixture.carry]}

    def set_data_state(self, state: dict) -> None:
        if "cursor" in state:  # a checkpoint of one source
            state = {"cursors": [state["cursor"]], "carry": [0.0]}
        if len(state["cursors"]) != len(self.sources):
            raise ConfigError(f"the checkpoint was written with {len(state['cursors'])} prompt sources, this "
                              f"run has {len(self.sources)}; resume with the same grpo.sources")
        self.cursors = [int(c) for c in state["cursors"]]
        self.mixture.carry = np.asarray(state["carry"], np.float64)

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
    def active(self, step: int) -> np.ndarray:
        """Which sources draw prompts at `step` (reward-model sources from rm_from_step)."""
        return np.asarray([not rm or step >= self.run.cfg.grpo.rm_from_step for rm in self.uses_rm])

    def _next_problems(self, step: int) -> list[tuple[int, object]]:
        """(source index, problem) for the next prompts_per_step prompts, split by weight."""
        counts = self.mixture.counts(self.run.cfg.grpo.prompts_per_step, self.active(step))
        picked = []
        for s, k in enumerate(counts):
            pool, order = self.pools[s], self.orders[s]
            picked += [(s, pool[order[(self.cursors[s] + i) % len(pool)]]) for i in range(int(k))]
            self.cursors[s] += int(k)
        return picked

    def _variables(self, state) -> dict:
        return model_variables(state.params, state.moe_bias)

    def score_rows(self, sources: np.ndarray, problems: list, comp: Completions) -> dict:
        """Scores of completions[i] for problems[i] of source sources[i], each source with
        its own rewards: reward, accuracy (NaN where undefined), format, the hack rule (NaN
        for sources without a reward model), source, and parts {name: [B]} (NaN where a
        source lacks that reward)."""
        g = self.run.cfg.grpo
        rows = len(problems)
        out = {"reward": np.zeros(rows, np.float32), "accuracy": np.full(rows, np.nan, np.float32),
               "format": np.zeros(rows, np.float32), "rule": np.full(rows, np.nan, np.float32),
               "source": np.asarray(sources), "parts": {}}
        for s in np.unique(sources):
            idx = np.flatnonzero(sources == s)
            sub = [problems[i] for i in idx]
            part = take_rows(comp, idx)
            sc = score(sub, part, self.reward_fns[s], max_tokens=g.max_new_tokens,
                       overlong_buffer=g.overlong_buffer, reward_seed=g.reward_seed)
            for key in ("reward", "accuracy", "format"):
                out[key][idx] = sc[key]
            for name, values in sc["parts"].items():
                out["parts"].setdefault(name, np.full(rows, np.nan, np.float32))[idx] = values
            if self.uses_rm[s]:
                out["rule"][idx] = score(sub, part, self.hack_rule)["reward"]
        return out

    def rollout(self, state, rng, step: int = 0) -> Rollout:
        """Samples groups until prompts_per_step of them have reward spread (dynamic
        sampling) or one round (otherwise); groups without spread fill what is missing."""
        g, run = self.run.cfg.grpo, self.run
        t0 = time.time()
        kept, flat = [], []
        first_zero = None
        rounds = 0
        while rounds < (g.max_sampling_rounds if g.dynamic_sampling else 1):
            picked = self._next_problems(step)
            problems = [p for _, p in picked]
            repeated = [p for p in problems for _ in range(g.group_size)]
            sources = np.repeat([s for s, _ in picked], g.group_size)
            comp = complete(self.generator, self._variables(state), run.tokenizer, [p.prompt for p in repeated],
                            self.width, max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
                            top_k=g.top_k, rng=jax.random.fold_in(rng, rounds), speculative=g.speculative,
                            stop_token=self.stop, mesh=run.mesh, rules=run.rules)
            scores = self.score_rows(sources, repeated, comp)
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
        if g.rm_from_step and step == g.rm_from_step and any(self.uses_rm):
            run.log(f"step {step}: the reward models join: sources "
                    f"{', '.join(src.label for src, rm in zip(self.sources, self.uses_rm) if rm)}")
        ro = self.rollout(state, jax.random.fold_in(jax.random.key(run.cfg.train.seed), step), step)
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
        self._guard(step, metrics)
        return state, metrics

    def _guard(self, step: int, metrics: dict) -> None:
        """Warns in the log when a source's reward-hacking share passes grpo.hack_warn (at
        most once per evaluation interval)."""
        g, every = self.run.cfg.grpo, self.run.cfg.train.eval_every
        for src in self.sources:
            share = metrics.get(f"{src.label}/rm_high_rule_fail")
            if share is not None and share > g.hack_warn and (self.warned_at is None or step - self.warned_at >= every):
                self.warned_at = step
                self.run.log(f"step {step + 1}: possible reward hacking in {src.label}: {share:.0%} of its "
                             f"completions fail {g.hack_rule} yet the reward model scores them like those that "
                             f"pass (completion length {metrics.get(src.label + '/completion_len', 0):.1f})")

    def _rollout_metrics(self, ro: Rollout) -> dict[str, float]:
        comp, s = ro.completions, ro.scores
        generated = float(comp.lengths.sum())
        out = {"reward_mean": float(s["reward"].mean()), "reward_std": float(s["reward"].std()),
               "format_rate": float(s["format"].mean()),
               "frac_reward_zero_std": ro.first_round_zero_std, "completion_len": float(comp.lengths.mean()),
               "completion_len_max": float(comp.lengths.max()), "truncated_frac": float(comp.truncated.mean()),
               "rollout_s": ro.seconds, "rollout_tokens_per_s": generated * ro.rounds / max(ro.seconds, 1e-9),
               "sampling_rounds": float(ro.rounds)}
        if not np.isnan(s["accuracy"]).all():
            out["accuracy"] = float(np.nanmean(s["accuracy"]))
        for name, values in s["parts"].items():
            if not np.isnan(values).all():
                out[f"reward/{name}"] = float(np.nanmean(values))
        rm = _rm_score(s, self.rm_names)
        if rm is not None and not np.isnan(rm).all():
            out["rm_score"] = float(np.nanmean(rm))
        if len(self.sources) > 1:
            for i, src in enumerate(self.sources):
                rows = s["source"] == i
                out[f"{src.label}/share"] = float(rows.mean())
                if rows.any():
                    out.update(_source_metrics(src.label, s, rows, comp.lengths, rm))
        elif rm is not None:
            out.update(_source_metrics(self.sources[0].label, s, np.ones(len(s["reward"]), bool), comp.lengths, rm))
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
        return (self.test or self.pools[0])[0].prompt


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
    keys = ("reward", "accuracy", "format", "rule", "source")
    out = {k: np.concatenate([s[k][rows] for _, _, rows, s in groups]) for k in keys}
    names = sorted({name for *_, s in groups for name in s["parts"]})
    out["parts"] = {name: np.concatenate([s["parts"][name][rows] if name in s["parts"] else
                                          np.full(rows.stop - rows.start, np.nan, np.float32)
                                          for _, _, rows, s in groups]) for name in names}
    return out


def take_rows(comp: Completions, idx: np.ndarray) -> Completions:
    """The completions at rows `idx`."""
    return dataclasses.replace(comp, tokens=comp.tokens[idx], logprobs=comp.logprobs[idx],
                               lengths=comp.lengths[idx], texts=[comp.texts[i] for i in idx],
                               truncated=comp.truncated[idx])


class Mixture:
    """Splits each step's prompts among sources in proportion to their weights.

    Deterministic and exact over time: each source carries the remainder of its share, so
    its running count stays within one prompt of weight / total x prompts drawn (smooth
    weighted round-robin); inactive sources draw nothing and their share goes to the
    others. `carry` is all the state there is (it goes into checkpoints)."""

    def __init__(self, weights):
        self.weights = np.asarray(weights, np.float64)
        if not len(self.weights) or (self.weights <= 0).any():
            raise ValueError(f"mixture weights must be positive, got {list(weights)}")
        self.carry = np.zeros(len(self.weights))

    def counts(self, n: int, active=None) -> np.ndarray:
        """How many of the next `n` prompts each source gives (int [sources], sum n)."""
        active = np.ones(len(self.weights), bool) if active is None else np.asarray(active, bool)
        if not active.any():
            raise ValueError("no prompt source is active")
        w = np.where(active, self.weights, 0.0)
        self.carry = self.carry + n * w / w.sum()
        counts = np.floor(self.carry + 1e-9).astype(np.int64)
        missing = n - int(counts.sum())
        if missing > 0:
            rest = np.where(active, self.carry - counts, -np.inf)
            counts[np.argsort(-rest, kind="stable")[:missing]] += 1
        self.carry = self.carry - counts
        return counts


def _uses_reward_model(src: PromptSource, models) -> bool:
    """Whether a source's rewards include a reward model (named in `models` or registered)."""
    return any(name in models or rewards.is_batch(name)
               for name, _ in rewards.parse_spec(src.rewards, known=tuple(models)))


def read_prompts(path: str, language: str = "") -> list:
    """The general prompts of a JSONL file as problems: {"prompt": ..., other fields} per
    line (fields reach the rewards). Raises ConfigError naming the file and line."""
    from eval.tasks import Problem

    if not os.path.isfile(path):
        raise ConfigError(f"prompt file {path} does not exist")
    problems = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{n}: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"]:
                raise ConfigError(f"{path}:{n}: expected an object with a non-empty 'prompt' string")
            fields = {k: v for k, v in row.items() if k != "prompt"}
            if language:
                fields.setdefault("language", language)
            problems.append(Problem(prompt=row["prompt"], question=row["prompt"], fields=fields, work="",
                                    answer=str(fields.get("answer", "")), key=f"{path}:{n}"))
    if not problems:
        raise ConfigError(f"prompt file {path} holds no prompts")
    return problems


def _source_problems(src: PromptSource, g: GRPOConfig, seed: int) -> tuple[list, list]:
    """(training problems, held-out test problems) of a source (a prompt file has no test split)."""
    from eval.sampling import checkable

    if src.prompts:
        pool, test = read_prompts(src.prompts, src.language), []
        needs = {"accuracy", "partial_credit"} & {name for name, _ in rewards.parse_spec(src.rewards, known=(
            *parse_reward_models(g.reward_models),))}
        if needs and not all(checkable(p) for p in pool):
            raise ConfigError(f"grpo source {src.label}: the {sorted(needs)} reward needs an 'answer' (or "
                              f"'numbers' and 'target') in every line of {src.prompts}")
        return pool, test
    task = tasks.get(src.task, src.difficulty, template=src.template)
    try:
        pool = task.split("train", src.problems, seed=seed)
        test = task.split("test", g.eval_problems, seed=seed) if g.eval_problems else []
    except ValueError as e:
        raise ConfigError(f"grpo source {src.label}: {e}") from None
    if src.language:
        pool = [dataclasses.replace(p, fields={**p.fields, "language": src.language}) for p in pool]
    return pool, test


def _rm_score(scores: dict, rm_names) -> np.ndarray | None:
    """Per row: the mean of the reward models' scores that scored it (NaN where none did)."""
    parts = [scores["parts"][name] for name in rm_names if name in scores["parts"]]
    if not parts:
        return None
    stacked = np.stack(parts)
    seen = ~np.isnan(stacked)
    return np.where(seen.any(0), np.nansum(stacked, 0) / np.maximum(seen.sum(0), 1), np.nan)


def _source_metrics(label: str, s: dict, rows: np.ndarray, lengths: np.ndarray, rm) -> dict[str, float]:
    """One source's rollout metrics: reward, accuracy where defined, format rate, completion
    length, its rewards' parts, and with a reward model its score, the hack rule's pass
    rate and the guard: the share of its completions that fail the rule while the reward
    model scores them above the mean score of those that pass."""
    out = {f"{label}/reward_mean": float(s["reward"][rows].mean()),
           f"{label}/format_rate": float(s["format"][rows].mean()),
           f"{label}/completion_len": float(lengths[rows].mean())}
    acc = s["accuracy"][rows]
    if not np.isnan(acc).all():
        out[f"{label}/accuracy"] = float(np.nanmean(acc))
    for name, values in s["parts"].items():
        if not np.isnan(values[rows]).all():
            out[f"{label}/{name}"] = float(np.nanmean(values[rows]))
    rule = s["rule"][rows]
    if rm is not None and not np.isnan(rule).all() and not np.isnan(rm[rows]).all():
        score_, passing = rm[rows], rule > 0
        out[f"{label}/rm_score"] = float(np.nanmean(score_))
        out[f"{label}/hack_rule_rate"] = float(passing.mean())
        if passing.any():
            out[f"{label}/rm_high_rule_fail"] = float((~passing & (score_ > score_[passing].mean())).mean())
    return out
