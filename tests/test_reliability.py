"""Reliability: checkpoints move between device counts and layouts; the public entry
points work as documented."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

import dsjax
from sharding.rules import tree_shardings
import pytest

from eval.__main__ import main as eval_main
from train.__main__ import main as train_main
from tests.conftest import xla_flags
from tests.test_train import SMALL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_checkpoint_from_8_devices_loads_on_1_and_2_with_the_same_logits(tmp_path):
    workdir = tmp_path / "run"
    argv = ["--workdir", str(workdir)]
    for o in SMALL + ["model.moe_impl=ragged", "mesh.fsdp=4", "mesh.expert=2", "train.batch_size=8",
                      "train.steps=2", "train.checkpoint_every=2", "train.eval_every=2", "train.sample_tokens=0",
                      "train.bias_update_speed=0.01"]:
        argv += ["--set", o]
    assert train_main(argv) == 0
    logged = [json.loads(line) for line in open(workdir / "metrics.jsonl")][-1]["val_loss"]

    tokens = jnp.asarray(np.random.default_rng(0).integers(2, 250, (2, 16)), jnp.int32)
    model, one, run = dsjax.load_trained(str(workdir))  # one device, no optimizer state
    assert run["checkpoint_step"] == 2 and set(one) == {"params", "moe_bias"}
    assert {leaf.sharding.device_set.pop().id for leaf in jax.tree.leaves(one)} == {0}
    assert any(float(jnp.abs(b).max()) > 0 for b in jax.tree.leaves(one["moe_bias"]))  # the bias came along

    mesh = Mesh(np.asarray(jax.devices()[:2]).reshape(1, 2, 1, 1), ("data", "fsdp", "expert", "tensor"))
    boxed = jax.eval_shape(model.init, jax.random.key(0), tokens)
    shardings = tree_shardings({"params": boxed["params"], "moe_bias": boxed["moe_bias"]}, mesh, "fsdp")
    _, two, _ = dsjax.load_trained(str(workdir), shardings=shardings)
    assert any(len(leaf.sharding.device_set) == 2 and not leaf.sharding.is_fully_replicated
               for leaf in jax.tree.leaves(two))
    a = model.apply(one, tokens).logits
    with jax.set_mesh(mesh):
        b = jax.jit(model.apply)(two, tokens).logits
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)

    # python -m eval in a two-device process reads it too: the validation loss the 8-device
    # run logged (the library read it on one device above).
    for devices in (2,):
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(devices))
        done = subprocess.run([sys.executable, "-m", "eval", "loss", "--checkpoint", str(workdir)], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        assert abs(json.loads(done.stdout.strip().splitlines()[-1])["val_loss"] - logged) < 1e-5, devices


def test_a_non_finite_step_changes_nothing():
    """A poisoned step (a NaN in the teacher's parameters under distillation's KL) is
    skipped: params, optimizer state and router bias stay bit for bit; the metrics say so."""
    from tests.test_distill import _setup
    from train.stages.distill import make_distill_step

    cfg, model, variables, teacher, tvars, tx, schedule, state, batch = _setup()
    step = jax.jit(make_distill_step(model, teacher, tx, cfg.train, schedule, kl_weight=1.0))
    teacher_in = {"params": tvars["params"], "moe_bias": tvars["moe_bias"]}
    poisoned = dict(teacher_in, params=dict(tvars["params"], head=jax.tree.map(
        lambda x: x.at[(0,) * x.ndim].set(jnp.nan), tvars["params"]["head"])))
    good, m_good = step(state, teacher_in, batch)
    bad, m_bad = step(state, poisoned, batch)
    assert float(m_good["skipped"]) == 0.0 and float(m_bad["skipped"]) == 1.0
    assert not np.isfinite(float(m_bad["loss"]))
    same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), (bad.params, bad.opt_state, bad.moe_bias),
                        (state.params, state.opt_state, state.moe_bias))
    assert all(jax.tree.leaves(same))
    assert int(bad.step) == 1
    moved = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), good.params, state.params)
    assert not all(jax.tree.leaves(moved))  # the good step did update
    # The step after the skipped one logs the learning rate its update applies: the
    # optimizer's first (its count stayed 0), not the one of training step 1.
    _, m_next = step(bad, teacher_in, batch)
    assert float(schedule(0)) != float(schedule(1))
    assert float(m_next["lr"]) == float(schedule(0)) and float(m_good["lr"]) == float(schedule(0))


def test_a_run_that_keeps_diverging_stops_with_finite_checkpoints(tmp_path, capsys):
    """A learning rate of 1e30 sends the parameters to 1e30 after one step, then every loss
    is NaN: each bad step is skipped and the fifth in a row stops the run (status 1, one
    line naming the steps); what was saved holds only finite numbers."""
    workdir = tmp_path / "run"
    argv = ["--workdir", str(workdir)]
    for o in SMALL + ["train.lr=1e30", "train.warmup_steps=0", "train.steps=20", "train.checkpoint_every=1",
                      "train.sample_tokens=0", "train.batch_size=8", "train.max_bad_steps=5"]:
        argv += ["--set", o]
    assert train_main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: the loss or gradients were not finite for 5 steps in a row"), err
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert [r["skipped"] for r in records][-5:] == [1.0] * 5
    model, variables, run = dsjax.load_trained(str(workdir))  # the latest checkpoint
    assert run["checkpoint_step"] >= 1
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(variables))


def test_no_code_runs_untrusted_data():
    """No eval/exec/pickle/unsafe YAML on model output, datasets or checkpoints: the library,
    the entry points, the benchmarks and the recipes read data with json, safetensors, orbax and
    yaml.safe_load only (a scan of the source; `.eval()` on a torch module is a method, and a
    name in backticks is prose)."""
    import re

    pattern = re.compile(r"(?<![.\w`])(eval|exec)\(|(?<!def )(?<![.\w`])compile\(|pickle|literal_eval|marshal\.|yaml\.load\(|yaml\.unsafe_load"
                         r"|torch\.load|allow_pickle\s*=\s*True|__import__\(")
    hits = []
    for package in ("dsjax", "train", "eval", "sharding", "bench", "examples"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    for n, line in enumerate(open(path, encoding="utf-8"), 1):
                        code = line.split("#", 1)[0]
                        if pattern.search(code):
                            hits.append(f"{os.path.relpath(path, ROOT)}:{n}: {line.strip()}")
    assert not hits, "\n".join(hits)


# ----------------------------------------------------------------------------- bad input
def _bad_inputs(root):
    """Files for the bad-input table: an HF checkpoint (good, truncated, missing a tensor),
    a workdir of another model, data files and a tokenizer that do not load."""
    import yaml
    from safetensors.numpy import load_file, save_file

    from train.config import build_config

    cfg = build_config(None, SMALL).model
    model = dsjax.Transformer(cfg.replace(max_position_embeddings=64))
    variables = dsjax.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    hf = root / "hf"
    dsjax.save_pretrained(model, variables, str(hf))
    (shard,) = [f for f in os.listdir(hf) if f.endswith(".safetensors")]
    for name, edit in (("hf_truncated", "truncate"), ("hf_missing", "drop")):
        import shutil

        shutil.copytree(hf, root / name)
        path = root / name / shard
        if edit == "truncate":
            data = path.read_bytes()
            path.write_bytes(data[:len(data) // 2])
        else:
            tensors = load_file(str(path))
            tensors.pop(sorted(k for k in tensors if k.endswith("mlp.gate.weight"))[0])
            save_file(tensors, str(path))
    other = root / "other_model"
    other.mkdir()
    run = build_config(None, SMALL + ["model.hidden_size=32"])
    import dataclasses

    with open(other / "config.yaml", "w") as f:
        yaml.safe_dump({"stage": "pretrain", **dataclasses.asdict(run)}, f, sort_keys=False)
    (root / "afile").write_text("x")
    (root / "empty.txt").write_text("")
    (root / "bad.jsonl").write_text('{"prompt": "a", "response": "b"}\nnot json\n')
    (root / "tok.json").write_text("{")


BAD_TRAIN = [
    (["--set", "train.stepz=3"], "unknown config key train.stepz"),
    (["--set", "train.steps=abc"], "train.steps='abc' is not a valid int"),
    (["--set", "model.num_attention_heads=3", "--set", "mesh.tensor=2", "--set", "mesh.fsdp=4",
      "--set", "mesh.rules=fsdp_tp"], "does not divide"),
    (["--set", "mesh.fsdp=3"], "mesh"),
    (["--set", "train.batch_size=4"], "train.batch_size=4 does not divide over the 8 devices"),
    (["--set", "data.source={root}/nothing"], "is no file, folder or matching glob"),
    (["--set", "data.source={root}/empty.txt"], "need documents for both training and validation"),
    (["sft", "--set", "data.source={root}/bad.jsonl"], "bad.jsonl:2: not valid JSON"),
    (["--set", "data.tokenizer={root}/tok.json"], "is not a Hugging Face tokenizer.json"),
    (["--workdir", "{root}/afile"], "is a file, not a directory"),
    (["--workdir", "{root}/other_model"], "holds a different model"),
    (["sft", "--init", "{root}/other_model", "--set", "model.hidden_size=64"], "holds a different model"),
    (["sft", "--set", "init.hf={root}/hf_truncated"], "init.hf"),
    (["sft", "--set", "init.hf={root}/hf_missing"], "missing tensor"),
]


@pytest.fixture(scope="module")
def bad_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    _bad_inputs(root)
    return root


@pytest.mark.parametrize("argv, message", BAD_TRAIN, ids=[m for _, m in BAD_TRAIN])
def test_bad_input_is_one_line_status_2_and_overwrites_nothing(bad_root, capsys, argv, message):
    argv = [a.replace("{root}", str(bad_root)) for a in argv]
    if "--workdir" not in argv:
        argv += ["--workdir", str(bad_root / "wd")]
    sets = [a for o in SMALL + ["train.batch_size=8", "train.sample_tokens=0", "train.steps=1"]
            for a in ("--set", o) if not any(o.split("=")[0] + "=" in x for x in argv)]
    if "data.source" not in " ".join(argv) and argv[0] == "sft":
        sets += ["--set", f"data.source={bad_root}/bad.jsonl", "--set", "sft.strict=false"]
    before = {p: p.read_bytes() for p in bad_root.rglob("*") if p.is_file()}
    assert train_main(argv + sets) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err, err
    after = {p: p.read_bytes() for p in bad_root.rglob("*") if p.is_file()}
    assert after == before  # nothing written, nothing overwritten
    assert not (bad_root / "wd").exists()


def test_a_prompt_longer_than_the_context_is_one_line(bad_root, capsys):
    argv = ["generate", "--hf", str(bad_root / "hf"), "--tokenizer", "bytes", "--prompt", "x" * 100]
    assert eval_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "max_position_embeddings=64" in err and "\n" not in err, err
