"""The routed experts' dispatch under a mesh: each device routes its own tokens, and
expert parallelism moves each token copy only to its expert's device, in rounds when
routing is skewed (dropless). Values and gradients equal the one-device dispatch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from dsjax import moe
from sharding.mesh import MeshConfig, make_mesh

N, D, F, E, K = 64, 16, 8, 8, 2


def _inputs(skew: bool):
    keys = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(keys[0], (N, D))
    weights = jax.random.uniform(keys[1], (N, K))
    if skew:  # every token to experts 0 and 1: one device gets all copies, many rounds
        indices = jnp.tile(jnp.array([[0, 1]], jnp.int32), (N, 1))
    else:
        indices = jnp.argsort(jax.random.uniform(keys[2], (N, E)), axis=-1)[:, :K].astype(jnp.int32)
    w1, w3 = (0.3 * jax.random.normal(k, (E, D, F)) for k in keys[3:5])
    w2 = 0.3 * jax.random.normal(keys[5], (E, F, D))
    return x, weights, indices, w1, w3, w2


def _loss(dispatch):
    def f(x, weights, w1, w3, w2, indices):
        y = dispatch(x, weights, indices, w1, w3, w2)
        return (y * jnp.cos(jnp.arange(y.size).reshape(y.shape))).sum(), y
    return jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4), has_aux=True)


@pytest.mark.parametrize("skew", [False, True], ids=["random", "skewed"])
@pytest.mark.parametrize("sizes, token_axes", [
    (dict(fsdp=1, expert=8), ("expert",)),
    (dict(fsdp=2, expert=4), ("fsdp", "expert")),
], ids=["expert8", "fsdp2_expert4"])
def test_expert_parallel_equals_one_device(sizes, token_axes, skew):
    x, weights, indices, w1, w3, w2 = _inputs(skew)
    (ref_loss, ref_y), ref_grads = jax.jit(_loss(moe.experts_ragged))(x, weights, w1, w3, w2, indices)
    mesh = make_mesh(MeshConfig(**sizes))
    rows = NamedSharding(mesh, P(token_axes))
    experts = NamedSharding(mesh, P("expert"))
    ep = lambda *a: moe.experts_expert_parallel(*a, "expert", token_axes, None)
    with jax.set_mesh(mesh):
        args = jax.device_put((x, weights, w1, w3, w2, indices), (rows, rows, experts, experts, experts, rows))
        (loss, y), grads = jax.jit(_loss(ep))(*args)
    np.testing.assert_allclose(y, ref_y, atol=1e-5)
    for g, ref in zip(grads, ref_grads):
        np.testing.assert_allclose(g, ref, atol=1e-5)


def test_rounds_follow_the_pair_capacity():
    # 64 tokens x 2 copies over 8 devices: 16 copies each, 2 per pair on average, so a
    # pair moves at most 3 rows a round. With every token routed to experts 0 and 1 (on
    # devices 0 and 1), each source sends 8 copies to each of them: ceil(8 / 3) = 3 rounds.
    x, weights, indices, w1, w3, w2 = _inputs(skew=True)
    mesh = make_mesh(MeshConfig(fsdp=1, expert=8))
    ex = moe._Exchange("expert", None, 8, int(moe.EP_CAPACITY * 16 / 8), None, False)
    assert ex.pair == 3

    def count(indices):
        S, _ = moe._plan(ex, jnp.sort(indices.reshape(-1)), E // 8)
        return moe._rounds(ex, S, lambda done, n: n + 1, jnp.int32(0))[None]

    with jax.set_mesh(mesh):
        rounds = jax.jit(jax.shard_map(count, in_specs=P("expert"), out_specs=P("expert")))(
            jax.device_put(indices, NamedSharding(mesh, P("expert"))))
    assert rounds.tolist() == [3] * 8


def test_ragged_exchange_lowers_to_ragged_all_to_all():
    # The GPU/TPU form (forced here on a CPU, which cannot run it): the rows travel in
    # ragged_all_to_all, and no collective gathers the token copies.
    x, weights, indices, w1, w3, w2 = _inputs(skew=False)
    mesh = make_mesh(MeshConfig(fsdp=1, expert=8))
    ep = lambda *a: moe.experts_expert_parallel(*a, "expert", ("expert",), None, ragged=True)
    with jax.set_mesh(mesh):
        text = jax.jit(_loss(ep)).lower(x, weights, w1, w3, w2, indices).as_text()
    assert text.count("ragged_all_to_all") >= 4  # rows and ids out, outputs back; again in the backward pass
    assert "all_to_all\"" not in text.replace("ragged_all_to_all", "")
    gathers = [line for line in text.splitlines() if "all_gather" in line]
    assert gathers and all(line.endswith("-> tensor<8x8xi32>") for line in gathers)  # only the ep x ep sizes


def test_data_parallel_dispatch_sorts_local_copies():
    # Under fsdp=8 each device sorts its own 16 copies, not the global 128.
    x, weights, indices, w1, w3, w2 = _inputs(skew=False)
    (ref_loss, ref_y), ref_grads = jax.jit(_loss(moe.experts_ragged))(x, weights, w1, w3, w2, indices)
    mesh = make_mesh(MeshConfig(fsdp=8))
    local = lambda *a: moe.experts_local(*a, ("fsdp",), None)
    with jax.set_mesh(mesh):
        rows = NamedSharding(mesh, P("fsdp"))
        args = jax.device_put((x, weights, w1, w3, w2, indices), (rows, rows) + (NamedSharding(mesh, P()),) * 3 + (rows,))
        step = jax.jit(_loss(local))
        (loss, y), grads = step(*args)
        hlo = step.lower(*args).compile().as_text()
    np.testing.assert_allclose(y, ref_y, atol=1e-5)
    for g, ref in zip(grads, ref_grads):
        np.testing.assert_allclose(g, ref, atol=1e-5)
    sorts = [line for line in hlo.splitlines() if " sort(" in line]
    assert sorts and not any(f"[{N * K}]" in line for line in sorts)
