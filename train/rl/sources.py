"""Where GRPO's prompts come from: prompt sources (task problems or a JSONL file of
general prompts), each drawn in a seeded order, and the mixture that splits every step's
prompts among the active sources by weight (R1's last RL stage mixes reasoning prompts
with general ones)."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from dsjax.config import ConfigError
from dsjax.data import JSONLError, read_jsonl
from eval import rewards, tasks
from eval.tasks import Problem
from train.rl.config import GRPOConfig, PromptSource, parse_reward_models


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


def read_prompts(path: str, language: str = "") -> list[Problem]:
    """The general prompts of a JSONL file as problems: {"prompt": ..., other fields} per
    line (the other fields reach the rewards; `language`, when given, is the default of
    the `language` field). Raises ConfigError naming the file and line, also for a field
    named like an argument of the reward call (eval.rewards.RESERVED_FIELDS)."""
    if not os.path.isfile(path):
        raise ConfigError(f"prompt file {path} does not exist")
    try:
        rows = read_jsonl(path, numbered=True)
    except (JSONLError, UnicodeDecodeError) as e:
        raise ConfigError(str(e)) from None
    problems = []
    for n, row in rows:
        if not isinstance(row.get("prompt"), str) or not row["prompt"]:
            raise ConfigError(f"{path}:{n}: expected an object with a non-empty 'prompt' string")
        fields = {k: v for k, v in row.items() if k != "prompt"}
        clash = [k for k in fields if k in rewards.RESERVED_FIELDS]
        if clash:
            raise ConfigError(f"{path}:{n}: field '{clash[0]}' is a name the reward call "
                              f"reward(prompt, completion, **fields) passes itself (reserved: "
                              f"{', '.join(rewards.RESERVED_FIELDS[1:])}); rename it")
        if language:
            fields.setdefault("language", language)
        problems.append(Problem(prompt=row["prompt"], question=row["prompt"], fields=fields, work="",
                                answer=str(fields.get("answer", "")), key=f"{path}:{n}"))
    if not problems:
        raise ConfigError(f"prompt file {path} holds no prompts")
    return problems


def source_problems(src: PromptSource, g: GRPOConfig, seed: int) -> tuple[list[Problem], list[Problem]]:
    """(training problems, held-out test problems) of a source; a prompt file has no test
    split. Raises ConfigError when a reward needs answers the prompts do not give."""
    if src.prompts:
        pool = read_prompts(src.prompts, src.language)
        known = tuple(parse_reward_models(g.reward_models))
        needs = {"accuracy", "partial_credit"} & {name for name, _ in rewards.parse_spec(src.rewards, known=known)}
        if needs and not all(p.checkable for p in pool):
            raise ConfigError(f"grpo source {src.label}: the {sorted(needs)} reward needs an 'answer' (or "
                              f"'numbers' and 'target') in every line of {src.prompts}")
        return pool, []
    task = tasks.get(src.task, src.difficulty, template=src.template)
    try:
        pool = task.split("train", src.problems, seed=seed)
        test = task.split("test", g.eval_problems, seed=seed) if g.eval_problems else []
    except ValueError as e:
        raise ConfigError(f"grpo source {src.label}: {e}") from None
    if src.language:
        pool = [dataclasses.replace(p, fields={**p.fields, "language": src.language}) for p in pool]
    return pool, test


class PromptSampler:
    """The run's prompt sources, drawn step by step.

    Each source's training problems are walked in a seeded order (the first source's
    seeded by train.seed alone, the others by (train.seed, index)), round after round; the
    Mixture splits each step's prompts among the sources active at that step. The cursors
    and the mixture's carry are the whole state (`state` / `set_state`, in checkpoints).

    Attributes:
      sources: the PromptSources; pools: each one's training problems.
      test: the held-out problems (the first task source's test split; [] without one).
    """

    def __init__(self, sources: tuple[PromptSource, ...], g: GRPOConfig, seed: int, join_steps):
        """`join_steps[i]`: the first step at which source i draws prompts."""
        self.sources, self.prompts_per_step = sources, g.prompts_per_step
        self.join_steps = np.asarray(join_steps)
        self.pools, self.test = [], []
        for src in sources:
            pool, test = source_problems(src, g, seed)
            self.pools.append(pool)
            if test and not self.test:
                self.test = test
        self.orders = [np.random.default_rng(seed if i == 0 else [seed, i]).permutation(len(p))
                       for i, p in enumerate(self.pools)]
        self.cursors = [0] * len(sources)
        self.mixture = Mixture([src.weight for src in sources])

    def active(self, step: int) -> np.ndarray:
        """bool [sources]: which sources draw prompts at `step`."""
        return step >= self.join_steps

    def draw(self, step: int) -> list[tuple[int, Problem]]:
        """(source index, problem) of the next prompts_per_step prompts, split by weight."""
        counts = self.mixture.counts(self.prompts_per_step, self.active(step))
        picked = []
        for s, k in enumerate(counts):
            pool, order = self.pools[s], self.orders[s]
            picked += [(s, pool[order[(self.cursors[s] + i) % len(pool)]]) for i in range(int(k))]
            self.cursors[s] += int(k)
        return picked

    def state(self) -> dict:
        """What a checkpoint holds to go on drawing the same prompts."""
        return {"cursors": list(self.cursors), "carry": [float(c) for c in self.mixture.carry]}

    def set_state(self, state: dict) -> None:
        """Restores `state()`; a checkpoint of a single-source run ({'cursor': n}) as well.
        Raises ConfigError when the checkpoint has another number of sources."""
        if "cursor" in state:
            state = {"cursors": [state["cursor"]], "carry": [0.0]}
        if len(state["cursors"]) != len(self.sources):
            raise ConfigError(f"the checkpoint was written with {len(state['cursors'])} prompt sources, this "
                              f"run has {len(self.sources)}; resume with the same grpo.sources")
        self.cursors = [int(c) for c in state["cursors"]]
        self.mixture.carry = np.asarray(state["carry"], np.float64)
