"""GRPO's settings: the `grpo` section of a run config (GRPOConfig) and its prompt
sources (PromptSource), checked as a whole by `GRPOConfig.validate`."""

from __future__ import annotations

import dataclasses
import os

from dsjax.config import ConfigError
from eval import rewards, tasks
from train.rl.loss import AGGREGATIONS, IMPORTANCE, SCALES

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
        `python -m train rm` workdir, loaded for the run: train.rl.rewards).
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
        """Raises ConfigError naming the key of a value or combination no run can use."""
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
        if self.sources and all(uses_reward_model(src, models) for src in self.sources) and self.rm_from_step:
            raise ConfigError("grpo.rm_from_step: every source is scored by a reward model, so no source "
                              "would be active before that step")


def uses_reward_model(src: PromptSource, models) -> bool:
    """Whether a source's rewards include a reward model: one named in `models` (the
    run's grpo.reward_models) or a batch reward registered in eval.rewards."""
    return any(name in models or rewards.is_batch(name)
               for name, _ in rewards.parse_spec(src.rewards, known=tuple(models)))
