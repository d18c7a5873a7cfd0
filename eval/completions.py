"""Complete prompts with the model through `dsjax.generate`, a batch at a time.

Prompts are encoded and right-padded to one fixed width (so generation compiles once)
and each completion is decoded up to the stop token. GRPO's rollouts, the held-out
evaluations and rejection sampling all complete prompts this way.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np

from dsjax.decoding import generate


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

    def take(self, rows) -> Completions:
        """The completions at `rows` (an index array or a slice); the counters stay."""
        picked = np.arange(len(self.texts))[rows]
        return dataclasses.replace(self, tokens=self.tokens[rows], logprobs=self.logprobs[rows],
                                   lengths=self.lengths[rows], texts=[self.texts[i] for i in picked],
                                   truncated=self.truncated[rows])

    @classmethod
    def concat(cls, parts: Sequence[Completions]) -> Completions:
        """The rows of `parts` one after another (the counters of the first part)."""
        cat = lambda name: np.concatenate([getattr(p, name) for p in parts])  # noqa: E731
        return cls(tokens=cat("tokens"), logprobs=cat("logprobs"), lengths=cat("lengths"),
                   texts=[t for p in parts for t in p.texts], truncated=cat("truncated"),
                   acceptance_rate=parts[0].acceptance_rate, tokens_per_forward=parts[0].tokens_per_forward)


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
    """One completion per prompt (repeat a prompt for several samples).

    Args:
      model / variables: a dsjax.Transformer and its variables, used where they are
        (sharded under `mesh` with `rules`, as `dsjax.generate`); only the completions
        come to the host.
      tokenizer: encodes the prompts and decodes the completions.
      prompts: B texts, each encoding to at most `width` tokens.
      width: the prompt width P every batch is padded to (one compile for every batch).
      max_new_tokens: N, the most tokens a completion has.
      temperature / top_p / top_k / rng / speculative: sampling, as `dsjax.generate`.
      stop_token: the token that ends a completion (default: the tokenizer's EOS).
    Returns:
      Completions of B rows.
    """
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
