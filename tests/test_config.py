"""ModelConfig: HF key mapping, validation messages, presets, full-size parameter counts."""

import dataclasses
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

import dsjax
from dsjax.config import ConfigError, RopeScaling, config_from_dict, param_counts
from dsjax.impl import IMPL_FIELDS
from dsjax.hf import abstract_variables
from train.config import build_config
from train.stages import all_stages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_model_preset_loads():
    names = dsjax.preset_names()
    assert {"deepseek-v3-671b", "deepseek-v2-236b", "deepseek-v2-lite", "tiny", "small"} <= set(names)
    for name in names:
        assert isinstance(dsjax.load_model_config(name), dsjax.ModelConfig)


def test_every_yaml_under_configs_parses():
    files = glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True)
    assert files
    for f in files:
        assert isinstance(yaml.safe_load(open(f)), dict), f


def test_hf_round_trip_of_config():
    for name in dsjax.preset_names():
        cfg = dsjax.load_model_config(name)
        impl_choices = {field: getattr(cfg, field) for field in IMPL_FIELDS}  # not HF keys: carried over
        again = dsjax.ModelConfig.from_hf(cfg.to_hf(), **impl_choices)
        assert again == cfg, name
        hash(cfg)  # usable as a static jit argument


def test_transformers_rope_parameters_form():
    hf = dsjax.load_model_config("deepseek-v2-lite").to_hf()
    scaling = hf.pop("rope_scaling")
    theta = hf.pop("rope_theta")
    hf["rope_parameters"] = dict(scaling, rope_type="yarn", rope_theta=theta)
    cfg = dsjax.ModelConfig.from_hf(hf)
    assert cfg.rope_scaling.factor == 40 and cfg.rope_scaling.mscale_all_dim == 0.707 and cfg.rope_theta == theta


@pytest.mark.parametrize("change, message", [
    (dict(num_experts_per_tok=9), r"num_experts_per_tok=9 must be in \[1, n_routed_experts=8\]"),
    (dict(n_group=3), r"n_routed_experts=8 is not divisible by n_group=3"),
    (dict(topk_group=5), r"topk_group=5 must be in \[1, n_group=4\]"),
    (dict(num_experts_per_tok=5, topk_group=2), r"num_experts_per_tok=5 exceeds the 4 experts"),
    (dict(first_k_dense_replace=7), r"first_k_dense_replace=7 exceeds num_hidden_layers=4"),
    (dict(qk_rope_head_dim=7), r"qk_rope_head_dim must be even"),
    (dict(moe_impl="sparse"), r"moe_impl='sparse' is not one of \['auto', 'dense', 'ragged', 'blocked', 'gather', 'cpu'\]"),
    (dict(moe_impl="blocked", precision="fp8"), r"moe_impl='blocked' has no FP8 form"),
    (dict(hidden_size=0), r"hidden_size must be positive"),
])
def test_impossible_values_are_named(change, message):
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                num_hidden_layers=4, num_attention_heads=4, kv_lora_rank=16, qk_rope_head_dim=8,
                v_head_dim=8, qk_nope_head_dim=8, n_routed_experts=8, num_experts_per_tok=2,
                n_group=4, topk_group=2, first_k_dense_replace=1)
    with pytest.raises(ConfigError, match=message):
        dsjax.ModelConfig(**{**base, **change})


@pytest.mark.parametrize("item, value", [
    ("train.steps=7", 7), ("train.lr=1", 1.0), ("train.lr=1e-3", 1e-3), ("data.source=123", "123"),
    ("sft.strict=false", False), ("model.q_lora_rank=32", 32), ("model.q_lora_rank=null", None),
    ("model.rope_scaling={factor: 4.0, original_max_position_embeddings: 64}",
     RopeScaling(factor=4.0, original_max_position_embeddings=64)),
])
def test_set_values_take_the_field_type(item, value):
    section, key = item.split("=")[0].split(".")
    got = getattr(getattr(build_config(None, [item], all_stages()), section), key)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("item, message", [
    ("train.steps=abc", "train.steps='abc' is not a valid int"),
    ("train.steps=1.5", "train.steps=1.5 is not a valid int"),
    ("train.steps=true", "train.steps=True is not a valid int"),
    ("train.lr=false", "train.lr=False is not a valid float"),
    ("sft.strict=1", "sft.strict=1 is not a valid bool"),
    ("data.source=true", "data.source=True is not a valid str"),
    ("model.q_lora_rank=x", "model.q_lora_rank='x' is not a valid int | None"),
    ("model.rope_scaling={factr: 2}", "model.rope_scaling: unknown key 'factr'; keys: ['type', 'factor', "
     "'original_max_position_embeddings', 'beta_fast', 'beta_slow', 'mscale', 'mscale_all_dim']"),
])
def test_set_values_of_the_wrong_type_are_named(item, message):
    with pytest.raises(ConfigError) as e:
        build_config(None, [item], all_stages())
    assert str(e.value) == message


def test_unknown_preset_key_is_named():
    with pytest.raises(ConfigError, match="unknown model config key 'hiden_size'"):
        config_from_dict({"hiden_size": 3})


def test_unsupported_hf_options_are_refused():
    with pytest.raises(ConfigError, match="attention_bias"):
        dsjax.ModelConfig.from_hf({"attention_bias": True})


# Published (rounded) figures. Totals are checked to 1%. DeepSeek rounds activated counts
# to the figure shown (V2-Lite's 2.45B prints as 2.4B), so those are checked to 2.5%.
PUBLISHED = {"deepseek-v3-671b": (671e9, 37e9), "deepseek-v2-236b": (236e9, 21e9),
             "deepseek-v2-lite": (15.7e9, 2.4e9)}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_full_size_parameter_counts(name):
    cfg = dsjax.load_model_config(name)
    abstract = abstract_variables(dsjax.Transformer(cfg))["params"]
    size = lambda t: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(t))
    mtp = sum(size(v) for k, v in abstract.items() if k.startswith("mtp_"))
    counts = param_counts(cfg)
    assert size(abstract) - mtp == counts["total"]  # eval_shape agrees with the formula
    assert mtp == counts["mtp"]
    total, activated = PUBLISHED[name]
    assert abs(counts["total"] / total - 1) < 0.01, counts
    assert abs(counts["activated"] / activated - 1) < 0.025, counts
    assert all(x.dtype == jnp.bfloat16 or x.dtype == jnp.float32 for x in jax.tree.leaves(abstract))


def test_help_shows_the_values_of_the_stage_run(capsys):
    """`python -m train [STAGE] --help` lists each key with the value that stage's run
    uses (configs/<stage>.yaml over the dataclass defaults), the default beside it."""
    from train.__main__ import main

    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    run = yaml.safe_load(open(os.path.join(ROOT, "configs", "pretrain.yaml")))
    assert "  train.steps = 800   [default 500]" in text and run["train"]["steps"] == 800
    assert "  train.seq_len = 128   [default 256]" in text
    assert "  train.batch_size = 16\n" in text
    for key, value in run["train"].items():
        assert f"  train.{key} = {value!r}" in text, key
    assert "--show-config" in text
    with pytest.raises(SystemExit):
        main(["sft", "--workdir", "somewhere", "--help"])
    text = capsys.readouterr().out
    assert "run config 'sft'" in text and "  train.lr = 0.0005   [default 0.003]" in text


def test_show_config_prints_the_resolved_config(capsys, tmp_path):
    from train.__main__ import main

    assert main(["grpo", "--show-config", "--set", "train.steps=7", "--workdir", str(tmp_path / "w")]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["stage"] == "grpo" and shown["train"]["steps"] == 7
    assert shown["grpo"]["group_size"] == build_config("grpo", [], all_stages()).grpo.group_size
    assert shown["model"] == yaml.safe_load(yaml.safe_dump(dataclasses.asdict(dsjax.load_model_config("tiny"))))
    assert not (tmp_path / "w").exists()
    assert main(["--show-config", "--set", "train.nope=1"]) == 2


def test_run_config_sections_come_from_the_stage_declarations():
    """Each stage module declares its name, section and config class (train/stages/); the
    run config has a section for each, read as an attribute, set by YAML or --set, listed
    by --help; a stage section is unknown to a config built without the stages."""
    from train.config import RunConfig, describe_options
    from train.loop import StageSpec

    stages = all_stages()
    assert {"pretrain", "sft", "rm", "distill"} <= set(stages) and list(stages)[0] == "pretrain"
    for name, spec in stages.items():
        assert isinstance(spec, StageSpec) and spec.name == name
        assert os.path.isfile(os.path.join(ROOT, "configs", f"{spec.default_config}.yaml"))
        if spec.section is not None:
            cfg = build_config(spec.default_config, [], stages)
            assert isinstance(getattr(cfg, spec.section), spec.config)
            assert cfg.sections()[spec.section] == getattr(cfg, spec.section)
    cfg = build_config(None, ["sft.truncate=true", "rm.strict=false"], stages)
    assert cfg.sft.truncate and not cfg.rm.strict and hash(cfg) == hash(build_config(
        None, ["rm.strict=false", "sft.truncate=true"], stages))
    assert cfg.replace_section("train", cfg.train).train == cfg.train
    with pytest.raises(ConfigError, match="unknown config section 'sft'"):
        build_config(None, ["sft.truncate=true"])
    with pytest.raises(AttributeError):
        RunConfig().sft
    text = describe_options("sft", stages)
    for spec in stages.values():
        if spec.section is not None:
            for f in dataclasses.fields(spec.config):
                assert f"  {spec.section}.{f.name} = " in text
