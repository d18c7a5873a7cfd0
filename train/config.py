"""Run configuration: typed frozen dataclasses hold every default; YAML files in configs/
and `--set section.key=value` override them. Unknown keys and bad values raise
ConfigError naming the key."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import yaml

from dsjax.config import _CONFIG_DIR, ConfigError, ModelConfig, apply_updates, load_model_config, parse_value
from sharding.mesh import MeshConfig
from dsjax.data import DataConfig
from train.distill import DistillConfig
from train.grpo import GRPOConfig
from train.rm import RMConfig
from train.sft import SFTConfig

SCHEDULES = ("cosine", "constant", "step")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Attributes:
      steps: optimizer steps.
      batch_size: global batch (sequences per step, all hosts together).
      seq_len: tokens per sequence.
      lr / warmup_steps / schedule / min_lr_ratio: peak learning rate, linear warmup, then
        'cosine' (to lr * min_lr_ratio), 'constant' or 'step' (x step_decay_factor every
        step_decay_every steps).
      weight_decay / b1 / b2 / eps / grad_clip: AdamW and global-norm clipping.
      seed: parameter init, data order and sampling.
      log_every / eval_every / eval_batches: metrics cadence; validation batches per eval.
      checkpoint_every / keep_checkpoints: save interval (and at the end); how many to keep.
      mtp_lambda / mtp_lambda_final / mtp_lambda_switch: MTP loss weight, switching to the
        final value after this fraction of the steps (DeepSeek-V3: 0.3 then 0.1).
      balance_alpha: weight of the sequence-wise balance loss (V3: 1e-4).
      bias_update_speed / bias_update_stop: aux-loss-free bias step gamma, set to 0 after
        this fraction of the steps (V3: 0.001, 0 for the last tokens).
      sample_tokens / sample_prompt: text generated at the end (0: none).
      peak_tflops: peak device TFLOP/s for MFU (0: from the device kind; a CPU's float32
        matmul throughput, measured at the start).
      max_bad_steps: a step whose loss or gradients are not finite is skipped (parameters,
        optimizer state and router bias unchanged; `skipped` in the metrics); this many in
        a row stop the run at the next log or checkpoint step.
    """

    steps: int = 500
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    warmup_steps: int = 50
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    step_decay_every: int = 1000
    step_decay_factor: float = 0.316
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    checkpoint_every: int = 250
    keep_checkpoints: int = 3
    mtp_lambda: float = 0.3
    mtp_lambda_final: float = 0.1
    mtp_lambda_switch: float = 0.7
    balance_alpha: float = 1e-4
    bias_update_speed: float = 1e-3
    bias_update_stop: float = 0.95
    sample_tokens: int = 200
    sample_prompt: str = "def "
    peak_tflops: float = 0.0
    max_bad_steps: int = 5

    def validate(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "log_every", "eval_every", "checkpoint_every",
                     "keep_checkpoints", "step_decay_every", "max_bad_steps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name} must be positive, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_batches", "sample_tokens", "weight_decay", "grad_clip",
                     "mtp_lambda", "mtp_lambda_final", "balance_alpha", "bias_update_speed", "peak_tflops"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be positive, got {self.lr}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"train.schedule={self.schedule!r} is not one of {list(SCHEDULES)}")
        for name in ("mtp_lambda_switch", "bias_update_stop", "min_lr_ratio", "b1", "b2"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"train.{name} must be in [0, 1], got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class InitConfig:
    """Where a run's parameters start (when it is not resuming its own workdir).

    Attributes:
      workdir: a `python -m train` workdir: its latest checkpoint's parameters and router
        bias (not its optimizer state); the model and tokenizer default to that run's.
      hf: a Hugging Face DeepSeek-V2/V3 directory (`dsjax.from_pretrained`).
    """

    workdir: str = ""
    hf: str = ""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything `python -m train` does: model, training, data, mesh, where parameters
    start, and the SFT and GRPO stages' own settings."""

    model: ModelConfig = dataclasses.field(default_factory=lambda: load_model_config("tiny"))
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    init: InitConfig = dataclasses.field(default_factory=InitConfig)
    sft: SFTConfig = dataclasses.field(default_factory=SFTConfig)
    grpo: GRPOConfig = dataclasses.field(default_factory=GRPOConfig)
    distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)
    rm: RMConfig = dataclasses.field(default_factory=RMConfig)


_SECTIONS = {"train": TrainConfig, "data": DataConfig, "mesh": MeshConfig, "model": ModelConfig,
             "init": InitConfig, "sft": SFTConfig, "grpo": GRPOConfig,
             "distill": DistillConfig, "rm": RMConfig}


def parse_set(item: str) -> tuple[str, str, Any]:
    """One `--set section.key=value` -> (section, key, parsed value); ConfigError if malformed."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    key, text = item.split("=", 1)
    if "." not in key:
        raise ConfigError(f"--set {key}: expected section.key (sections: {sorted(_SECTIONS)})")
    section, field = key.split(".", 1)
    if section not in _SECTIONS:
        raise ConfigError(f"unknown config section {section!r} in --set {key}")
    return section, field, parse_value(text)


def resolve_config_path(name_or_path: str) -> str:
    if os.path.exists(name_or_path):
        return name_or_path
    path = os.path.join(_CONFIG_DIR, f"{name_or_path}.yaml")
    if not os.path.exists(path):
        runs = sorted(f[:-5] for f in os.listdir(_CONFIG_DIR) if f.endswith(".yaml"))
        raise ConfigError(f"unknown run config {name_or_path!r}; configs: {runs}")
    return path


def build_config(config: str | None, overrides: list[str]) -> RunConfig:
    """RunConfig from a YAML file (or none) and `section.key=value` overrides.

    The model section may name a `preset` (configs/models/) that its other keys modify.
    """
    raw: dict[str, Any] = {}
    if config:
        with open(resolve_config_path(config)) as f:
            raw = yaml.safe_load(f) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{config}: a run config must be a mapping of sections")
    sections: dict[str, dict[str, Any]] = {}
    for section, values in raw.items():
        if section not in _SECTIONS:
            raise ConfigError(f"unknown config section {section!r}; sections: {sorted(_SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"config section {section!r} must be a mapping")
        sections[section] = dict(values)
    for item in overrides:
        section, field, value = parse_set(item)
        sections.setdefault(section, {})[field] = value
    init = apply_updates("init", InitConfig(), sections.pop("init", {}))
    model_values = dict(sections.pop("model", {}))
    preset = model_values.pop("preset", None)
    source, source_data = _init_source(init)
    if source is not None and preset is None:
        model = source
    else:
        model = load_model_config(str(preset or "tiny"))
    model = apply_updates("model", model, model_values)
    if source is not None:
        check_same_model(source, model, f"the init source {init.workdir or init.hf}")
        data = sections.setdefault("data", {})
        for key, value in source_data.items():
            data.setdefault(key, value)
    distill = sections.get("distill", {})
    if source is None and (distill.get("teacher") or distill.get("teacher_hf")):
        # A student reads the teacher's text with the teacher's tokenizer unless told otherwise.
        teacher = InitConfig(workdir=str(distill.get("teacher") or ""), hf=str(distill.get("teacher_hf") or ""))
        _, teacher_data = _init_source(teacher, ("distill.teacher", "distill.teacher_hf"))
        for key, value in teacher_data.items():
            sections.setdefault("data", {}).setdefault(key, value)
    cfg = RunConfig(model=model, init=init)
    for section, values in sections.items():
        cfg = dataclasses.replace(cfg, **{section: apply_updates(section, getattr(cfg, section), values)})
    cfg.train.validate()
    cfg.grpo.validate()
    cfg.distill.validate()
    return cfg


def _init_source(init: InitConfig, names: tuple[str, str] = ("init.workdir", "init.hf")
                 ) -> tuple[ModelConfig | None, dict[str, Any]]:
    """The model config of `init.workdir` / `init.hf` and the data keys a run inherits
    from it (its tokenizer), or (None, {})."""
    import json

    from dsjax.config import config_from_dict

    if init.workdir and init.hf:
        raise ConfigError("init.workdir and init.hf are exclusive: start from one of them")
    if init.workdir:
        path = os.path.join(init.workdir, "config.yaml")
        if not os.path.isfile(path):
            raise ConfigError(f"{names[0]}: {init.workdir} is not a training workdir (no config.yaml)")
        with open(path) as f:
            run = yaml.safe_load(f) or {}
        return config_from_dict(run["model"]), {"tokenizer": run.get("data", {}).get("tokenizer", "bytes")}
    if init.hf:
        path = os.path.join(init.hf, "config.json")
        if not os.path.isfile(path):
            raise ConfigError(f"{names[1]}: {init.hf} has no config.json")
        with open(path) as f:
            model = ModelConfig.from_hf(json.load(f))
        tokenizer = os.path.join(init.hf, "tokenizer.json")
        return model, ({"tokenizer": tokenizer} if os.path.isfile(tokenizer) else {})
    return None, {}


def model_differences(a: ModelConfig, b: ModelConfig) -> list[str]:
    """The architecture keys (not dsjax.config.IMPL_FIELDS) on which two configs differ."""
    from dsjax.config import IMPL_FIELDS

    return [f.name for f in dataclasses.fields(ModelConfig)
            if f.name not in IMPL_FIELDS and getattr(a, f.name) != getattr(b, f.name)]


def check_same_model(have: ModelConfig, asked: ModelConfig, where: str) -> None:
    """ConfigError naming every architecture key where `asked` differs from `have`."""
    diff = model_differences(have, asked)
    if diff:
        shown = ", ".join(f"model.{k}={getattr(asked, k)!r} (there: {getattr(have, k)!r})" for k in diff[:6])
        raise ConfigError(f"{where} holds a different model: {shown}")


def config_yaml(cfg: RunConfig, stage: str) -> str:
    """The resolved config as the workdir's config.yaml holds it (tuples, such as
    grpo.sources, as YAML lists)."""
    return yaml.safe_dump(_plain({"stage": stage, **dataclasses.asdict(cfg)}), sort_keys=False)


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def describe_options(config: str = "pretrain") -> str:
    """Every --set key with the value the run config `config` (a stage's own, or a name or
    path as --config takes) gives it, and the dataclass default where that differs; for --help.
    The model keys' defaults are the `tiny` preset's."""
    defaults = RunConfig()
    try:
        run = build_config(config, [])
        head = f"options for --set, as the run config {config!r} sets them [default where it differs]:"
    except (ConfigError, FileNotFoundError) as e:
        run = defaults
        head = f"options for --set with their defaults (run config {config!r} not read: {e}):"
    lines = [head]
    for section in ("train", "data", "mesh", "init", "sft", "grpo", "distill", "rm", "model"):
        obj, base = getattr(run, section), getattr(defaults, section)
        for f in dataclasses.fields(obj):
            value, default = getattr(obj, f.name), getattr(base, f.name)
            lines.append(f"  {section}.{f.name} = {value!r}" + (f"   [default {default!r}]" if value != default else ""))
        if section == "model":
            lines.append("  model.preset = 'tiny'   (one of configs/models/)")
    return "\n".join(lines)
