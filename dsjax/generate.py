"""Text generation.

`generate_reference` recomputes the whole sequence for every new token (no cache): slow,
but simple enough to check by eye, and the reference the cached decoders are tested
against.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dsjax.model import Transformer


def _pick(logits: jnp.ndarray, temperature: float, top_k: int, rng) -> jnp.ndarray:
    """Next tokens from logits [B, V]: greedy at temperature 0, else sampled."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k"))
def generate_reference(model: Transformer, variables, prompts: jnp.ndarray, prompt_lengths: jnp.ndarray,
                       max_new_tokens: int, temperature: float = 0.0, rng=None, top_k: int = 0):
    """Generates continuations by full recomputation.

    Args:
      prompts: int32 [B, P], right-padded; prompt_lengths: int32 [B] (each >= 1).
      max_new_tokens: tokens to generate per row.
      temperature: 0 for greedy; top_k: keep the k most likely tokens (0: all).
      rng: PRNG key, needed when temperature > 0.
    Returns:
      (tokens int32 [B, max_new_tokens], logprobs float32 [B, max_new_tokens]): the
      generated tokens and their log-probabilities under the model.
    """
    B, P = prompts.shape
    rng = jax.random.key(0) if rng is None else rng
    buf = jnp.zeros((B, P + max_new_tokens), jnp.int32).at[:, :P].set(prompts)
    rows = jnp.arange(B)

    def body(i, carry):
        buf, tokens, logprobs, rng = carry
        pos = prompt_lengths + i
        logits = model.apply(variables, buf, mtp=False).logits[rows, pos - 1]  # [B, V]
        rng, sub = jax.random.split(rng)
        tok = _pick(logits, temperature, top_k, sub)
        logp = jax.nn.log_softmax(logits)[rows, tok]
        return buf.at[rows, pos].set(tok), tokens.at[:, i].set(tok), logprobs.at[:, i].set(logp), rng

    init = (buf, jnp.zeros((B, max_new_tokens), jnp.int32), jnp.zeros((B, max_new_tokens), jnp.float32), rng)
    _, tokens, logprobs, _ = jax.lax.fori_loop(0, max_new_tokens, body, init)
    return tokens, logprobs
