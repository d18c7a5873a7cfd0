"""Validation loss of a trained checkpoint: `python -m eval loss --checkpoint WORKDIR`.

The run's own validation split, sequence length and batch size, so the figure is the
`val_loss` the run logged; `--set model.precision=fp8` (or dtype, attn_impl, moe_impl)
evaluates the same weights under other arithmetic.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import yaml
from tqdm.auto import tqdm

from dsjax import data as data_lib
from dsjax.checkpoint import load_trained
from dsjax.config import ConfigError, ModelConfig
from dsjax.impl import IMPL_FIELDS, unresolved
from dsjax.losses import make_eval_step
from dsjax.model import Transformer
from dsjax.tokenizer import load_tokenizer


def with_implementation(cfg: ModelConfig, overrides: list[str]) -> ModelConfig:
    """A trained model's config for this program: `model.KEY=VALUE` items (--set syntax)
    applied, KEY one of the implementation fields (dsjax.impl.IMPL_FIELDS: how the model
    computes, never what it is), and every platform choice they leave alone (a field that
    takes 'auto') back to 'auto', so it is made again for this program's devices and the
    new combination (a run's config.yaml holds the choices made for its own devices).
    Values read as YAML scalars; ConfigError (a ValueError) naming the key otherwise."""
    cfg = unresolved(cfg)
    updates = {}
    for item in overrides:
        key, eq, text = item.partition("=")
        section, dot, field = key.partition(".")
        if not eq or not dot or section != "model":
            raise ConfigError(f"--set {item!r}: expected model.KEY=VALUE")
        if field not in {f.name for f in dataclasses.fields(ModelConfig)}:
            raise ConfigError(f"unknown config key model.{field}")
        if field not in IMPL_FIELDS:
            raise ConfigError(f"--set model.{field}: changes the trained model; here only "
                              f"{', '.join('model.' + a for a in IMPL_FIELDS)} can be set")
        try:
            updates[field] = yaml.safe_load(text)
        except yaml.YAMLError:
            updates[field] = text
    try:
        return dataclasses.replace(cfg, **updates)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--set model: {e}") from None


def checkpoint_loss(workdir: str, batches: int | None = None, overrides: list[str] = (),
                    step: int | None = None, progress: bool = False) -> dict:
    """Mean next-token cross-entropy of a `python -m train` checkpoint on its validation split.

    Args:
      workdir: the training workdir (its config.yaml and checkpoints/).
      batches: validation batches (default: the run's train.eval_batches, or 8 if it had none).
      overrides: `model.key=value` for the keys in dsjax.impl.IMPL_FIELDS.
      step: checkpoint step (default: the latest).
    Returns {'step', 'batches', 'tokens', 'val_loss', 'perplexity', 'set'}.
    Raises FileNotFoundError, ValueError (ConfigError) with a one-line message.
    """
    model, variables, run = load_trained(workdir, step)
    cfg = with_implementation(model.cfg, list(overrides))
    train = run["train"]
    n = (train["eval_batches"] or 8) if batches is None else batches
    if n < 1:
        raise ValueError(f"--batches must be positive, got {n}")
    tokenizer = load_tokenizer(run["data"].get("tokenizer", "bytes"))
    corpus = data_lib.load_corpus(data_lib.DataConfig(**run["data"]), tokenizer)
    val = data_lib.eval_batches(corpus.val, train["seq_len"], train["batch_size"], n)
    eval_step = jax.jit(make_eval_step(Transformer(cfg)))
    sums = jax.device_get([eval_step(variables["params"], variables.get("moe_bias", {}), b)
                           for b in tqdm(val, desc="eval loss", disable=not progress)])
    loss = float(sum(s for s, _ in sums) / sum(c for _, c in sums))
    return {"step": run["checkpoint_step"], "batches": len(val),
            "tokens": int(sum(b["targets"].size for b in val)), "val_loss": round(loss, 6),
            "perplexity": round(math.exp(loss), 4), "set": list(overrides)}
