"""Completions of task problems through `dsjax.generate`, and their scores.

GRPO's rollouts and the held-out evaluations use the same pieces: prompts are encoded
and right-padded to one fixed width (so generation compiles once), completions decoded
up to the stop token, and rewards computed by the registry of `eval.rewards`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import numpy as np

from dsjax.decoding import generate
from eval import rewards as rewards_lib
from eval.tasks import Problem


@dataclasses.dataclass
class Completions:
    """Generated continuations of a batch of prompts.

    Attributes:
      tokens: int32 [B, N] (0 after the stop token); logprobs: float32 [B, N], the model's
        log-probabilities at temperature 1; lengths: int32 [B] (stop token included).
      texts: the decoded completions (without the stop token).
      truncated: bool [B], no stop token within N tokens.
      acceptance_rate / tokens_per_forward: speculative decoding's counters.
    """

    tokens: np.ndarray
    logprobs: np.ndarray
    lengths: np.ndarray
    texts: list[str]
    truncated: np.ndarray
    acceptance_rate: float = 0.0
    tokens_per_forward: float = 1.0


def encode_prompts(tokenizer, prompts: Sequence[str], width: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded token ids int32 [B, width] and lengths [B]; ValueError when one is longer."""
    ids = [np.asarray(tokenizer.encode(p), np.int32) for p in prompts]
    lengths = np.asarray([len(i) for i in ids], np.int32)
    if lengths.min(initial=1) < 1:
        raise ValueError("a prompt encodes to no tokens")
    if lengths.max(initial=0) > width:
        raise ValueError(f"a prompt of {lengths.max()} tokens is longer than the prompt width {width}")
    out = np.zeros((len(ids), width), np.int32)
    for row, i in enumerate(ids):
        out[row, :len(i)] = i
    return out, lengths


def prompt_width(tokenizer, prompts: Sequence[str], multiple: int = 16) -> int:
    """The longest encoded prompt, rounded up to `multiple` tokens."""
    longest = max(len(tokenizer.encode(p)) for p in prompts)
    return -(-longest // multiple) * multiple


def complete(model, variables, tokenizer, prompts: Sequence[str], width: int, *, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, rng=None,
             speculative: bool = False, stop_token: int | None = None, mesh=None, rules=None) -> Completions:
    """One completion per prompt (repeat a prompt for several samples), ending at
    `stop_token` (default: the tokenizer's EOS). `mesh`/`rules` as `dsjax.generate`: the
    parameters are used where they are (sharded), only the completions come to the host."""
    ids, lengths = encode_prompts(tokenizer, prompts, width)
    stop_token = tokenizer.eos_id if stop_token is None else stop_token
    stop = () if stop_token is None else (int(stop_token),)
    out = generate(model, variables, ids, lengths, max_new_tokens, temperature=temperature, rng=rng,
                   speculative=speculative, top_k=top_k, top_p=top_p, stop_tokens=stop, prompt_bucket=width,
                   mesh=mesh, rules=rules)
    tokens, logprobs, lens = jax.device_get((out.tokens, out.logprobs, out.lengths))
    tokens, lens = np.asarray(tokens), np.asarray(lens)
    ended = np.zeros(len(lens), bool)
    texts = []
    for row, n in enumerate(lens):
        body = tokens[row, :n]
        if n and stop and body[-1] == stop[0]:
            ended[row] = True
            body = body[:-1]
        texts.append(tokenizer.decode(body))
    return Completions(tokens=tokens, logprobs=np.asarray(logprobs), lengths=lens, texts=texts,
                       truncated=~ended, acceptance_rate=out.acceptance_rate if speculative else 0.0,
                       tokens_per_forward=out.tokens_per_forward if speculative else 1.0)


def checkable(problem: Problem) -> bool:
    """Whether a program can check an answer to `problem` (a task problem, or a general
    prompt that carries `answer` or `numbers`/`target`)."""
    return "answer" in problem.fields or ("numbers" in problem.fields and "target" in problem.fields)


def score(problems: Sequence[Problem], completions: Completions, reward_fn: Callable, **extra) -> dict:
    """Rewards of completions[i] for problems[i]: {'reward': [B], 'parts': {name: [B]},
    'accuracy': [B], 'format': [B]} (accuracy and format always, whatever the reward;
    accuracy is NaN for a problem without a checkable answer)."""
    texts = list(completions.texts)
    fields = [dict(problem.fields, completion_tokens=int(completions.lengths[i]), **extra)
              for i, problem in enumerate(problems)]
    prompts = [problem.prompt for problem in problems]
    if hasattr(reward_fn, "batch"):  # rewards.combine: batch rewards (reward models) in one call
        totals, parts = reward_fn.batch(prompts, texts, fields)
    else:
        totals, parts = [], {}
        for prompt, text, f in zip(prompts, texts, fields):
            total, values = reward_fn(prompt, text, **f)
            totals.append(total)
            for name, value in values.items():
                parts.setdefault(name, []).append(value)
    acc = [rewards_lib.accuracy(p.prompt, text, **p.fields) if checkable(p) else np.nan
           for p, text in zip(problems, texts)]
    fmt = [rewards_lib.format_reward(p.prompt, text) for p, text in zip(problems, texts)]
    return {"reward": np.asarray(totals, np.float32), "parts": {k: np.asarray(v, np.float32) for k, v in parts.items()},
            "accuracy": np.asarray(acc, np.float32), "format": np.asarray(fmt, np.float32)}


def evaluate(model, variables, tokenizer, problems: Sequence[Problem], *, max_new_tokens: int,
             batch_size: int = 256, width: int | None = None, stop_token: int | None = None, mesh=None,
             rules=None) -> dict[str, float]:
    """Greedy accuracy, format rate and mean completion length over `problems`.

    Runs in batches of `batch_size` rows (the last padded with repeats, so one compile),
    on `mesh` with `rules` as `complete`.
    """
    prompts = [p.prompt for p in problems]
    width = width or prompt_width(tokenizer, prompts)
    batch_size = min(batch_size, len(prompts))
    acc, fmt, lens = [], [], []
    for start in range(0, len(prompts), batch_size):
        chunk = list(problems[start:start + batch_size])
        padded = chunk + [chunk[0]] * (batch_size - len(chunk))
        comp = complete(model, variables, tokenizer, [p.prompt for p in padded], width,
                        max_new_tokens=max_new_tokens, stop_token=stop_token, mesh=mesh, rules=rules)
        scores = score(padded, comp, lambda *a, **k: (0.0, {}))
        acc += list(scores["accuracy"][:len(chunk)])
        fmt += list(scores["format"][:len(chunk)])
        lens += list(comp.lengths[:len(chunk)])
    return {"accuracy": float(np.mean(acc)), "format_rate": float(np.mean(fmt)),
            "completion_len": float(np.mean(lens))}
