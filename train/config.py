"""Run configuration: typed frozen dataclasses hold every default; YAML files in configs/
and `--set section.key=value` override them. Unknown keys and bad values raise
ConfigError naming the key.

A run config has the base sections (`model`, `train`, `data`, `mesh`, `init`, `logging`)
and one section per stage that declares one (train/stages/: `sft`, `grpo`, `distill`, `rm`,
...).
The stages are passed in (`train.stages.all_stages()`): this module knows none of them.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
import types
import typing
from typing import Any, Mapping

import yaml

from dsjax.config import _CONFIG_DIR, ConfigError, ModelConfig, load_model_config
from dsjax.data import DataConfig
from sharding.mesh import MeshConfig
from train.workdir import check_same_model, init_source

SCHEDULES = ("cosine", "constant", "step")


def did_you_mean(name: str, known, prefix: str = "", suffix: str = "") -> str:
    """'; did you mean PREFIX.KEY.SUFFIX?' for the known name nearest a mistyped `name`
    (difflib), else ''."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f"; did you mean {prefix}{close[0]}{suffix}?" if close else ""


def section_keys(section: str, cls: type) -> set[str]:
    """The keys a config section takes: its dataclass's fields, and `preset` for the model."""
    return {f.name for f in dataclasses.fields(cls)} | ({"preset"} if section == "model" else set())


def model_context(model: ModelConfig) -> tuple[int, str]:
    """(the longest sequence the model's positions cover, how that follows from the config):
    max_position_embeddings, or with YaRN rope scaling the scaled context,
    rope_scaling.factor x original_max_position_embeddings, where that is longer."""
    context, why = model.max_position_embeddings, "model.max_position_embeddings"
    rs = model.rope_scaling
    if rs is not None and int(rs.factor * rs.original_max_position_embeddings) > context:
        context = int(rs.factor * rs.original_max_position_embeddings)
        why = (f"YaRN: model.rope_scaling factor {rs.factor:g} x original_max_position_embeddings "
               f"{rs.original_max_position_embeddings}")
    return context, why


def check_seq_len(cfg) -> None:
    """ConfigError where the run's sequences (train.seq_len) are longer than the model's
    context (`model_context`)."""
    context, why = model_context(cfg.model)
    if cfg.train.seq_len > context:
        raise ConfigError(f"train.seq_len={cfg.train.seq_len} is longer than the model's context of {context} "
                          f"tokens ({why}); set train.seq_len <= {context}, or give the model a longer "
                          f"context (model.max_position_embeddings, model.rope_scaling)")


def coerce(key: str, value: Any, hint: Any) -> Any:
    """`value` (as YAML reads it) checked against a field's type hint, a type, a union
    with None or `tuple[X, ...]` (a list): ints widen to floats, numbers become strings, a
    mapping builds a dataclass (its fields checked the same way); a bool is never a number
    nor a number a bool."""
    if typing.get_origin(hint) is tuple:  # tuple[X, ...]: a YAML list of X (mappings for dataclasses)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} is not a list")
        item = typing.get_args(hint)[0]
        return tuple(coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value))
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    for kind in typing.get_args(hint) if union else (hint,):
        if isinstance(value, bool) != (kind is bool):
            continue
        if isinstance(value, kind):
            return value
        if kind is float and isinstance(value, int) or kind is str and isinstance(value, (int, float)):
            return kind(value)
        if dataclasses.is_dataclass(kind) and isinstance(value, dict):
            unknown = sorted(set(value) - {f.name for f in dataclasses.fields(kind)})
            if unknown:
                raise ConfigError(f"{key}: unknown key {unknown[0]!r}; keys: "
                                  f"{[f.name for f in dataclasses.fields(kind)]}")
            hints = typing.get_type_hints(kind)
            return kind(**{k: coerce(f"{key}.{k}", v, hints[k]) for k, v in value.items()})
    raise ConfigError(f"{key}={value!r} is not a valid {hint if union else hint.__name__}")


def apply_updates(section: str, base: Any, updates: dict[str, Any]) -> Any:
    """`base` (a config dataclass) with `updates` applied, each value checked against the
    field's type; unknown keys and bad values raise ConfigError naming `section.key`."""
    cls = type(base)
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kw = {}
    for k, v in updates.items():
        if k not in fields:
            raise ConfigError(f"unknown config key {section}.{k}"
                              + (did_you_mean(k, section_keys(section, cls), f"{section}.")
                                 or " (python -m train --help lists every key)"))
        kw[k] = coerce(f"{section}.{k}", v, hints[k])
    try:
        return dataclasses.replace(base, **kw)
    except (TypeError, ValueError) as e:  # ConfigError included
        raise ConfigError(f"{section}: {e}") from None


def parse_value(text: str) -> Any:
    """A --set value: numbers (1, 0.5, 1e-3), then YAML scalars (true, null), else a string."""
    for number in (int, float):
        try:
            return number(text)
        except ValueError:
            pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


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
      allow_schedule_change: resuming a run with other values of the keys its schedules
        follow (steps, warmup_steps, schedule, lr, min_lr_ratio, step_decay_*, mtp_lambda*,
        bias_update_*; train/workdir.py SCHEDULE_KEYS) where that changes the learning rate,
        MTP weight or router-bias speed of a step still to run is refused unless this is
        true; then the run logs what changed (old -> new) and goes on with the new schedule.
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
    allow_schedule_change: bool = False

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
class LoggingConfig:
    """Where the metrics of metrics.jsonl are mirrored (process 0 writes them).

    Attributes:
      tensorboard: TensorBoard event files in WORKDIR/tensorboard/, every scalar at its step
        (`tensorboard --logdir WORKDIR/tensorboard`).
      wandb: mirror the scalars to Weights & Biases (needs `pip install wandb`; the run stops
        before training with one line where it is missing).
      wandb_project: the W&B project; wandb_entity: its team or user ('': your default).
      wandb_name: the W&B run name and group ('': the workdir's basename).
    """

    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "dsjax"
    wandb_entity: str = ""
    wandb_name: str = ""

    def validate(self) -> None:
        if self.wandb and importlib.util.find_spec("wandb") is None:
            raise ConfigError("logging.wandb=true needs the wandb package: pip install wandb")
        if self.wandb and not self.wandb_project:
            raise ConfigError("logging.wandb_project must not be empty with logging.wandb=true")


BASE_SECTIONS = {"train": TrainConfig, "data": DataConfig, "mesh": MeshConfig, "model": ModelConfig,
                 "init": InitConfig, "logging": LoggingConfig}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything `python -m train` does: model, training, data, mesh, where parameters
    start, and the settings of each stage that declares a section (`cfg.sft`, `cfg.grpo`,
    ... read like the base sections).

    Attributes:
      model / train / data / mesh / init / logging: the base sections.
      stage_sections: (section name, config) of every declared stage section, in order.
    """

    model: ModelConfig = dataclasses.field(default_factory=lambda: load_model_config("tiny"))
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    init: InitConfig = dataclasses.field(default_factory=InitConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    stage_sections: tuple[tuple[str, Any], ...] = ()

    def __getattr__(self, name: str) -> Any:
        for section, value in self.__dict__.get("stage_sections", ()):
            if section == name:
                return value
        raise AttributeError(f"RunConfig has no section {name!r}")

    def sections(self) -> dict[str, Any]:
        """{section: config dataclass}, the base sections first."""
        return {**{name: getattr(self, name) for name in BASE_SECTIONS}, **dict(self.stage_sections)}

    def replace_section(self, name: str, value: Any) -> "RunConfig":
        """This config with section `name` (a base or a stage section) set to `value`."""
        if name in BASE_SECTIONS:
            return dataclasses.replace(self, **{name: value})
        if name not in dict(self.stage_sections):
            raise ConfigError(f"unknown config section {name!r}")
        return dataclasses.replace(self, stage_sections=tuple((s, value if s == name else v)
                                                              for s, v in self.stage_sections))

    def as_dict(self) -> dict[str, Any]:
        """{section: {key: value}} of every section (nested dataclasses as mappings)."""
        return {name: dataclasses.asdict(value) for name, value in self.sections().items()}


def section_classes(stages: Mapping[str, Any] = {}) -> dict[str, type]:
    """{section: its config dataclass}: the base sections, then those the stages declare
    (each a train.loop.StageSpec; pretraining declares none)."""
    out = dict(BASE_SECTIONS)
    for spec in stages.values():
        if spec.section is not None:
            out[spec.section] = spec.config
    return out


def parse_set(item: str, sections: Mapping[str, type] = BASE_SECTIONS) -> tuple[str, str, Any]:
    """One `--set section.key=value` -> (section, key, parsed value); ConfigError if malformed
    or if the section is not in `sections`."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    key, text = item.split("=", 1)
    if "." not in key:
        raise ConfigError(f"--set {key}: expected section.key (sections: {sorted(sections)})")
    section, field = key.split(".", 1)
    if section not in sections:
        raise ConfigError(f"unknown config section {section!r} in --set {key}"
                          + (did_you_mean(section, sections, suffix=f".{field}") or f" (sections: {sorted(sections)})"))
    return section, field, parse_value(text)


def resolve_config_path(name_or_path: str) -> str:
    if os.path.exists(name_or_path):
        return name_or_path
    path = os.path.join(_CONFIG_DIR, f"{name_or_path}.yaml")
    if not os.path.exists(path):
        runs = sorted(f[:-5] for f in os.listdir(_CONFIG_DIR) if f.endswith(".yaml"))
        raise ConfigError(f"unknown run config {name_or_path!r}; configs: {runs}")
    return path


def build_config(config: str | None, overrides: list[str], stages: Mapping[str, Any] = {}) -> RunConfig:
    """RunConfig from a YAML file (or none) and `section.key=value` overrides.

    Args:
      config: a run config name under configs/ or a YAML path (None: the defaults).
      overrides: `section.key=value` items, as --set takes them.
      stages: {name: train.loop.StageSpec} whose sections the run config has
        (`train.stages.all_stages()`; empty: the base sections only).

    The model section may name a `preset` (configs/models/) that its other keys modify.
    A stage config with a `data_from()` method names a run (an InitConfig) whose tokenizer
    the data section takes when the run starts from no init source (distillation's teacher).
    """
    classes = section_classes(stages)
    raw: dict[str, Any] = {}
    if config:
        with open(resolve_config_path(config)) as f:
            raw = yaml.safe_load(f) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{config}: a run config must be a mapping of sections")
    sections: dict[str, dict[str, Any]] = {}
    for section, values in raw.items():
        if section not in classes:
            raise ConfigError(f"{config}: unknown config section {section!r}"
                              + (did_you_mean(section, classes) or f"; sections: {sorted(classes)}"))
        if not isinstance(values, dict):
            raise ConfigError(f"{config}: config section {section!r} must be a mapping")
        known = section_keys(section, classes[section])
        for key in values:
            if key not in known:
                raise ConfigError(f"{config}: unknown config key {section}.{key}"
                                  + did_you_mean(str(key), known, f"{section}."))
        sections[section] = dict(values)
    for item in overrides:
        section, field, value = parse_set(item, classes)
        sections.setdefault(section, {})[field] = value
    init = apply_updates("init", InitConfig(), sections.pop("init", {}))
    model_values = dict(sections.pop("model", {}))
    preset = model_values.pop("preset", None)
    source, source_data = init_source(init.workdir, init.hf)
    if source is not None and preset is None:
        model = source
    else:
        model = load_model_config(str(preset or "tiny"))
    model = apply_updates("model", model, model_values)
    if source is not None:
        check_same_model(source, model, f"the init source {init.workdir or init.hf}")
    stage_sections = []
    for section, cls in classes.items():
        if section not in BASE_SECTIONS:
            stage_sections.append((section, apply_updates(section, cls(), sections.pop(section, {}))))
    for _, value in stage_sections:
        other = value.data_from() if source is None and hasattr(value, "data_from") else None
        if other is not None:
            run, names = other
            _, source_data = init_source(run.workdir, run.hf, names)
    data = sections.setdefault("data", {})
    for key, value in source_data.items():
        data.setdefault(key, value)
    cfg = RunConfig(model=model, init=init, stage_sections=tuple(stage_sections))
    for section, values in sections.items():
        cfg = cfg.replace_section(section, apply_updates(section, getattr(cfg, section), values))
    for value in cfg.sections().values():
        if hasattr(value, "validate") and not isinstance(value, ModelConfig):
            value.validate()
    check_seq_len(cfg)
    return cfg


def describe_options(config: str = "pretrain", stages: Mapping[str, Any] = {}) -> str:
    """Every --set key with the value the run config `config` (a stage's own, or a name or
    path as --config takes) gives it, and the dataclass default where that differs; for --help.
    The model keys' defaults are the `tiny` preset's."""
    defaults = build_config(None, [], stages)
    try:
        run = build_config(config, [], stages)
        head = f"options for --set, as the run config {config!r} sets them [default where it differs]:"
    except (ConfigError, OSError) as e:
        run = defaults
        head = f"options for --set with their defaults (run config {config!r} not read: {e}):"
    lines = [head]
    for section, obj in run.sections().items():
        base = getattr(defaults, section)
        for f in dataclasses.fields(obj):
            value, default = getattr(obj, f.name), getattr(base, f.name)
            lines.append(f"  {section}.{f.name} = {value!r}" + (f"   [default {default!r}]" if value != default else ""))
        if section == "model":
            lines.append("  model.preset = 'tiny'   (one of configs/models/)")
    return "\n".join(lines)
