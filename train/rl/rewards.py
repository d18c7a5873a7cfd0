"""The rewards of a GRPO run, passed in: each source's weighted reward functions
(rule-based ones by name from eval.rewards, reward models loaded for this run), the rule
of the reward-hacking guard, and `Scores`, what they give a batch of completions.

The reward models a run names (`grpo.reward_models`) are loaded into the run's own
RewardSet and handed to `eval.rewards.combine`; nothing is registered in eval.rewards,
so they end with the run.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from dsjax.config import ConfigError
from eval import rewards
from eval.completions import Completions, ProcessRows
from eval.tasks import Problem
from train.rl.config import GRPOConfig, PromptSource, parse_reward_models, uses_reward_model


def reward_model_scorer(workdir: str, batch_size: int = 64, width: int | None = None) -> rewards.BatchReward:
    """The reward model trained in `workdir` (`python -m train rm`) as a batch reward.

    Args:
      workdir: the reward model's run directory.
      batch_size: rows scored per call on the device (the last call padded, so one compile).
      width: tokens of a prompt + completion + EOS row (default: the run's train.seq_len);
        a longer row keeps its end.
    Returns:
      fn(prompts, completions, fields) -> [float], one score per completion; it runs on
      the device holding the model, also inside a run's mesh context.
    Raises:
      ValueError naming the workdir when it holds no reward model.
    """
    import jax

    from dsjax.checkpoint import read_run_config
    from dsjax.reward_model import encode_responses, load_reward_model
    from dsjax.tokenizer import load_tokenizer

    try:
        stage = read_run_config(workdir).get("stage")
        if stage != "rm":
            raise ValueError(f"{workdir} holds a {stage!r} run, not a reward model (python -m train rm)")
        model, variables, run = load_reward_model(workdir)
    except FileNotFoundError as e:
        raise ValueError(str(e)) from None
    tokenizer = load_tokenizer(run["data"]["tokenizer"])
    width = width or int(run["train"]["seq_len"])
    apply = jax.jit(model.apply)
    device = jax.tree.leaves(variables)[0].devices().pop()
    alone = jax.sharding.Mesh(np.array([device]), ("rm",))

    def score(prompts, completions, fields):
        out = []
        with jax.set_mesh(alone):
            for start in range(0, len(prompts), batch_size):
                p, c = list(prompts[start:start + batch_size]), list(completions[start:start + batch_size])
                pad = batch_size - len(p)
                tokens, last = encode_responses(tokenizer, p + p[:1] * pad, c + c[:1] * pad, width, keep_end=True)
                out.extend(np.asarray(apply(variables, tokens, last))[:len(p), 0].tolist())
        return out

    return score


@dataclasses.dataclass
class Scores:
    """What the rewards give B completions, one row each.

    Attributes:
      reward: float32 [B], the weighted sum of the rewards of the row's source (what the
        advantages use).
      accuracy: float32 [B]; checked: bool [B], the rows whose problem has an answer a
        program checks (accuracy is 0 on the others and means nothing there).
      format: float32 [B], the format reward (every row).
      parts: {reward name: float32 [B]}, the unweighted value of every reward any source
        uses; scored: {name: bool [B]}, the rows whose source has that reward (0 on others).
      rm: float64 [B], the mean score of the reward models that scored the row;
        rm_scored: bool [B], the rows one did.
      rule: float32 [B], the reward-hacking guard's rule (grpo.hack_rule); guarded: bool
        [B], the rows it watches (those of sources scored by a reward model).
      source: int [B], the row's prompt source.
    """

    reward: np.ndarray
    accuracy: np.ndarray
    checked: np.ndarray
    format: np.ndarray
    parts: dict[str, np.ndarray]
    scored: dict[str, np.ndarray]
    rm: np.ndarray
    rm_scored: np.ndarray
    rule: np.ndarray
    guarded: np.ndarray
    source: np.ndarray

    def __len__(self) -> int:
        return len(self.reward)

    def take(self, rows) -> Scores:
        """The scores at `rows` (an index array or a slice)."""
        return Scores(**{f.name: ({k: v[rows] for k, v in getattr(self, f.name).items()}
                                  if f.name in ("parts", "scored") else getattr(self, f.name)[rows])
                         for f in dataclasses.fields(self)})

    @classmethod
    def concat(cls, parts: Sequence[Scores]) -> Scores:
        """The rows of `parts` one after another; a reward that some parts lack is unscored
        on their rows."""
        names = sorted({name for p in parts for name in p.parts})
        out = {f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(cls)
               if f.name not in ("parts", "scored")}
        out["parts"] = {n: np.concatenate([p.parts.get(n, np.zeros(len(p), np.float32)) for p in parts])
                        for n in names}
        out["scored"] = {n: np.concatenate([p.scored.get(n, np.zeros(len(p), bool)) for p in parts]) for n in names}
        return cls(**out)

    def gather(self, share: ProcessRows) -> Scores:
        """Every row's scores on every process, from each process's own rows (these scores
        are `share.own`'s; every process has the same reward names)."""
        flat = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("parts", "scored")}
        flat.update({f"parts/{k}": v for k, v in self.parts.items()})
        flat.update({f"scored/{k}": v for k, v in self.scored.items()})
        every = share.gather(flat)
        out = {k: v for k, v in every.items() if "/" not in k}
        out["parts"] = {k: every[f"parts/{k}"] for k in self.parts}
        out["scored"] = {k: every[f"scored/{k}"] for k in self.scored}
        return Scores(**out)


class RewardSet:
    """The reward functions of one run, each source with its own.

    Attributes:
      per_source: each source's combined reward (eval.rewards.combine of its `rewards`,
        with the run's reward models passed in).
      uses_rm: bool per source: scored by a reward model (it joins at grpo.rm_from_step
        and the reward-hacking guard watches it).
      rm_names: the reward models (and registered batch rewards) any source uses, sorted.
      names: every reward any source uses, sorted (the `parts` of every Scores, so the
        scores of any rows have the same names, on every process).
      hack_rule: the combined grpo.hack_rule.
    """

    def __init__(self, g: GRPOConfig, sources: Sequence[PromptSource], models: dict[str, rewards.BatchReward]):
        """`models`: {name: batch reward}, the reward models grpo.reward_models names."""
        known = tuple(models)
        self.per_source = [rewards.combine(src.rewards, models) for src in sources]
        self.uses_rm = [uses_reward_model(src, known) for src in sources]
        self.names = sorted({name for src in sources for name, _ in rewards.parse_spec(src.rewards, known=known)})
        self.rm_names = [name for name in self.names if name in models or rewards.is_batch(name)]
        self.hack_rule = rewards.combine(g.hack_rule)
        self.fields = {"max_tokens": g.max_new_tokens, "overlong_buffer": g.overlong_buffer,
                       "reward_seed": g.reward_seed}

    @classmethod
    def load(cls, g: GRPOConfig, sources: Sequence[PromptSource]) -> RewardSet:
        """The run's rewards with the reward models of grpo.reward_models loaded (each
        scoring up to 64 rows per call); ConfigError naming one that does not load."""
        models = {}
        for name, workdir in parse_reward_models(g.reward_models).items():
            try:
                models[name] = reward_model_scorer(workdir, batch_size=min(64, g.prompts_per_step * g.group_size))
            except ValueError as e:
                raise ConfigError(f"grpo.reward_models {name}: {e}") from None
        return cls(g, sources, models)

    def score(self, sources: np.ndarray, problems: Sequence[Problem], comp: Completions) -> Scores:
        """Scores of completion i for problems[i] from source sources[i] (int [B]), each
        source with its own rewards; reward models score each source's rows in one call."""
        n = len(problems)
        out = Scores(reward=np.zeros(n, np.float32), accuracy=np.zeros(n, np.float32), checked=np.zeros(n, bool),
                     format=np.zeros(n, np.float32), parts={name: np.zeros(n, np.float32) for name in self.names},
                     scored={name: np.zeros(n, bool) for name in self.names}, rm=np.zeros(n),
                     rm_scored=np.zeros(n, bool), rule=np.zeros(n, np.float32), guarded=np.zeros(n, bool),
                     source=np.asarray(sources, np.int64).reshape(n))
        for s in np.unique(sources):
            idx = np.flatnonzero(sources == s)
            sub, part = [problems[i] for i in idx], comp.take(idx)
            texts = list(part.texts)
            prompts = [p.prompt for p in sub]
            fields = [dict(p.fields, completion_tokens=int(part.lengths[i]), **self.fields) for i, p in enumerate(sub)]
            out.reward[idx], values = self.per_source[s].batch(prompts, texts, fields)
            for name, v in values.items():
                out.parts[name][idx] = v
                out.scored[name][idx] = True
            out.checked[idx] = [p.checkable for p in sub]
            out.accuracy[idx] = [rewards.accuracy(p.prompt, t, **p.fields) if p.checkable else 0.0
                                 for p, t in zip(sub, texts)]
            out.format[idx] = [rewards.format_reward(p.prompt, t) for p, t in zip(sub, texts)]
            if self.uses_rm[s]:
                bare = [dict(p.fields, completion_tokens=int(part.lengths[i])) for i, p in enumerate(sub)]
                out.rule[idx] = self.hack_rule.batch(prompts, texts, bare)[0]
                out.guarded[idx] = True
        names = self.rm_names
        if names:
            seen = np.stack([out.scored[name] for name in names])
            total = np.where(seen, np.stack([out.parts[name] for name in names]), 0).sum(0)
            out.rm_scored = seen.any(0)
            out.rm = np.where(out.rm_scored, total / np.maximum(seen.sum(0), 1), 0.0)
        return out
