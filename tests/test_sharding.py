"""Sharded forward and train step on 8 fake CPU devices equal the one-device results."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import dsjax
from sharding.mesh import MeshConfig, make_mesh
from sharding.rules import ShardingError, activation_rules, logical_to_sharding, tree_shardings
from train.config import build_config
from train.optim import make_optimizer
from train.steps import TrainState, make_train_step, state_shardings

OVERRIDES = ["model.num_hidden_layers=3", "model.hidden_size=64", "model.intermediate_size=128",
             "model.num_attention_heads=4", "model.q_lora_rank=32", "model.kv_lora_rank=32",
             "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8", "model.v_head_dim=16",
             "model.n_routed_experts=8", "model.num_experts_per_tok=2", "model.moe_intermediate_size=32",
             "model.n_group=4", "model.topk_group=2", "model.vocab_size=256", "model.moe_impl=ragged",
             "train.batch_size=8", "train.seq_len=16", "train.steps=10", "train.bias_update_speed=0.01"]

MESHES = [
    (dict(data=8, fsdp=1), "fsdp"),
    (dict(fsdp=8), "fsdp"),
    (dict(data=2, fsdp=2, expert=2), "fsdp"),
    (dict(fsdp=2, tensor=2, expert=2), "fsdp_tp"),
    (dict(fsdp=1, expert=8), "fsdp_ep"),
]


@pytest.fixture(scope="module")
def reference():
    cfg = build_config("pretrain", OVERRIDES)
    model = dsjax.Transformer(cfg.model)
    tokens = jax.random.randint(jax.random.key(0), (8, 17), 2, 256)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    boxed = model.init(jax.random.key(1), batch["inputs"])
    variables = dsjax.unbox(boxed)
    variables["moe_bias"] = jax.tree.map(lambda b: b + 0.02 * jnp.arange(b.shape[-1]) / b.shape[-1],
                                         variables["moe_bias"])
    tx, schedule = make_optimizer(cfg.train, boxed["params"])
    state = TrainState(jnp.zeros((), jnp.int32), variables["params"], tx.init(variables["params"]),
                       variables["moe_bias"])
    logits = jax.jit(model.apply)(variables, batch["inputs"]).logits
    new_state, metrics = jax.jit(make_train_step(model, tx, cfg.train, schedule))(state, batch)
    return cfg, model, tx, schedule, state, batch, logits, new_state, metrics


@pytest.mark.parametrize("sizes, preset", MESHES, ids=[str(m[0]) for m in MESHES])
def test_sharded_equals_one_device(reference, sizes, preset):
    cfg, model, tx, schedule, state, batch, ref_logits, ref_state, ref_metrics = reference
    mesh = make_mesh(MeshConfig(**{"fsdp": 1, **sizes, "rules": preset}))
    rules = activation_rules(preset)
    boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16), jnp.int32))
    state_sh = state_shardings(boxed, tx, mesh, preset)
    batch_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp", "expert")))
    with jax.set_mesh(mesh):
        sharded = jax.device_put(state, state_sh)
        data = jax.device_put(batch, batch_sh)

        def forward(params, moe_bias, tokens):
            with nn.logical_axis_rules(rules):
                return model.apply({"params": params, "moe_bias": moe_bias}, tokens).logits

        logits = jax.jit(forward)(sharded.params, sharded.moe_bias, data["inputs"])
        step = jax.jit(make_train_step(model, tx, cfg.train, schedule, rules),
                       in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None))
        new_state, metrics = step(sharded, data)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5)
    for key in ("loss", "grad_norm", "max_vio", "balance_loss"):
        np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, atol=1e-6, err_msg=key)
    # The bias update saw the global expert loads.
    np.testing.assert_allclose(jax.device_get(new_state.moe_bias["moe_layers"]["ffn"]["gate"]["bias"]),
                               ref_state.moe_bias["moe_layers"]["ffn"]["gate"]["bias"], atol=1e-7)
    w1 = new_state.params["moe_layers"]["ffn"]["w1"]
    if sizes.get("expert", 1) > 1:
        assert w1.addressable_shards[0].data.shape[1] == 8 // sizes["expert"]  # experts are split
    np.testing.assert_allclose(jax.device_get(w1), ref_state.params["moe_layers"]["ffn"]["w1"], atol=1e-5)


def test_mesh_sizes_are_checked():
    with pytest.raises(ValueError, match="do not divide the 8 devices"):
        MeshConfig(data=3, fsdp=-1).sizes(8)
    with pytest.raises(ValueError, match="use 4 devices but 8 are present"):
        MeshConfig(data=2, fsdp=2).sizes(8)
    with pytest.raises(ValueError, match="only one mesh axis may be -1"):
        MeshConfig(data=-1, fsdp=-1).sizes(8)
    assert MeshConfig(data=2, fsdp=-1, tensor=2).sizes(8) == {"data": 2, "fsdp": 2, "expert": 1, "tensor": 2}


def test_undividable_axes_and_collisions_are_named():
    mesh = make_mesh(MeshConfig(fsdp=2, tensor=4))
    cfg = build_config("pretrain", OVERRIDES + ["model.num_attention_heads=6"]).model
    boxed = jax.eval_shape(dsjax.Transformer(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    with pytest.raises(ShardingError, match=r"\['attn'\].*axis 'heads' of size 6 does not divide mesh axes \('tensor',\)"):
        tree_shardings(boxed, mesh, "fsdp_tp")
    with pytest.raises(ShardingError, match="logical axes 'embed' and 'mlp' both map to mesh axis 'fsdp'"):
        logical_to_sharding(("embed", "mlp"), (8, 8), mesh, (("embed", ("fsdp",)), ("mlp", ("fsdp",))))
    with pytest.raises(ShardingError, match="unknown sharding rules preset 'zero'"):
        tree_shardings(boxed, mesh, "zero")


def test_fsdp_shards_every_large_parameter():
    cfg = dsjax.load_model_config("deepseek-v3-671b")
    boxed = jax.eval_shape(dsjax.Transformer(cfg).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    from sharding.rules import per_device_bytes
    sizes = {"data": 1, "fsdp": 32, "expert": 8, "tensor": 1}
    whole = per_device_bytes(boxed["params"], {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}, "fsdp")
    split = per_device_bytes(boxed["params"], sizes, "fsdp")
    assert whole / split > 200  # close to 256-way; attention weights repeat over the 8 expert groups
    # The up-projections shard on their compressed input; wq_a on its model dimension.
    from sharding.rules import logical_to_spec, PRESETS
    rules = PRESETS["fsdp"]["params"]
    assert logical_to_spec(("layers", "q_lora", "heads", "head_dim"), (58, 1536, 128, 192), sizes, rules,
                           strict=False) == jax.sharding.PartitionSpec(None, "fsdp", None, None)
    assert logical_to_spec(("layers", "embed", "q_lora"), (58, 7168, 1536), sizes, rules,
                           strict=False) == jax.sharding.PartitionSpec(None, "fsdp", None)


def _dry_run(*args):
    import subprocess
    import sys
    from tests.test_train import ROOT
    cmd = [sys.executable, "-m", "train", "--dry-run", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})


def test_dry_run_memory_plan():
    ok = _dry_run("--devices", "512", "--backend", "gpu", "--set", "model.preset=deepseek-v3-671b", "--set", "mesh.fsdp=64",
                  "--set", "mesh.expert=8", "--set", "model.remat_policy=full", "--set", "train.batch_size=512",
                  "--set", "train.seq_len=4096")
    assert ok.returncode == 0, ok.stderr
    for row in ("parameters (fp32)", "gradients (fp32)", "AdamW moments (fp32)", "activations (full)",
                "gathered layers (2, fsdp)", "fits", "MoE dispatch 'expert-parallel'"):
        assert row in ok.stdout
    params = float(ok.stdout.split("parameters (fp32)")[1].split()[0])
    assert 5.0 < params < 6.5  # 682.6B fp32 parameters over 512 devices, attention repeated 8x
    # One MoE layer gathered over fsdp (its 32 local experts whole): 2 x (bf16 weights + fp32 gradient).
    gathered = float(ok.stdout.split("gathered layers (2, fsdp)")[1].split()[0])
    assert 17.0 < gathered < 19.5
    too_big = _dry_run("--devices", "256", "--set", "model.preset=deepseek-v3-671b", "--set", "mesh.fsdp=256",
                       "--set", "train.batch_size=256", "--set", "train.seq_len=4096")
    assert too_big.returncode == 2
    assert "GiB per device but a device has 80 GiB" in too_big.stderr and "Traceback" not in too_big.stderr
    bad = _dry_run("--devices", "256", "--set", "mesh.fsdp=-1", "--set", "mesh.tensor=3")
    assert bad.returncode == 2 and "do not divide the 256 devices" in bad.stderr


@pytest.mark.parametrize("sizes, preset, expected", [
    (dict(fsdp=1, expert=8), "fsdp_ep", ("expert", ("expert",), None)),
    (dict(data=2, fsdp=2, expert=2), "fsdp", ("expert", ("data", "fsdp", "expert"), None)),
    (dict(fsdp=2, tensor=2, expert=2), "fsdp_tp", ("expert", ("fsdp", "expert"), "tensor")),
    (dict(fsdp=8), "fsdp", None),
])
def test_expert_parallel_dispatch_is_chosen(sizes, preset, expected):
    # The MoE layer takes the shard_map path exactly when the experts are split, even
    # though the batch also maps to the 'expert' mesh axis.
    from dsjax.moe import expert_parallel_axes

    mesh = make_mesh(MeshConfig(**{"fsdp": 1, **sizes, "rules": preset}))
    with jax.set_mesh(mesh), nn.logical_axis_rules(activation_rules(preset)):
        assert expert_parallel_axes() == expected


def test_dry_run_plan_agrees_with_the_compiled_step():
    # The plan of `small` on 8 devices (fsdp=8, the CPU's blocked dispatch) against XLA's
    # memory_analysis of the same compiled train step: arguments (parameters, AdamW
    # moments, batch) plus temporaries (gradients, activations, gathered weights).
    import dataclasses

    from bench.scale import analyse
    from train.plan import memory_plan

    cfg = build_config("pretrain", ["model.preset=small", "train.batch_size=16", "train.seq_len=256"])
    compiled = analyse(cfg, dict(fsdp=8), 8)
    plan = memory_plan(dataclasses.replace(cfg, mesh=MeshConfig(fsdp=8)), 8, 80)
    assert plan.dispatch == "blocked"
    ratio = plan.total / (compiled["argument_bytes"] + compiled["temp_bytes"])
    assert 0.75 <= ratio <= 1.25, ratio
