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
import functools
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.decoding import GenerateOutput
from eval.completions import Completions, ProcessRows, encode_prompts, generate_rows, read_rows
from eval.tasks import Problem
from train.rl.config import GRPOConfig
from train.rl.rewards import Scores


@dataclasses.dataclass
class Rollout:
    """One step's groups: their P x G rows in group order (row r: problem r // G), every
    row's scores and lengths (the same on every process), and the completions of the rows
    this process's devices hold.

    Attributes:
      problems: the P groups' problems.
      scores: all P x G rows' scores; lengths: int [P x G]; truncated: bool [P x G].
      sharding: how the rows are split over the devices (where they were decoded).
      held: int [b], the rows this process holds; completions: theirs (b rows).
      first_round_zero_std: the share of the first round's groups without reward spread.
      rounds: sampling rounds run; seconds: their wall time.
      acceptance_rate / tokens_per_forward: speculative decoding's counters (first round).
    """

    problems: list[Problem]
    scores: Scores
    lengths: np.ndarray
    truncated: np.ndarray
    sharding: jax.sharding.Sharding
    held: np.ndarray
    completions: Completions
    first_round_zero_std: float
    rounds: int
    seconds: float
    acceptance_rate: float = 0.0
    tokens_per_forward: float = 1.0

    def batch(self, tokenizer, width: int, seq: int, advantages: np.ndarray) -> dict[str, np.ndarray]:
        """The training rows (`rollout_batch`) of the held completions, each after its
        prompt right-padded to `width`; advantages: float [P x G], every row's."""
        group_size = len(self.lengths) // len(self.problems)
        ids, lengths = encode_prompts(tokenizer, [p.prompt for p in self.problems], width)
        group = self.held // group_size
        return rollout_batch(ids[group], lengths[group], self.completions, seq, np.asarray(advantages)[self.held])


@functools.partial(jax.jit, static_argnames=("shardings",))
def _take(rounds: tuple[tuple[jax.Array, ...], ...], rows: jax.Array, shardings) -> tuple[jax.Array, ...]:
    picked = (jnp.concatenate(parts)[rows] for parts in zip(*rounds))
    return tuple(jax.lax.with_sharding_constraint(p, s) for p, s in zip(picked, shardings))


def pick_rows(rounds: Sequence[GenerateOutput], rows: np.ndarray) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(tokens, logprobs, lengths) of `rows` (int [B], indices into the rounds' rows one
    after another), split over the devices as a round's are: the kept groups' rows move on
    the devices to where the training batch's rows are."""
    first = rounds[0]
    if len(rounds) == 1 and np.array_equal(rows, np.arange(first.tokens.shape[0])):
        return first.tokens, first.logprobs, first.lengths
    parts = tuple((o.tokens, o.logprobs, o.lengths) for o in rounds)
    return _take(parts, np.asarray(rows, np.int32), shardings=tuple(x.sharding for x in parts[0]))


class GroupSampler:
    """Samples a step's groups: prompts x G completions with the policy's parameters.

    Each round generates on the mesh with the rows split over the batch axes (each host
    decodes its rows; the cache is split the same way); every process scores the rows it
    answers for and the per-row scores are put together, so every process chooses the same
    groups and logs the same figures. The kept groups' completions are gathered on the
    devices into the step's rows, split as the training batch is.

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

    def generate(self, variables, prompts: Sequence[str], rng) -> GenerateOutput:
        """One sampled completion per prompt, left on the devices split by rows. Sampling
        draws from one key for the whole batch, so a row's tokens depend on its place in
        the batch and not on the processes or devices that decode it."""
        g = self.g
        return generate_rows(self.model, variables, self.tokenizer, prompts, self.width,
                             max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
                             top_k=g.top_k, rng=rng, speculative=g.speculative, stop_token=self.stop_token,
                             mesh=self.mesh, rules=self.rules)

    def __call__(self, variables, draw: Callable[[], list[tuple[int, Problem]]],
                 score: Callable[[np.ndarray, list[Problem], Completions], Scores], rng) -> Rollout:
        """prompts_per_step groups.

        Args:
          variables: the policy's {'params', 'moe_bias'} (device arrays, where they are).
          draw: () -> [(source index, problem)], the next prompts_per_step prompts (every
            process draws the same).
          score: (sources int [b], problems [b], completions) -> Scores of b rows.
          rng: the step's key (each round folds in its number).
        Returns:
          a Rollout: the groups with spread first (all groups without dynamic sampling).
        """
        g, G = self.g, self.g.group_size
        t0 = time.time()
        outputs, kept, flat, problems, scores, lengths, truncated = [], [], [], [], [], [], []
        first_zero, counters = None, (0.0, 1.0)
        rounds = 0
        while rounds < (g.max_sampling_rounds if g.dynamic_sampling else 1):
            picked = draw()
            repeated = [problem for _, problem in picked for _ in range(G)]
            sources = np.repeat([s for s, _ in picked], G)
            out = self.generate(variables, [p.prompt for p in repeated], jax.random.fold_in(rng, rounds))
            share = ProcessRows.of(out.tokens)
            own = share.own
            comp = read_rows(out, self.tokenizer, own, self.stop_token)
            every = share.gather({"length": comp.lengths, "truncated": comp.truncated})
            round_scores = score(sources[own], [repeated[i] for i in own], comp).gather(share)
            if rounds == 0 and g.speculative:
                counters = (out.acceptance_rate, out.tokens_per_forward)
            spread = round_scores.reward.reshape(-1, G).std(axis=1) > 0
            if first_zero is None:
                first_zero = float(1.0 - spread.mean())
            base = len(problems) * G  # the round's first row among all rounds' rows
            for i, (_, problem) in enumerate(picked):
                (kept if spread[i] or not g.dynamic_sampling else flat).append((problem, base + i * G))
            outputs.append(out)
            problems += [problem for _, problem in picked]
            scores.append(round_scores)
            lengths.append(every["length"])
            truncated.append(every["truncated"])
            rounds += 1
            if len(kept) >= g.prompts_per_step:
                break
        groups = (kept + flat)[:g.prompts_per_step]
        rows = np.concatenate([np.arange(first, first + G) for _, first in groups])
        tokens, logprobs, lens = pick_rows(outputs, rows)
        picked_out = GenerateOutput(tokens, logprobs, lens, *(np.int32(0),) * 3)
        held = ProcessRows.of(tokens).held
        return Rollout(problems=[problem for problem, _ in groups], scores=Scores.concat(scores).take(rows),
                       lengths=np.concatenate(lengths)[rows], truncated=np.concatenate(truncated)[rows],
                       sharding=tokens.sharding, held=held,
                       completions=read_rows(picked_out, self.tokenizer, held, self.stop_token),
                       first_round_zero_std=first_zero, rounds=rounds, seconds=time.time() - t0,
                       acceptance_rate=counters[0], tokens_per_forward=counters[1])


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
