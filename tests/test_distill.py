"""`python -m train distill` with a KL to the teacher: the teacher runs inside the jitted
step from frozen parameters passed in (sharded as the student's), the KL summed over the
vocabulary in chunks; no [B, T, V] tensor is an input of the step, and the loss is the
host-side teacher KL's."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsjax
from dsjax.losses import distillation_kl
from train.__main__ import main
from train.config import build_config
from train.optim import make_optimizer
from train.stages import all_stages
from train.stages.distill import make_distill_step
from train.steps import TrainState, make_train_step
from tests.test_train import SMALL

B, T = 2, 8


def _setup(teacher_changes=None):
    cfg = build_config(None, SMALL + ["train.bias_update_speed=0.01", "train.warmup_steps=0"], all_stages())
    model = dsjax.Transformer(cfg.model)
    boxed = model.init(jax.random.key(0), jnp.zeros((1, T), jnp.int32))
    variables = dsjax.unbox(boxed)
    teacher = dsjax.Transformer(cfg.model.replace(**(teacher_changes or {})))
    tvars = dsjax.unbox(teacher.init(jax.random.key(1), jnp.zeros((1, T), jnp.int32)))
    tx, schedule = make_optimizer(cfg.train, boxed["params"])
    state = TrainState(jnp.zeros((), jnp.int32), variables["params"], tx.init(variables["params"]),
                       variables["moe_bias"])
    tokens = np.random.default_rng(0).integers(2, 250, (B, T + 1)).astype(np.int32)
    mask = np.ones((B, T), bool)
    mask[0, :3] = False  # prompt tokens are not scored
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask}
    return cfg, model, variables, teacher, tvars, tx, schedule, state, batch


def _host_kl(teacher, tvars, model, params, moe_bias, batch, temperature):
    """The teacher's float32 [B, T, V] log-probabilities computed outside the step, and
    KL(teacher || student) from them, averaged over the scored tokens."""
    t = jax.nn.log_softmax(teacher.apply(tvars, batch["inputs"]).logits.astype(jnp.float32) / temperature)
    logits = model.apply({"params": params, "moe_bias": moe_bias}, batch["inputs"]).logits
    s = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature)
    per_token = np.asarray(jnp.sum(jnp.exp(t) * (t - s), axis=-1))
    return float((per_token * batch["mask"]).sum() / batch["mask"].sum())


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_distill_loss_is_the_host_side_teacher_kl(temperature):
    cfg, model, variables, teacher, tvars, tx, schedule, state, batch = _setup(
        dict(num_hidden_layers=1, first_k_dense_replace=1, num_nextn_predict_layers=0))
    weight = 0.5
    step = jax.jit(make_distill_step(model, teacher, tx, cfg.train, schedule, kl_weight=weight,
                                     temperature=temperature, chunks=3))
    teacher_in = {"params": tvars["params"], "moe_bias": tvars.get("moe_bias", {})}
    # The step's inputs: the state, the teacher's parameters and int/bool [B, T] batch
    # arrays; nothing of the vocabulary's width per token.
    V = cfg.model.vocab_size
    for leaf in jax.tree.leaves(step.lower(state, teacher_in, batch).args_info):
        assert tuple(leaf.shape)[-1:] != (V,) or len(leaf.shape) < 3, leaf
    new, metrics = step(state, teacher_in, batch)
    kl = _host_kl(teacher, tvars, model, state.params, state.moe_bias, batch, temperature)
    _, plain = jax.jit(make_train_step(model, tx, cfg.train, schedule))(state, batch)
    assert float(metrics["distill_kl"]) == pytest.approx(kl, abs=1e-5) and kl > 1e-3
    assert float(metrics["loss"]) == pytest.approx(float(plain["loss"]) + weight * kl, abs=1e-5)
    assert float(metrics["ce"]) == pytest.approx(float(plain["ce"]), abs=1e-6)
    assert set(plain) | {"distill_kl"} == set(metrics)


def test_chunked_kl_matches_the_whole_vocabulary_and_is_zero_against_itself():
    rng = np.random.default_rng(0)
    t = jnp.asarray(rng.normal(size=(2, 3, 37)) * 3, jnp.float32)
    s = jnp.asarray(rng.normal(size=(2, 3, 37)) * 3, jnp.bfloat16)
    lt, ls = jax.nn.log_softmax(t / 1.5), jax.nn.log_softmax(s.astype(jnp.float32) / 1.5)
    whole = jnp.sum(jnp.exp(lt) * (lt - ls), axis=-1)
    for chunks in (1, 4, 5, 37):
        np.testing.assert_allclose(distillation_kl(t, s, 1.5, chunks), whole, atol=1e-5)
    np.testing.assert_allclose(distillation_kl(t, t, 1.0, 4), 0.0, atol=1e-5)


def test_distill_from_a_workdir_teacher_runs_the_teacher_sharded_like_the_student(tmp_path, monkeypatch, capsys):
    from train.stages import distill

    teacher_dir = tmp_path / "teacher"
    common = SMALL + ["model.moe_impl=dense", "train.batch_size=8", "train.sample_tokens=0", "train.eval_every=2",
                      "train.schedule=constant", "train.mtp_lambda_switch=1.0", "train.bias_update_stop=1.0"]
    argv = ["--workdir", str(teacher_dir)]
    for o in common + ["train.steps=1"]:
        argv += ["--set", o]
    assert main(argv) == 0
    data = tmp_path / "data.jsonl"
    with open(data, "w") as f:
        for i in range(32):
            f.write(json.dumps({"prompt": f"{i}+{i % 5}=", "response": str(i + i % 5)}) + "\n")
    loaded = {}
    load = distill.load_teacher

    def watched(d, model, shardings):
        loaded["variables"] = load(d, model, shardings)
        return loaded["variables"]

    monkeypatch.setattr(distill, "load_teacher", watched)
    argv = ["distill", "--workdir", str(tmp_path / "student")]
    for o in common + ["train.steps=2", f"distill.teacher={teacher_dir}", f"distill.data={data}",
                       "distill.kl_weight=0.5"]:
        argv += ["--set", o]
    assert main(argv) == 0
    records = [json.loads(r) for r in open(tmp_path / "student" / "metrics.jsonl")]
    assert all(np.isfinite(r["distill_kl"]) and r["distill_kl"] >= 0 for r in records if "loss" in r)
    # The same architecture: every teacher array is laid out as the student's (fsdp over 8 devices).
    student, _, _ = dsjax.load_trained(str(tmp_path / "student"))
    wide = [x for x in jax.tree.leaves(loaded["variables"]["params"]) if x.ndim >= 2 and x.shape[-1] % 8 == 0]
    assert wide and all(len(x.sharding.device_set) == 8 for x in wide)
    assert any(not x.sharding.is_fully_replicated for x in wide)
