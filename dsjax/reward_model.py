"""Reward models (DeepSeek-R1 §2.3.4: the preference models of the last RL stage).

A reward model is the Transformer backbone with a scalar head read at the last token of
each response: r = <h_last, w> + b, with h the final normalized hidden state. Its
parameters are the language model's plus `score` [D] and `score_bias` [], so any
checkpoint of the same architecture initializes the backbone. Trained on preference
pairs with the Bradley-Terry loss -log sigmoid(r_chosen - r_rejected).

    rm = RewardModel(cfg)
    scores = rm.apply(variables, tokens, last)      # last: int32 [B, S], -1 where unused
    rm, variables, run = load_reward_model("workdir")   # a `python -m train rm` run
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dsjax.checkpoint import load_trained
from dsjax.layers import param
from dsjax.model import Transformer


class RewardModel(Transformer):
    """Scores responses. Call: tokens int32 [B, T]; last int32 [B, S], the position of each
    response's last token in its row (S > 1 when rows pack several sequences, which then
    need `segment_ids` and restarting `positions`; -1 marks an unused slot; default: the
    row's final position).
    Returns float32 scores [B, S] (0 in unused slots)."""

    def setup(self):
        super().setup()
        self.score = param(self, "score", (self.cfg.hidden_size,), ("embed",))
        self.score_bias = param(self, "score_bias", (), (), init=nn.initializers.zeros)

    def __call__(self, tokens: jnp.ndarray, last: jnp.ndarray | None = None, positions: jnp.ndarray | None = None,
                 segment_ids: jnp.ndarray | None = None) -> jnp.ndarray:
        h, _, _, _ = self.trunk(tokens, positions, segment_ids)
        if last is None:  # one response per row, ending at the row's end
            last = jnp.full((tokens.shape[0], 1), tokens.shape[1] - 1, jnp.int32)
        read = jnp.take_along_axis(h.astype(jnp.float32), jnp.maximum(last, 0)[..., None], axis=1)  # [B, S, D]
        scores = read @ self.score.astype(jnp.float32) + self.score_bias.astype(jnp.float32)
        return jnp.where(last >= 0, scores, 0.0)


def bradley_terry(chosen: jnp.ndarray, rejected: jnp.ndarray, mask: jnp.ndarray | None = None):
    """Bradley-Terry loss and pairwise accuracy over preference pairs.

    chosen, rejected: float32 scores [P]; mask: bool [P] (pairs that count; all when None).
    Returns (mean -log sigmoid(chosen - rejected), mean [chosen > rejected]).
    """
    margin = chosen - rejected
    m = jnp.ones_like(margin) if mask is None else mask.astype(jnp.float32)
    count = jnp.maximum(m.sum(), 1.0)
    loss = (jax.nn.softplus(-margin) * m).sum() / count
    accuracy = ((margin > 0) * m).sum() / count
    return loss, accuracy


def encode_responses(tokenizer, prompts, responses, width: int,
                     keep_end: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Rows of prompt + response + EOS, zero padded to `width`: (tokens int32 [B, width],
    last int32 [B, 1], the position the score is read at). A row longer than `width` is a
    ValueError naming its length, or with `keep_end` loses its first tokens."""
    tokens = np.zeros((len(prompts), width), np.int32)
    last = np.zeros((len(prompts), 1), np.int32)
    eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        row = list(tokenizer.encode(prompt)) + list(tokenizer.encode(response)) + eos
        if len(row) > width and keep_end:
            row = row[-width:]
        elif len(row) > width:
            raise ValueError(f"a prompt and response of {len(row)} tokens do not fit {width}")
        tokens[i, :len(row)] = row
        last[i, 0] = len(row) - 1
    return tokens, last


def load_reward_model(workdir: str, step: int | None = None, shardings=None):
    """A reward model and its variables (backbone and head) from a run directory, as
    dsjax.checkpoint.load_trained reads a language model. Raises FileNotFoundError with a
    one-line message where the directory or its checkpoint holds no reward model."""
    try:
        return load_trained(workdir, step, shardings, module=RewardModel)
    except (KeyError, ValueError) as e:
        raise FileNotFoundError(f"{workdir} holds no reward model (python -m train rm): {e}") from None
