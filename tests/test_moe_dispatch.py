"""The routed experts' dispatch: the CPU wing's blocked and gather forms equal the dense
reference (values and gradients) under any routing, and `moe_impl='auto'` resolves per
platform and, on a CPU, picks per call size. Under a mesh each device routes its own tokens, and expert
parallelism moves each token copy only to its expert's device, in rounds when routing is
skewed (dropless). Values and gradients equal the one-device dispatch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from dsjax import impl, moe
from dsjax.cpu import moe as cpu_moe
from dsjax.moe import expert_parallel
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


def _routing(kind: str, n: int, k: int, key):
    """[n, k] distinct experts per token: random; over experts 0-2 only (the rest get no
    token); or every token routed to expert 5 (plus random others)."""
    pick = jnp.argsort(jax.random.uniform(key, (n, E)), axis=-1)
    if kind == "random":
        return pick[:, :k].astype(jnp.int32)
    if kind == "empty_experts":
        return pick[:, :k].astype(jnp.int32) % 3 if k == 1 else jnp.argsort(
            jax.random.uniform(key, (n, 3)), axis=-1)[:, :k].astype(jnp.int32)
    rest = jnp.where(pick == 5, E, pick)  # expert 5 sorts last among the others
    return jnp.concatenate([jnp.full((n, 1), 5), jnp.sort(rest, axis=-1)[:, :k - 1]], axis=-1).astype(jnp.int32)


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
    ex = expert_parallel._Exchange("expert", None, 8, int(expert_parallel.EP_CAPACITY * 16 / 8), None, False)
    assert ex.pair == 3

    def count(indices):
        S, _ = expert_parallel._plan(ex, jnp.sort(indices.reshape(-1)), E // 8)
        return expert_parallel._rounds(ex, S, lambda done, n: n + 1, jnp.int32(0))[None]

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


@pytest.mark.parametrize("platform", ["tpu", "gpu", "cpu"])
def test_exchange_follows_the_platform_compiled_for(platform):
    # No `ragged` given: the exchange is chosen for the devices of the mesh the program is
    # traced for, not this host's backend. An abstract mesh of TPU (or GPU) devices, as a
    # TPU topology lowered from this CPU host gives, gets ragged_all_to_all; CPU devices
    # get fixed-slot all_to_all.
    x, weights, indices, w1, w3, w2 = _inputs(skew=False)
    device = jax.sharding.AbstractDevice(device_kind={"tpu": "TPU v5p", "gpu": "NVIDIA H100", "cpu": "cpu"}[platform],
                                         num_cores=None, platform={"gpu": "cuda"}.get(platform, platform))
    mesh = jax.sharding.AbstractMesh((8,), ("expert",), abstract_device=device)
    ep = lambda *a: moe.experts_expert_parallel(*a, "expert", ("expert",), None)
    abstract = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (x, weights, w1, w3, w2, indices)]
    with jax.sharding.use_abstract_mesh(mesh):
        assert expert_parallel.compiled_for() == platform
        text = str(jax.jit(_loss(ep)).trace(*abstract).jaxpr)
    assert ("ragged_all_to_all" in text) == (platform != "cpu")
    assert ("all_to_all" in text.replace("ragged_all_to_all", "")) == (platform == "cpu")


@pytest.mark.parametrize("dispatch", [moe.experts_ragged, cpu_moe.experts_blocked], ids=["ragged", "blocked"])
def test_data_parallel_dispatch_sorts_local_copies(dispatch):
    # Under fsdp=8 each device sorts its own 16 copies, not the global 128.
    x, weights, indices, w1, w3, w2 = _inputs(skew=False)
    (ref_loss, ref_y), ref_grads = jax.jit(_loss(moe.experts_ragged))(x, weights, w1, w3, w2, indices)
    mesh = make_mesh(MeshConfig(fsdp=8))
    local = lambda *a: moe.experts_local(*a, ("fsdp",), None, dispatch=dispatch)
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


@pytest.mark.parametrize("routing", ["random", "empty_experts", "one_expert_takes_all"])
@pytest.mark.parametrize("n, k, block", [(64, 2, None), (37, 2, 8), (5, 3, 16), (1, 2, None)])
@pytest.mark.parametrize("impl", ["blocked", "gather"])
def test_cpu_dispatch_equals_dense(impl, routing, n, k, block):
    # Values and gradients (x, routing weights, w1, w3, w2) in float32, with blocks that
    # do not divide the copies, experts with no token and one expert holding every token.
    keys = jax.random.split(jax.random.key(n * 10 + k), 7)
    x = jax.random.normal(keys[0], (n, D))
    weights = jax.random.uniform(keys[1], (n, k))
    indices = _routing(routing, n, k, keys[2])
    w1, w3 = (0.3 * jax.random.normal(key, (E, D, F)) for key in keys[3:5])
    w2 = 0.3 * jax.random.normal(keys[5], (E, F, D))
    dispatch = cpu_moe.experts_gather if impl == "gather" else (
        lambda *a: cpu_moe.experts_blocked(*a, block=block))
    (ref_loss, ref_y), ref_grads = jax.jit(_loss(moe.experts_dense))(x, weights, w1, w3, w2, indices)
    (loss, y), grads = jax.jit(_loss(dispatch))(x, weights, w1, w3, w2, indices)
    np.testing.assert_allclose(y, ref_y, atol=1e-5, rtol=1e-5)
    for g, ref in zip(grads, ref_grads):
        np.testing.assert_allclose(g, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("d, f, block", [(64, 48, 16), (48, 37, 24), (300, 56, 8)])
def test_blocked_kernel_equals_xla_blocks(monkeypatch, d, f, block):
    # The native kernel (`cpu_kernels.blocked_swiglu_fwd` and its backward) against XLA's
    # loops over the same blocks, values and gradients, with shapes that take each of the
    # kernel's paths whatever vector width it was built for (16 floats with AVX-512, 8
    # with AVX2): panels of two vectors and of one, single columns, row tiles of 12 or 6,
    # 2 and 1, a contraction longer than one 256 chunk (d = 300), and experts with no
    # token (routing over experts 0-2 only).
    if not cpu_moe.kernels.applies(jnp.float32):
        pytest.skip(reason="the CPU wing's native kernels did not build here (no C++ compiler?)")
    n, k = 45, 2
    keys = jax.random.split(jax.random.key(d + f), 6)
    x = jax.random.normal(keys[0], (n, d))
    weights = jax.random.uniform(keys[1], (n, k))
    indices = _routing("empty_experts", n, k, keys[2])
    scale = 2.4 / d ** 0.5  # 0.3 at d = 64: hidden units of about the same size at every d
    w1, w3 = (scale * jax.random.normal(key, (E, d, f)) for key in keys[3:5])
    w2 = 0.3 * jax.random.normal(keys[5], (E, f, d))
    dispatch = lambda *a: cpu_moe.experts_blocked(*a, block=block)  # noqa: E731
    hlo = jax.jit(_loss(dispatch)).lower(x, weights, w1, w3, w2, indices).as_text()
    assert "dsjax_blocked_swiglu_fwd" in hlo and "dsjax_blocked_swiglu_bwd" in hlo
    (loss, y), grads = jax.jit(_loss(dispatch))(x, weights, w1, w3, w2, indices)
    monkeypatch.setattr(cpu_moe, "blocked_kernel_applies", lambda *a: False)
    assert "dsjax_blocked" not in jax.jit(_loss(dispatch)).lower(x, weights, w1, w3, w2, indices).as_text()
    (ref_loss, ref_y), ref_grads = jax.jit(_loss(dispatch))(x, weights, w1, w3, w2, indices)
    np.testing.assert_allclose(y, ref_y, atol=1e-5, rtol=1e-5)
    for g, ref in zip(grads, ref_grads):
        np.testing.assert_allclose(g, ref, atol=1e-4, rtol=1e-5)
    assert not np.asarray(grads[2])[3:].any()  # experts without a token: zero gradients


def test_block_layout_gives_each_block_one_expert():
    # Sizes 5, 0, 9, 0, 2, 0, 0, 0 copies in blocks of 4: 2 + 3 + 1 used blocks of the
    # ceil((16 + 8 * 3) / 4) = 10 the static bound allows.
    flat = jnp.asarray([0] * 5 + [2] * 9 + [4] * 2, jnp.int32)
    indices = flat[jax.random.permutation(jax.random.key(0), flat.size)].reshape(8, 2)
    row, copy, first, count = cpu_moe._block_layout(indices, E, 4)
    assert copy.shape == (40,) and first.shape == count.shape == (E,)
    assert count.tolist() == [2, 0, 3, 0, 1, 0, 0, 0]
    assert first.tolist() == [0, 2, 2, 5, 5, 6, 6, 6]
    np.testing.assert_array_equal(copy[row], np.arange(16))  # each copy's row holds it
    blocks = np.asarray(copy).reshape(10, 4)
    for e in range(E):  # an expert's blocks hold its copies and padding (16) only
        held = blocks[int(first[e]):int(first[e] + count[e])]
        assert (held < 16).sum() == (np.asarray(flat) == e).sum()
        assert (np.asarray(indices).reshape(-1)[held[held < 16]] == e).all()
    assert (blocks[6:] == 16).all()


def test_block_rows_keep_padding_below_the_copies():
    assert cpu_moe.block_rows(8192, 24) == 128  # small's 8 x 256 training step, k = 4
    assert cpu_moe.block_rows(32, 24) == 8  # decoding 8 sequences
    assert cpu_moe.block_rows(2048, 256) == 8
    assert cpu_moe.block_rows(2048, 24) == 64  # 512 tokens per device
    assert cpu_moe.block_rows(10**6, 256) == 128


def test_auto_dispatch_per_platform_and_call_size():
    import dsjax

    cfg = dsjax.load_model_config("small")  # 24 experts, 4 per token
    gpu, tpu, cpu = (impl.resolve(cfg, p) for p in ("gpu", "tpu", "cpu"))
    assert gpu.moe_impl == tpu.moe_impl == "ragged" and impl.moe_dispatch(gpu, tokens=1) == "ragged"
    assert cpu.moe_impl == "cpu"
    assert impl.moe_dispatch(cpu) == impl.moe_dispatch(cpu, tokens=2048) == "blocked"
    assert impl.moe_dispatch(cpu, tokens=1) == impl.moe_dispatch(cpu, tokens=12) == "gather"  # <= 2 per expert
    assert impl.moe_dispatch(cpu, tokens=13) == impl.moe_dispatch(cpu, tokens=96) == "blocked"
    assert impl.resolve(cfg.replace(precision="fp8"), "cpu").moe_impl == "dense"  # no FP8 form
    assert impl.resolve(cfg.replace(precision="fp8"), "gpu").moe_impl == "ragged"
    for name in ("dense", "ragged", "blocked", "gather"):
        for platform in ("cpu", "gpu"):
            assert impl.moe_dispatch(impl.resolve(cfg.replace(moe_impl=name), platform), tokens=1) == name


@pytest.mark.parametrize("tokens, expected", [(1, "gather"), (8, "gather"), (9, "blocked")])
def test_moe_layer_runs_the_auto_dispatch_for_its_call(monkeypatch, tokens, expected):
    import dsjax
    from dsjax.moe import MoE

    cfg = dsjax.ModelConfig(vocab_size=64, hidden_size=D, intermediate_size=32, moe_intermediate_size=F,
                            num_hidden_layers=1, num_attention_heads=2, q_lora_rank=8, kv_lora_rank=8,
                            qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=E,
                            num_experts_per_tok=K, n_group=1, topk_group=1, first_k_dense_replace=0)
    x = jax.random.normal(jax.random.key(0), (1, tokens, D))
    variables = MoE(cfg).init(jax.random.key(1), x)
    ran = []
    for kind, name in [("moe", "dense"), ("moe", "blocked"), ("moe", "gather"), ("moe_shared", "gather")]:
        fn = impl.lookup(kind, name)
        monkeypatch.setitem(impl._TABLE, (kind, name), lambda *a, name=name, fn=fn: ran.append(name) or fn(*a))
    y, _, _ = MoE(cfg).apply(variables, x)
    y_ref, _, _ = MoE(cfg.replace(moe_impl="dense")).apply(variables, x)
    assert ran == [expected, "dense"]
    np.testing.assert_allclose(y, y_ref, atol=1e-5)
