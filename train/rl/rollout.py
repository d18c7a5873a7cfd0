"""GRPO's rollouts (DeepSeek-R1 §2.2.1): groups of G completions of each prompt, sampled
with the step's own parameters, and the training rows built from them.

One round draws the step's prompts, completes each G times with `eval.completions`
(`dsjax.generate` where the parameters are: no copy of the model) and scores the rows.
With dynamic sampling (DAPO) rounds go on until enough groups have reward spread (a group
whose rewards are all equal has zero advantages and teaches nothing); groups without
spread fill what is missing.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import jax
import numpy as np

from eval.completions import Completions, complete, encode_prompts
from eval.tasks import Problem
from train.rl.config import GRPOConfig
from train.rl.rewards import Scores


@dataclasses.dataclass(frozen=True)
class Group:
    """One prompt's G completions and their scores; `spread`: whether the rewards differ
    within the group (its advantages are not all 0)."""

    problem: Problem
    completions: Completions
    scores: Scores
    spread: bool


@dataclasses.dataclass
class Rollout:
    """One step's groups, their rows in group order, and what sampling them cost.

    Attributes:
      groups: P groups.
      completions / scores: their P x G rows, group by group.
      first_round_zero_std: the share of the first round's groups without reward spread.
      rounds: sampling rounds run; seconds: their wall time.
    """

    groups: list[Group]
    completions: Completions
    scores: Scores
    first_round_zero_std: float
    rounds: int
    seconds: float

    @property
    def problems(self) -> list[Problem]:
        return [grp.problem for grp in self.groups]

    def batch(self, tokenizer, width: int, seq: int, advantages: np.ndarray) -> dict[str, np.ndarray]:
        """The training rows (`rollout_batch`) of the groups' completions, each after its
        prompt right-padded to `width`; advantages: float [P x G]."""
        group_size = len(self.completions.texts) // len(self.groups)
        ids, lengths = encode_prompts(tokenizer, [p.prompt for p in self.problems], width)
        return rollout_batch(np.repeat(ids, group_size, axis=0), np.repeat(lengths, group_size),
                             self.completions, seq, advantages)


class GroupSampler:
    """Samples a step's groups: prompts x G completions with the policy's parameters.

    Args:
      model: the module that generates (the policy's architecture, in its rollout MLA form).
      tokenizer / width: encode the prompts, right-padded to `width` tokens.
      stop_token: the token that ends a completion.
      g: the run's GRPOConfig (group_size, prompts_per_step, sampling, dynamic sampling).
      mesh / rules: where the parameters live, as `dsjax.generate`.
    """

    def __init__(self, model, tokenizer, width: int, stop_token: int, g: GRPOConfig, mesh=None, rules=None):
        self.model, self.tokenizer, self.width, self.stop_token = model, tokenizer, width, stop_token
        self.g, self.mesh, self.rules = g, mesh, rules

    def complete(self, variables, prompts: Sequence[str], rng) -> Completions:
        """One sampled completion per prompt."""
        g = self.g
        return complete(self.model, variables, self.tokenizer, prompts, self.width, max_new_tokens=g.max_new_tokens,
                        temperature=g.temperature, top_p=g.top_p, top_k=g.top_k, rng=rng, speculative=g.speculative,
                        stop_token=self.stop_token, mesh=self.mesh, rules=self.rules)

    def __call__(self, variables, draw: Callable[[], list[tuple[int, Problem]]],
                 score: Callable[[np.ndarray, list[Problem], Completions], Scores], rng) -> Rollout:
        """prompts_per_step groups.

        Args:
          variables: the policy's {'params', 'moe_bias'} (device arrays, where they are).
          draw: () -> [(source index, problem)], the next prompts_per_step prompts.
          score: (sources int [B], problems [B], completions) -> Scores.
          rng: the step's key (each round folds in its number).
        Returns:
          a Rollout: the groups with spread first (all groups without dynamic sampling).
        """
        g, G = self.g, self.g.group_size
        t0 = time.time()
        kept, flat = [], []
        first_zero = None
        rounds = 0
        while rounds < (g.max_sampling_rounds if g.dynamic_sampling else 1):
            picked = draw()
            repeated = [problem for _, problem in picked for _ in range(G)]
            sources = np.repeat([s for s, _ in picked], G)
            comp = self.complete(variables, [p.prompt for p in repeated], jax.random.fold_in(rng, rounds))
            scores = score(sources, repeated, comp)
            spread = scores.reward.reshape(-1, G).std(axis=1) > 0
            if first_zero is None:
                first_zero = float(1.0 - spread.mean())
            rows = [slice(i * G, (i + 1) * G) for i in range(len(picked))]
            groups = [Group(problem, comp.take(r), scores.take(r), bool(spread[i]))
                      for i, ((_, problem), r) in enumerate(zip(picked, rows))]
            for grp in groups:
                (kept if grp.spread or not g.dynamic_sampling else flat).append(grp)
            rounds += 1
            if len(kept) >= g.prompts_per_step:
                break
        groups = (kept + flat)[:g.prompts_per_step]
        return Rollout(groups=groups, completions=Completions.concat([grp.completions for grp in groups]),
                       scores=Scores.concat([grp.scores for grp in groups]), first_round_zero_std=first_zero,
                       rounds=rounds, seconds=time.time() - t0)


def rollout_batch(prompt_ids: np.ndarray, prompt_lengths: np.ndarray, comp: Completions, seq: int,
                  advantages: np.ndarray) -> dict[str, np.ndarray]:
    """Training rows of sampled completions: prompt + completion left-aligned in `seq` tokens.

    Args:
      prompt_ids: int [B, P], right-padded; prompt_lengths: int [B].
      comp: B completions.
      seq: tokens of a row (P + the most new tokens).
      advantages: [B].
    Returns:
      inputs / targets int32 [B, seq - 1]; mask bool [B, seq - 1] (the targets that are
      completion tokens, the stop token included); advantages float32 [B]; rollout_logp
      float32 [B, seq - 1], the sampler's log-probabilities at the masked targets.
    """
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
