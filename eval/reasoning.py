"""Reasoning evaluation as DeepSeek-R1 reports it, and rejection sampling (R1 §2.3.3).

`evaluate` scores greedy completions of held-out problems (accuracy, format rate, length:
what a training run logs at each evaluation). `sample_problems` draws K completions per
problem through `dsjax.generate` (in fixed-size batches, so generation compiles once) and
scores each with the reward registry.
`report` turns them into pass@1 (mean correctness over the K samples, R1's metric),
pass@k with the unbiased estimator of Chen et al. (2021), maj@K (majority vote over the
parsed answers, R1's cons@64), the format rate, lengths and tokens/s. `rejection_sample`
keeps the samples that are correct and well formed (optionally only the shortest per
problem, de-duplicated) as SFT examples `{"prompt", "response"}` that `python -m train
sft` reads as they are.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import time
from typing import Iterable, Sequence

import jax
import numpy as np

from eval import rewards as rewards_lib
from eval.completions import ProcessRows, complete, generate_rows, prompt_width, read_rows
from eval.tasks import Problem


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    # The product form avoids huge binomials: C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k/i).
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def vote_key(answer: str | None, fields: dict) -> str | None:
    """The canonical form answers are voted on: integers normalized ('007' -> '7'),
    expressions without spaces; None for a missing or unparseable answer."""
    if answer is None:
        return None
    if "answer" in fields:
        return rewards_lib.normalize_int(answer)
    text = "".join(answer.split())
    return text or None


def majority_vote(keys: Sequence[str | None]) -> str | None:
    """The most frequent non-None key; a tie goes to the one seen first; None when every
    answer is unparseable."""
    counts = collections.Counter(k for k in keys if k is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(k for k in keys if k is not None and counts[k] == best)


@dataclasses.dataclass
class Sample:
    """One scored completion of `problem`."""

    problem: Problem
    text: str
    tokens: int
    truncated: bool
    correct: bool
    well_formed: bool
    rewards: dict[str, float]

    def record(self) -> dict:
        return {"prompt": self.problem.prompt, "completion": self.text, "answer": self.problem.answer,
                "tokens": self.tokens, "truncated": self.truncated, "correct": self.correct,
                "format": self.well_formed, "rewards": self.rewards}


def sample_problems(model, variables, tokenizer, problems: Sequence[Problem], *, samples: int,
                    max_new_tokens: int, temperature: float = 0.6, top_p: float = 1.0, top_k: int = 0,
                    batch_size: int = 256, seed: int = 0, speculative: bool = False,
                    rewards: str = "accuracy:1,format:0.1", stop_token: int | None = None,
                    progress: bool = False, mesh=None, rules=None) -> tuple[list[list[Sample]], dict[str, float]]:
    """`samples` completions of every problem, scored; ([problem][sample], timing) where
    timing holds `seconds`, `generated_tokens` and `tokens_per_s`. With temperature 0
    every sample is the greedy completion (ask for one). `mesh`/`rules` as `dsjax.generate`."""
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    reward_fn = rewards_lib.combine(rewards)
    rows = [(i, p) for i, p in enumerate(problems) for _ in range(samples)]
    width = prompt_width(tokenizer, [p.prompt for p in problems])
    batch_size = max(1, min(batch_size, len(rows)))
    out: list[list[Sample]] = [[] for _ in problems]
    rng = jax.random.key(seed)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(rows), desc="sampling", unit="completion", dynamic_ncols=True)
    generated, start = 0, time.time()
    for b, at in enumerate(range(0, len(rows), batch_size)):
        chunk = rows[at:at + batch_size]
        padded = chunk + [chunk[0]] * (batch_size - len(chunk))  # one shape: one compile
        comp = complete(model, variables, tokenizer, [p.prompt for _, p in padded], width,
                        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                        rng=jax.random.fold_in(rng, b) if temperature > 0 else None, speculative=speculative,
                        stop_token=stop_token, mesh=mesh, rules=rules)
        for j, (i, problem) in enumerate(chunk):
            n = int(comp.lengths[j])
            fields = dict(problem.fields, completion_tokens=n, max_tokens=max_new_tokens)
            _, parts = reward_fn(problem.prompt, comp.texts[j], **fields)
            out[i].append(Sample(problem=problem, text=comp.texts[j], tokens=n, truncated=bool(comp.truncated[j]),
                                 correct=bool(rewards_lib.accuracy(problem.prompt, comp.texts[j], **problem.fields)),
                                 well_formed=bool(rewards_lib.format_reward(problem.prompt, comp.texts[j])),
                                 rewards=parts))
            generated += n
        if bar is not None:
            bar.update(len(chunk))
            bar.set_postfix(acc=f"{np.mean([s.correct for g in out for s in g]):.3f}")
    if bar is not None:
        bar.close()
    seconds = time.time() - start
    return out, {"seconds": seconds, "generated_tokens": generated, "tokens_per_s": generated / max(seconds, 1e-9)}


def evaluate(model, variables, tokenizer, problems: Sequence[Problem], *, max_new_tokens: int,
             batch_size: int = 256, width: int | None = None, stop_token: int | None = None, mesh=None,
             rules=None) -> dict[str, float]:
    """Greedy accuracy, format rate and mean completion length over `problems`.

    Each process scores the completions its devices decoded (the rows split over the mesh's
    batch axes) and the per-row figures are put together, so every process returns the
    same figures, those of one process.

    Args:
      model / variables / tokenizer: as `eval.completions.complete`.
      problems: problems with checkable answers (a task's split).
      max_new_tokens: the most tokens a completion has.
      batch_size: rows per generation call (the last batch padded with repeats, so one
        compile).
      width: the prompt width (default: the longest prompt, rounded up).
      stop_token / mesh / rules: as `complete`.
    Returns:
      {'accuracy', 'format_rate', 'completion_len'}.
    """
    prompts = [p.prompt for p in problems]
    width = width or prompt_width(tokenizer, prompts)
    batch_size = min(batch_size, len(prompts))
    acc, fmt, lens = [], [], []
    for start in range(0, len(prompts), batch_size):
        chunk = list(problems[start:start + batch_size])
        padded = chunk + [chunk[0]] * (batch_size - len(chunk))
        out = generate_rows(model, variables, tokenizer, [p.prompt for p in padded], width,
                            max_new_tokens=max_new_tokens, stop_token=stop_token, mesh=mesh, rules=rules)
        share = ProcessRows.of(out.tokens)
        own = share.own
        comp = read_rows(out, tokenizer, own, stop_token)
        mine = [padded[i] for i in own]
        every = share.gather({
            "accuracy": np.asarray([rewards_lib.accuracy(p.prompt, t, **p.fields) for p, t in zip(mine, comp.texts)],
                                   np.float32),
            "format": np.asarray([rewards_lib.format_reward(p.prompt, t) for p, t in zip(mine, comp.texts)],
                                 np.float32),
            "length": comp.lengths})
        acc += list(every["accuracy"][:len(chunk)])
        fmt += list(every["format"][:len(chunk)])
        lens += list(every["length"][:len(chunk)])
    return {"accuracy": float(np.mean(np.asarray(acc, np.float32))),
            "format_rate": float(np.mean(np.asarray(fmt, np.float32))), "completion_len": float(np.mean(lens))}


def report(groups: Sequence[Sequence[Sample]], timing: dict | None = None) -> dict[str, float]:
    """pass@1, pass@k (k = 2, 4, ... up to the samples), maj@K, format rate, lengths and
    tokens/s of scored samples grouped per problem (every group the same size)."""
    if not groups or not groups[0]:
        raise ValueError("no samples to report on")
    k_all = len(groups[0])
    if any(len(g) != k_all for g in groups):
        raise ValueError("every problem needs the same number of samples")
    flat = [s for g in groups for s in g]
    out: dict[str, float] = {"problems": len(groups), "samples": k_all,
                             "pass@1": float(np.mean([s.correct for s in flat]))}
    k = 2
    while k <= k_all:
        out[f"pass@{k}"] = float(np.mean([pass_at_k(k_all, sum(s.correct for s in g), k) for g in groups]))
        k *= 2
    if k_all > 1:
        maj = []
        for g in groups:
            keys = [vote_key(rewards_lib.answer_of(s.text), s.problem.fields) for s in g]
            voted = majority_vote(keys)
            sample = next((s for s, key in zip(g, keys) if key == voted), None)
            maj.append(voted is not None and sample is not None and sample.correct)
        out[f"maj@{k_all}"] = float(np.mean(maj))
    out["format_rate"] = float(np.mean([s.well_formed for s in flat]))
    out["truncated_frac"] = float(np.mean([s.truncated for s in flat]))
    out["mean_len"] = float(np.mean([s.tokens for s in flat]))
    out["max_len"] = int(max(s.tokens for s in flat))
    if timing:
        out["tokens_per_s"] = float(timing["tokens_per_s"])
        out["seconds"] = float(timing["seconds"])
    return out


def accepted(groups: Iterable[Sequence[Sample]], shortest: bool = False, dedup: bool = True) -> list[Sample]:
    """The samples that pass (correct and well formed, not truncated): all of them, or the
    shortest per problem; `dedup` drops a repeated (prompt, completion)."""
    kept, seen = [], set()
    for group in groups:
        passing = [s for s in group if s.correct and s.well_formed and not s.truncated]
        if shortest and passing:
            passing = [min(passing, key=lambda s: (s.tokens, s.text))]
        for s in passing:
            key = (s.problem.prompt, s.text)
            if dedup and key in seen:
                continue
            seen.add(key)
            kept.append(s)
    return kept


def write_sft(samples: Sequence[Sample], path: str) -> None:
    """Accepted samples as `python -m train sft` JSONL (written to a temp file, then moved)."""
    import os

    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for s in samples:
            f.write(json.dumps({"prompt": s.problem.prompt, "response": s.text}) + "\n")
    os.replace(tmp, path)


def write_samples(groups: Sequence[Sequence[Sample]], path: str) -> None:
    """Every completion with its rewards, one JSON object per line."""
    with open(path, "w") as f:
        for g in groups:
            for s in g:
                f.write(json.dumps(s.record()) + "\n")


def print_table(rows: dict[str, dict[str, float]], file=None) -> None:
    """A short table for people: one row per task."""
    import sys

    file = file or sys.stderr
    cols = sorted({k for r in rows.values() for k in r if k.startswith(("pass@", "maj@"))},
                  key=lambda c: (c.split("@")[0] != "pass", int(c.split("@")[1])))
    cols += [c for c in ("format_rate", "mean_len", "tokens_per_s", "acceptance") if any(c in r for r in rows.values())]
    print(f"{'task':<18}" + "".join(f"{c:>14}" for c in cols), file=file)
    for name, r in rows.items():
        cells = "".join(f"{r[c]:>14.3f}" if isinstance(r.get(c), float) else f"{r.get(c, ''):>14}" for c in cols)
        print(f"{name:<18}" + cells, file=file)
