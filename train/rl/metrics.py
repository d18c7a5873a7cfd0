"""What a GRPO step logs about its rollouts: rewards, accuracy and format rate, completion
lengths, sampling cost, each prompt source's own figures, and the reward-hacking guard.

The guard (R1's last RL stage scores general prompts with reward models, which a policy
can learn to please): among a source's completions, the share that fails a rule-based
check (grpo.hack_rule) while the reward model scores them above the mean of those that
pass (`<source>/rm_high_rule_fail`). `HackGuard` warns in the log when it passes
grpo.hack_warn.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from train.rl.rewards import Scores
from train.rl.rollout import Rollout


def mean_where(values: np.ndarray, where: np.ndarray) -> float:
    """The mean of `values` [B] over the rows where `where` (bool [B]) holds, in the
    values' dtype (as np.nanmean computes it with the other rows left out)."""
    total = np.where(where, values, 0).sum()
    return float(total.dtype.type(total / where.sum()))


def rollout_metrics(ro: Rollout, labels: Sequence[str], speculative: bool = False) -> dict[str, float]:
    """The figures of one step's rollout.

    Args:
      ro: the step's groups.
      labels: the prompt sources' names, in order (a run of several sources logs each
        one's share and figures, `<label>/...`; a single source only with a reward model).
      speculative: the rollouts were drafted by the MTP module (its counters are logged).
    Returns:
      {name: value}: reward_mean/std, accuracy (where defined), format_rate, reward/<name>
      per reward, rm_score, frac_reward_zero_std (of the first sampling round), completion
      lengths, truncated_frac, rollout_s, rollout_tokens_per_s, sampling_rounds, and the
      per-source figures of `source_metrics`.
    """
    s, lengths = ro.scores, ro.lengths
    generated = float(lengths.sum())
    out = {"reward_mean": float(s.reward.mean()), "reward_std": float(s.reward.std()),
           "format_rate": float(s.format.mean()),
           "frac_reward_zero_std": ro.first_round_zero_std, "completion_len": float(lengths.mean()),
           "completion_len_max": float(lengths.max()), "truncated_frac": float(ro.truncated.mean()),
           "rollout_s": ro.seconds, "rollout_tokens_per_s": generated * ro.rounds / max(ro.seconds, 1e-9),
           "sampling_rounds": float(ro.rounds)}
    if s.checked.any():
        out["accuracy"] = mean_where(s.accuracy, s.checked)
    for name, values in s.parts.items():
        if s.scored[name].any():
            out[f"reward/{name}"] = mean_where(values, s.scored[name])
    if s.rm_scored.any():
        out["rm_score"] = mean_where(s.rm, s.rm_scored)
    if len(labels) > 1:
        for i, label in enumerate(labels):
            rows = s.source == i
            out[f"{label}/share"] = float(rows.mean())
            if rows.any():
                out.update(source_metrics(label, s, rows, lengths))
    elif s.rm_scored.any():
        out.update(source_metrics(labels[0], s, np.ones(len(s), bool), lengths))
    if speculative:
        out.update(spec_acceptance=ro.acceptance_rate, spec_tokens_per_forward=ro.tokens_per_forward)
    return out


def source_metrics(label: str, s: Scores, rows: np.ndarray, lengths: np.ndarray) -> dict[str, float]:
    """One source's figures, `<label>/...`.

    Args:
      label: the source's name.
      s: the step's scores; rows: bool [B], the source's rows.
      lengths: int [B], the completions' lengths.
    Returns:
      reward_mean, format_rate, completion_len, accuracy (where defined), each of its
      rewards; for a source the guard watches, rm_score, hack_rule_rate (the share that
      passes grpo.hack_rule) and rm_high_rule_fail (the guard's share).
    """
    out = {f"{label}/reward_mean": float(s.reward[rows].mean()),
           f"{label}/format_rate": float(s.format[rows].mean()),
           f"{label}/completion_len": float(lengths[rows].mean())}
    if s.checked[rows].any():
        out[f"{label}/accuracy"] = mean_where(s.accuracy[rows], s.checked[rows])
    for name, values in s.parts.items():
        if s.scored[name][rows].any():
            out[f"{label}/{name}"] = mean_where(values[rows], s.scored[name][rows])
    if s.guarded[rows].any() and s.rm_scored[rows].any():
        score, passing = s.rm[rows], s.rule[rows] > 0
        out[f"{label}/rm_score"] = mean_where(score, s.rm_scored[rows])
        out[f"{label}/hack_rule_rate"] = float(passing.mean())
        if passing.any():
            out[f"{label}/rm_high_rule_fail"] = float((~passing & (score > score[passing].mean())).mean())
    return out


class HackGuard:
    """Warns when a source's reward-hacking share (`<label>/rm_high_rule_fail`) passes
    `warn_above`, at most once every `every` steps."""

    def __init__(self, labels: Sequence[str], rule: str, warn_above: float, every: int):
        self.labels, self.rule, self.warn_above, self.every = list(labels), rule, warn_above, every
        self.warned_at: int | None = None

    def check(self, step: int, metrics: dict[str, float]) -> list[str]:
        """The warnings of 0-based `step` given its metrics (one line each)."""
        lines = []
        for label in self.labels:
            share = metrics.get(f"{label}/rm_high_rule_fail")
            if share is None or share <= self.warn_above:
                continue
            if self.warned_at is not None and step - self.warned_at < self.every:
                continue
            self.warned_at = step
            lines.append(f"step {step + 1}: possible reward hacking in {label}: {share:.0%} of its completions "
                         f"fail {self.rule} yet the reward model scores them like those that pass (completion "
                         f"length {metrics.get(label + '/completion_len', 0):.1f})")
        return lines
