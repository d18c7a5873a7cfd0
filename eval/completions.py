"""Complete prompts with the model through `dsjax.generate`, a batch at a time.

Prompts are encoded and right-padded to one fixed width (so generation compiles once)
and each completion is decoded up to the stop token. GRPO's rollouts, the held-out
evaluations and rejection sampling all complete prompts this way.

On many hosts (one process each) `generate_rows` leaves the completions on the devices,
split by rows over the mesh's batch axes; `ProcessRows` says which rows this process holds
and which it answers for (scores, counts), reads them, and puts the per-row figures of
every process together (`ProcessRows.gather`), so each process computes the same
statistics without any process reading every completion.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from dsjax.decoding import GenerateOutput, generate


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


@dataclasses.dataclass(frozen=True)
class ProcessRows:
    """Which rows of a row-split array [B, ...] this process holds and answers for.

    Attributes:
      held: int [b], ascending: the rows on this process's devices.
      owner: int [B], the process that answers for each row: the lowest-numbered one
        holding it (a row replicated over several processes is counted once).
      process: this process's index.
    """

    held: np.ndarray
    owner: np.ndarray
    process: int

    @classmethod
    def of(cls, x: jax.Array) -> ProcessRows:
        """The rows of `x` (split, or replicated, along its first axis)."""
        n = x.shape[0]
        owner = np.full(n, np.iinfo(np.int32).max, np.int64)
        for device, index in x.sharding.devices_indices_map(x.shape).items():
            rows = np.arange(n)[index[0]]
            owner[rows] = np.minimum(owner[rows], device.process_index)
        held = np.unique(np.concatenate([np.arange(n)[index[0]] for index in
                                         x.sharding.addressable_devices_indices_map(x.shape).values()]))
        return cls(held=held, owner=owner, process=jax.process_index())

    @property
    def own(self) -> np.ndarray:
        """int [m], ascending: the rows this process answers for (a subset of `held`)."""
        return np.flatnonzero(self.owner == self.process)

    def read(self, x: jax.Array, rows: np.ndarray) -> np.ndarray:
        """The values of `x` at `rows` (global row indices, all held here), in that order."""
        n = x.shape[0]
        where = np.full(n, -1)
        where[rows] = np.arange(len(rows))
        out = np.empty((len(rows),) + x.shape[1:], x.dtype)
        filled = np.zeros(len(rows), bool)
        for shard in x.addressable_shards:
            at = where[np.arange(n)[shard.index[0]]]
            want = (at >= 0) & ~filled[np.maximum(at, 0)]
            if want.any():
                out[at[want]] = np.asarray(shard.data)[want]
                filled[at[want]] = True
        if not filled.all():
            raise ValueError(f"rows {np.asarray(rows)[~filled][:8].tolist()} are not on this process's devices")
        return out

    def gather(self, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every row's values: `values` holds this process's rows (`own`, [m, ...] each);
        the result each row's owner's, [B, ...] with the same dtypes, identical on every
        process (one all-gather of the bytes, so no value is rounded on the way)."""
        n = len(self.owner)
        own = self.own
        names = sorted(values)
        full = {k: np.zeros((n,) + np.shape(values[k])[1:], np.asarray(values[k]).dtype) for k in names}
        for k in names:
            if len(values[k]) != len(own):
                raise ValueError(f"{k}: {len(values[k])} values for the {len(own)} rows this process answers for")
            full[k][own] = values[k]
        if jax.process_count() == 1 or not names:
            return full
        packed = np.concatenate([full[k].reshape(n, -1).view(np.uint8).reshape(n, -1) for k in names], axis=1)
        every = np.asarray(multihost_utils.process_allgather(packed))  # [processes, B, bytes]
        rows = every[self.owner, np.arange(n)]
        out, at = {}, 0
        for k in names:
            width = full[k][:1].nbytes
            out[k] = np.ascontiguousarray(rows[:, at:at + width]).view(full[k].dtype).reshape(full[k].shape)
            at += width
        return out


def generate_rows(model, variables, tokenizer, prompts: Sequence[str], width: int, *, max_new_tokens: int,
                  temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, rng=None,
                  speculative: bool = False, stop_token: int | None = None, mesh=None,
                  rules=None) -> GenerateOutput:
    """One completion per prompt, left on the devices: tokens, logprobs and lengths split
    over the mesh's batch axes as the prompts are (`dsjax.generate` with gather=False).
    Arguments as `complete`; every process passes the same prompts."""
    ids, lengths = encode_prompts(tokenizer, prompts, width)
    return generate(model, variables, ids, lengths, max_new_tokens, temperature=temperature, rng=rng,
                    speculative=speculative, top_k=top_k, top_p=top_p, stop_tokens=_stop(tokenizer, stop_token),
                    prompt_bucket=width, mesh=mesh, rules=rules, gather=False)


def _stop(tokenizer, stop_token: int | None) -> tuple[int, ...]:
    stop_token = tokenizer.eos_id if stop_token is None else stop_token
    return () if stop_token is None else (int(stop_token),)


def read_rows(out: GenerateOutput, tokenizer, rows: np.ndarray, stop_token: int | None = None,
              speculative: bool = False) -> Completions:
    """The completions at `rows` (int [b], rows this process holds) of `generate_rows`'s
    output, decoded; `speculative`: read its counters."""
    share = ProcessRows.of(out.tokens)
    tokens, logprobs, lens = (share.read(x, rows) for x in (out.tokens, out.logprobs, out.lengths))
    return _decoded(tokens, logprobs, lens, tokenizer, _stop(tokenizer, stop_token), out if speculative else None)


def _decoded(tokens, logprobs, lens, tokenizer, stop: tuple[int, ...], counters: GenerateOutput | None) -> Completions:
    ended = np.zeros(len(lens), bool)
    texts = []
    for row, n in enumerate(lens):
        body = tokens[row, :n]
        if n and stop and body[-1] == stop[0]:
            ended[row] = True
            body = body[:-1]
        texts.append(tokenizer.decode(body))
    return Completions(tokens=tokens, logprobs=np.asarray(logprobs), lengths=lens, texts=texts,
                       truncated=~ended, acceptance_rate=counters.acceptance_rate if counters else 0.0,
                       tokens_per_forward=counters.tokens_per_forward if counters else 1.0)


def complete(model, variables, tokenizer, prompts: Sequence[str], width: int, *, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, rng=None,
             speculative: bool = False, stop_token: int | None = None, mesh=None, rules=None) -> Completions:
    """One completion per prompt (repeat a prompt for several samples), every row on
    every process.

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
    stop = _stop(tokenizer, stop_token)
    out = generate(model, variables, ids, lengths, max_new_tokens, temperature=temperature, rng=rng,
                   speculative=speculative, top_k=top_k, top_p=top_p, stop_tokens=stop, prompt_bucket=width,
                   mesh=mesh, rules=rules)
    tokens, logprobs, lens = jax.device_get((out.tokens, out.logprobs, out.lengths))
    return _decoded(np.asarray(tokens), logprobs, np.asarray(lens), tokenizer, stop, out if speculative else None)
