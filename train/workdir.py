"""What a run directory holds, and its config.yaml.

    WORKDIR/
      config.yaml      the resolved run config: `stage` and every section, the model's
                       implementation choices resolved for the run's devices
      checkpoints/     orbax step folders (TrainState + the data position)
      metrics.jsonl    one JSON object per logged step
      tensorboard/     TensorBoard event files (logging.tensorboard)
      plots/           loss curves (PNG)

The library reads a run directory through `dsjax.checkpoint.read_run_config` (parameters
and router bias onto any device count or mesh); this module writes it and checks that a
run may go on in it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import yaml

from dsjax.checkpoint import read_run_config, run_model_config
from dsjax.config import ConfigError, ModelConfig, config_from_dict
from dsjax.impl import IMPL_FIELDS

CONFIG = "config.yaml"
CHECKPOINTS = "checkpoints"


def model_differences(a: ModelConfig, b: ModelConfig) -> list[str]:
    """The architecture keys (not the implementation choices) on which two configs differ."""
    return [f.name for f in dataclasses.fields(ModelConfig)
            if f.name not in IMPL_FIELDS and getattr(a, f.name) != getattr(b, f.name)]


def check_same_model(have: ModelConfig, asked: ModelConfig, where: str) -> None:
    """ConfigError naming every architecture key where `asked` differs from `have`."""
    diff = model_differences(have, asked)
    if diff:
        shown = ", ".join(f"model.{k}={getattr(asked, k)!r} (there: {getattr(have, k)!r})" for k in diff[:6])
        raise ConfigError(f"{where} holds a different model: {shown}")


def is_hf_directory(path: str) -> bool:
    """Whether `path` is a Hugging Face model directory (config.json and *.safetensors)."""
    return (os.path.isfile(os.path.join(path, "config.json"))
            and any(f.endswith(".safetensors") for f in os.listdir(path)))


def init_source(workdir: str, hf: str, names: tuple[str, str] = ("init.workdir", "init.hf")
                ) -> tuple[ModelConfig | None, dict[str, Any]]:
    """The model config of a run directory `workdir` or a Hugging Face directory `hf` (at
    most one of them) and the data keys a run starting there inherits (its tokenizer), or
    (None, {}) when both are empty. `names` are the keys that named them, for errors."""
    if workdir and hf:
        raise ConfigError(f"{names[0]} and {names[1]} are exclusive: start from one of them")
    if workdir:
        try:
            run = read_run_config(workdir)
            model = run_model_config(workdir, run)
        except FileNotFoundError:
            if is_hf_directory(workdir):
                raise ConfigError(f"{names[0]}: {workdir} is a Hugging Face directory (config.json and "
                                  f"*.safetensors), not a training workdir: start from it with "
                                  f"--set {names[1]}={workdir}") from None
            raise ConfigError(f"{names[0]}: {workdir} is not a training workdir (no config.yaml)") from None
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{names[0]}: {workdir}/{CONFIG} is not a valid run config: {e}") from None
        return model, {"tokenizer": (run.get("data") or {}).get("tokenizer", "bytes")}
    if hf:
        path = os.path.join(hf, "config.json")
        if not os.path.isfile(path):
            raise ConfigError(f"{names[1]}: {hf} has no config.json")
        with open(path) as f:
            model = ModelConfig.from_hf(json.load(f))
        tokenizer = os.path.join(hf, "tokenizer.json")
        return model, ({"tokenizer": tokenizer} if os.path.isfile(tokenizer) else {})
    return None, {}


def config_yaml(cfg, stage: str) -> str:
    """The resolved config (a train.config.RunConfig) as a run directory's config.yaml
    holds it: `stage`, then every section (tuples, such as grpo.sources, as YAML lists)."""
    return yaml.safe_dump(_plain({"stage": stage, **cfg.as_dict()}), sort_keys=False)


def write_config(workdir: str, cfg, stage: str) -> None:
    """Writes `config_yaml(cfg, stage)` into `workdir` (created if needed)."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, CONFIG), "w") as f:
        f.write(config_yaml(cfg, stage))


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def check_workdir(workdir: str, model: ModelConfig, stage: str) -> None:
    """Refuses a workdir that is a file, cannot be created or written, or holds another
    stage's or another model's run (ConfigError); an empty or new one passes. Creates nothing."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir {workdir} is a file, not a directory")
    parent = workdir
    while not os.path.exists(parent):  # the nearest part of the path that exists
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"--workdir {workdir} cannot be created: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--workdir {workdir}: {parent} is not writable")
    if not os.path.exists(os.path.join(workdir, CONFIG)):
        return
    saved = read_run_config(workdir)
    if saved.get("stage", "pretrain") != stage:
        raise ConfigError(f"--workdir {workdir} holds a {saved.get('stage', 'pretrain')} run; "
                          f"use another workdir for {stage}")
    try:
        have = config_from_dict(saved.get("model") or {})
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"{os.path.join(workdir, CONFIG)} is not a valid run config: {e}") from None
    check_same_model(have, model, f"--workdir {workdir}")


# The TrainConfig keys the learning-rate, MTP-weight and router-bias schedules are
# computed from (train/optim.py lr_schedule, train/steps.py): a run resumed with another
# value of one of them changes the schedule of the steps it already trained.
SCHEDULE_KEYS = ("steps", "warmup_steps", "schedule", "lr", "min_lr_ratio", "step_decay_every",
                 "step_decay_factor", "mtp_lambda", "mtp_lambda_final", "mtp_lambda_switch",
                 "bias_update_speed", "bias_update_stop")


def schedule_changes(workdir: str, train) -> dict[str, tuple[Any, Any]]:
    """{key: (value in the workdir's config.yaml, value in `train`)} for each SCHEDULE_KEYS
    key on which a run config's train section (a TrainConfig) differs from the run in
    `workdir`; {} for a new workdir."""
    if not os.path.exists(os.path.join(workdir, CONFIG)):
        return {}
    saved = read_run_config(workdir).get("train") or {}
    return {k: (saved[k], getattr(train, k)) for k in SCHEDULE_KEYS if k in saved and saved[k] != getattr(train, k)}


def describe_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    """'train.steps 500 -> 1000, train.lr 0.003 -> 0.001'."""
    return ", ".join(f"train.{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())
