"""Generation on 8 fake devices: with fsdp- and expert-sharded parameters it gives the
one-device tokens, runs where the parameters are (no device-to-host copy), creates the
cache sharded over the batch axes and compiles once."""

import contextlib
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsjax
from dsjax import decoding
from dsjax.model import init_cache
from sharding.mesh import MeshConfig, make_mesh
from sharding.rules import activation_rules, tree_shardings

B, N, BUCKET = 8, 4, 8


@contextlib.contextmanager
def no_host_copies():
    """Reading any jax.Array onto the host (jax.device_get, np.asarray, float, ...) raises
    (jax's transfer guard does not watch CPU devices)."""
    def refuse(self, *args, **kwargs):
        raise AssertionError(f"an array of shape {self.shape} was copied to the host")

    array_type = type(jnp.zeros(()))
    with mock.patch.object(array_type, "_value", property(refuse)), mock.patch.object(array_type, "__array__", refuse):
        yield


@pytest.fixture(scope="module")
def setup():
    cfg = dsjax.load_model_config(
        "tiny", vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, q_lora_rank=32,
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=32, attn_impl="absorb")
    model = dsjax.Transformer(cfg)
    boxed = model.init(jax.random.key(0), jnp.zeros((1, BUCKET), jnp.int32))
    variables = dsjax.unbox(boxed)
    # Larger weights give peaked, varied predictions; a router bias that matters.
    variables["params"] = jax.tree.map(lambda x: x * 3 if x.ndim >= 2 else x, variables["params"])
    variables["moe_bias"] = jax.tree.map(lambda b: b + 0.01 * jnp.arange(b.shape[-1]), variables["moe_bias"])
    rng = np.random.default_rng(0)
    prompts = rng.integers(2, 64, (B, BUCKET)).astype(np.int32)
    lengths = rng.integers(1, BUCKET + 1, B).astype(np.int32)
    ref = decoding.generate(model, variables, prompts, lengths, max_new_tokens=N, prompt_bucket=BUCKET)
    return model, boxed, variables, prompts, lengths, ref


def _sharded(boxed, variables, mesh, preset):
    shardings = tree_shardings(boxed, mesh, preset)
    return jax.device_put(variables, {k: shardings[k] for k in variables})


def _check(out, ref, rows=slice(None)):
    np.testing.assert_array_equal(out.tokens, ref.tokens[rows])
    np.testing.assert_allclose(out.logprobs, ref.logprobs[rows], atol=1e-4)
    np.testing.assert_array_equal(out.lengths, ref.lengths[rows])
    assert out.tokens.sharding.is_fully_replicated


def test_batch_rules_split_the_rows_where_they_divide():
    mesh = make_mesh(MeshConfig(data=2, fsdp=4))
    rules = activation_rules("fsdp")
    for rows, axes in ((8, ("data", "fsdp")), (4, ("data",)), (2, ("data",)), (1, None)):
        adapted, spec = decoding._batch_rules(rules, mesh, rows)
        assert dict(adapted)["batch"] == axes and spec == jax.sharding.PartitionSpec(axes)
        assert dict(adapted)["experts"] == ("expert",)


def test_fsdp_sharded_generation_equals_one_device(setup):
    model, boxed, variables, prompts, lengths, ref = setup
    mesh, rules = make_mesh(MeshConfig(data=2, fsdp=4)), activation_rules("fsdp")
    sharded = _sharded(boxed, variables, mesh, "fsdp")
    assert sharded["params"]["embed"].addressable_shards[0].data.shape == (64, 64 // 4)  # split over fsdp
    # The active mesh and rules (as in a training run); nothing, the parameters included,
    # is copied to the host while generating.
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules), no_host_copies():
        out = dsjax.generate(model, sharded, prompts, lengths, max_new_tokens=N, prompt_bucket=BUCKET)
        compiled = decoding._generate_plain._cache_size()
        # Other prompts in the same bucket: the same program.
        dsjax.generate(model, sharded, prompts[::-1], lengths[::-1], max_new_tokens=N, prompt_bucket=BUCKET)
        assert decoding._generate_plain._cache_size() == compiled
        spec = dsjax.generate(model, sharded, prompts, lengths, max_new_tokens=N, prompt_bucket=BUCKET,
                              speculative=True)
        # The cache is created split over the batch axes.
        cache = jax.jit(lambda: init_cache(model, B, 16))()
    _check(out, ref)
    _check(spec, ref)  # greedy speculative decoding gives the plain tokens
    c_kv = cache["moe_layers"]["attn"]["cache_c_kv"]["value"]  # [L, B, S, C]
    assert c_kv.sharding.spec[:2] == (None, ("data", "fsdp")), c_kv.sharding
    assert c_kv.addressable_shards[0].data.shape == (1, 1, 16, 32)


def test_expert_parallel_generation_equals_one_device(setup, monkeypatch):
    import sharding
    from dsjax.moe import layer as moe

    model, boxed, variables, prompts, lengths, ref = setup
    prompt_lengths = lengths
    chosen = []
    real = moe.expert_parallel_axes
    monkeypatch.setattr(moe, "expert_parallel_axes", lambda: chosen.append(real()) or chosen[-1])
    # As README.md shows it: the mesh and rules as arguments.
    mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=2, expert=4))
    sharded_variables = _sharded(boxed, variables, mesh, "fsdp_ep")
    assert sharded_variables["params"]["moe_layers"]["ffn"]["w1"].addressable_shards[0].data.shape[1] == 8 // 4
    with no_host_copies():
        gen = dsjax.generate(model, sharded_variables, prompts, prompt_lengths, max_new_tokens=N,
                             mesh=mesh, rules=sharding.activation_rules("fsdp_ep"), prompt_bucket=BUCKET)
        one = dsjax.generate(model, sharded_variables, prompts[:1], prompt_lengths[:1], max_new_tokens=N,
                             mesh=mesh, rules=sharding.activation_rules("fsdp_ep"), prompt_bucket=BUCKET)
    _check(gen, ref)
    _check(one, ref, slice(0, 1))  # one row: replicated over the batch axes, experts still split
    assert ("expert", ("fsdp", "expert"), None) in chosen and ("expert", (), None) in chosen, chosen
