"""Blockwise attention (model.attn_kernel=blockwise) and the cuDNN-shaped fused call equal
the dense softmax in value and gradient, with causal masks, packed segments and padding,
in the naive and the absorbed MLA forms; blockwise never holds all the scores and skips
the masked key blocks of causal calls at every length (counted by XLA:TPU's cost
analysis where libtpu is installed). The splash kernel (attn_kernel=splash, TPUs), run in
Pallas's interpreter here, equals blockwise with MLA's head widths, packed segments and
under a mesh; a TPU program of the model with every choice on 'auto' holds it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsjax
from dsjax.attention import blockwise_attention, fused_attention
from dsjax.mla import masked_softmax
from dsjax.model import attention_mask


def _dense(q, k, v, mask, scale):
    probs = masked_softmax(jnp.einsum("bthk,bshk->bhts", q, k) * scale, mask)
    return jnp.einsum("bhts,bshv->bthv", probs, v)


def _inputs(T=37, seed=0):
    rng = np.random.default_rng(seed)
    B, H, K, V = 2, 3, 8, 5
    q, k = (jnp.asarray(rng.normal(size=(B, T, H, K)), jnp.float32) for _ in range(2))
    v = jnp.asarray(rng.normal(size=(B, T, H, V)), jnp.float32)
    segments = np.ones((B, T), np.int32)
    segments[0, 20:] = 2  # two packed examples
    segments[1, 30:] = 0  # right padding
    mask = attention_mask(B, T, jnp.asarray(segments))
    return q, k, v, mask, jnp.asarray(rng.normal(size=(B, T, H, V)), jnp.float32)


@pytest.mark.parametrize("block_q, block_k", [(8, 16), (16, 8), (64, 64), (5, 37)])
def test_blockwise_equals_dense_in_value_and_gradient(block_q, block_k):
    q, k, v, mask, w = _inputs()
    a = _dense(q, k, v, mask, 0.3)
    b = blockwise_attention(q, k, v, mask, 0.3, block_q=block_q, block_k=block_k)
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5)
    ga = jax.grad(lambda *x: (_dense(*x, mask, 0.3) * w).sum(), argnums=(0, 1, 2))(q, k, v)
    gb = jax.grad(lambda *x: (blockwise_attention(*x, mask, 0.3, block_q, block_k) * w).sum(),
                  argnums=(0, 1, 2))(q, k, v)
    for x, y in zip(ga, gb):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-5)


@pytest.mark.parametrize("T, rows, chunks", [(200, 64, 3), (256, 64, 4), (130, 64, 2), (256, None, 2)])
def test_causal_chunks_equal_the_whole_call(T, rows, chunks, monkeypatch):
    """`causal=True` on a short call splits the queries into chunks that see only the keys
    up to their end; with packed segments, padding and a shared key head, values and
    gradients equal dense attention's, and the chunks are really taken (`rows`: the
    CAUSAL_CHUNK they are cut at, None for the default)."""
    import dsjax.attention as attention

    if rows:
        monkeypatch.setattr(attention, "CAUSAL_CHUNK", rows)

    rng = np.random.default_rng(1)
    B, H, K, V = 2, 3, 8, 4
    q, k = (jnp.asarray(rng.normal(size=(B, T, H, K)), jnp.float32) for _ in range(2))
    v, w = (jnp.asarray(rng.normal(size=(B, T, H, V)), jnp.float32) for _ in range(2))
    segments = np.ones((B, T), np.int32)
    segments[0, T // 3:] = 2
    segments[1, T - 20:] = 0
    mask = attention_mask(B, T, jnp.asarray(segments))
    calls = []
    inner = attention._attention
    monkeypatch.setattr(attention, "_attention", lambda q, *a: calls.append(q.shape[2]) or inner(q, *a))
    for kh in (H, 1):  # per-head keys, and one shared key head
        ks, vs = k[:, :, :kh], v[:, :, :kh]

        def full(q, k, v):
            return _dense(q, jnp.repeat(k, H // k.shape[2], 2), jnp.repeat(v, H // v.shape[2], 2), mask, 0.3)

        chunked = lambda q, k, v: blockwise_attention(q, k, v, mask, 0.3, causal=True)  # noqa: E731
        np.testing.assert_allclose(np.asarray(chunked(q, ks, vs)), np.asarray(full(q, ks, vs)), atol=1e-5)
        ga = jax.grad(lambda *x: (full(*x) * w).sum(), argnums=(0, 1, 2))(q, ks, vs)
        gb = jax.grad(lambda *x: (chunked(*x) * w).sum(), argnums=(0, 1, 2))(q, ks, vs)
        for x, y in zip(ga, gb):
            np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-5)
    assert calls[:chunks] == [round((i + 1) * T / chunks) - round(i * T / chunks) for i in range(chunks)]
    calls.clear()
    blockwise_attention(q, k, v, mask, 0.3)  # not promised causal: one call
    assert calls == [T]


def test_shared_key_head_equals_the_keys_broadcast_to_every_head():
    """One key/value head shared by every query head (the absorbed form's latents):
    equals dense attention on the keys broadcast to all heads; its gradients are the
    per-head gradients summed."""
    q, k, v, mask, w = _inputs()
    k1, v1 = k[:, :, :1], v[:, :, :1]
    H = q.shape[2]
    full = lambda q, k1, v1: _dense(q, jnp.repeat(k1, H, 2), jnp.repeat(v1, H, 2), mask, 0.3)
    shared = lambda q, k1, v1: blockwise_attention(q, k1, v1, mask, 0.3, block_q=16, block_k=8)
    np.testing.assert_allclose(np.asarray(shared(q, k1, v1)), np.asarray(full(q, k1, v1)), atol=1e-5)
    ga = jax.grad(lambda *x: (full(*x) * w).sum(), argnums=(0, 1, 2))(q, k1, v1)
    gb = jax.grad(lambda *x: (shared(*x) * w).sum(), argnums=(0, 1, 2))(q, k1, v1)
    for x, y in zip(ga, gb):
        assert x.shape == y.shape
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-5)


def test_fused_call_equals_dense_with_the_value_head_padded():
    """jax.nn.dot_product_attention as MLA calls it on GPUs (V narrower than K, padded and
    cut back), run here with its XLA implementation: the dense product in value and
    gradient with packed segments and padding."""
    q, k, v, mask, w = _inputs()
    a = _dense(q, k, v, mask, 0.3)
    b = fused_attention(q, k, v, mask, 0.3, implementation="xla")
    assert b.shape == a.shape
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5)
    ga = jax.grad(lambda *x: (_dense(*x, mask, 0.3) * w).sum(), argnums=(0, 1, 2))(q, k, v)
    gb = jax.grad(lambda *x: (fused_attention(*x, mask, 0.3, "xla") * w).sum(), argnums=(0, 1, 2))(q, k, v)
    for x, y in zip(ga, gb):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-5)


def test_auto_kernel_per_platform_and_call():
    from dsjax import impl

    cfg = dsjax.load_model_config("tiny")
    assert cfg.attn_kernel == "auto"
    at = lambda c, platform, queries, absorbed=False: impl.attention_kernel(  # noqa: E731
        impl.resolve(c, platform), queries, absorbed)
    assert at(cfg, "gpu", 1) == at(cfg, "cpu", 1) == "dense"  # a decoding step: [B, H, 1, S] scores
    assert at(cfg, "cpu", 256) == "cpu"  # the CPU wing's native kernel where it applies
    assert at(cfg, "cpu", 256, absorbed=True) == "blockwise"
    assert at(cfg, "tpu", 256) == "splash"  # Pallas's splash kernel (blockwise where it refuses the call)
    assert at(cfg, "tpu", 256, absorbed=True) == "blockwise"
    assert at(cfg, "tpu", 1) == "dense"
    assert at(cfg, "gpu", 256) == "blockwise"  # float32: cuDNN takes bf16/fp16
    bf16 = cfg.replace(dtype="bfloat16")
    assert at(bf16, "gpu", 256) == "cudnn"
    assert at(bf16, "gpu", 256, absorbed=True) == "blockwise"  # 576-wide latent head
    assert at(cfg.replace(attn_kernel="dense"), "gpu", 256) == "dense"
    assert at(cfg.replace(attn_kernel="blockwise"), "cpu", 256) == "blockwise"  # set by hand: kept
    with pytest.raises(ValueError, match="attn_kernel"):
        cfg.replace(attn_kernel="flash")


@pytest.mark.parametrize("attn_impl", ["naive", "absorb"])
def test_mla_with_blockwise_attention_equals_dense(attn_impl):
    """The MLA layer under model.attn_kernel=blockwise, in the naive and the absorbed form:
    same output and gradients (parameters and input) as the dense scores, with packed
    segments and padding."""
    from dsjax.mla import MLA
    from dsjax.rope import rope_tables

    cfg = dsjax.load_model_config("tiny").replace(attn_kernel="dense", attn_impl=attn_impl)
    B, T = 2, 24
    x = jnp.asarray(np.random.default_rng(1).normal(size=(B, T, cfg.hidden_size)), jnp.float32)
    segments = jnp.asarray([[1] * 10 + [2] * 14, [1] * 20 + [0] * 4], jnp.int32)
    mask = attention_mask(B, T, segments)
    cos, sin = rope_tables(cfg, jnp.broadcast_to(jnp.arange(T), (B, T)))
    dense, block = MLA(cfg), MLA(cfg.replace(attn_kernel="blockwise"))
    params = dense.init(jax.random.key(0), x, cos, sin, mask)

    def run(layer):
        return jax.value_and_grad(lambda p, x: (layer.apply(p, x, cos, sin, mask) ** 2).sum(), argnums=(0, 1))(params, x)

    (la, ga), (lb, gb) = run(dense), run(block)
    np.testing.assert_allclose(float(lb), float(la), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5)


def test_blockwise_attention_never_holds_the_scores():
    """Compiled temp memory of one `small` MLA layer, forward + backward, at 2048 tokens
    (bench/attention_memory.py reports 4096): the dense scores dominate it, the blockwise
    kernel keeps a fraction."""
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location(
        "attention_memory", os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench", "attention_memory.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg = dsjax.load_model_config("small")
    dense = bench.temp_bytes(cfg.replace(attn_kernel="dense"), 1, 2048)
    block = bench.temp_bytes(cfg.replace(attn_kernel="blockwise"), 1, 2048)
    scores = 8 * 2048 * 2048 * 4  # one float32 [H, T, S]
    assert dense > 2 * scores and block < scores and dense / block > 6, (dense, block)


def test_cudnn_falls_back_to_blockwise_where_cudnn_refuses():
    """'cudnn' (what 'auto' resolves to on a GPU in bfloat16/float16) on a machine without
    cuDNN (this CPU) runs blockwise and gives the dense output."""
    from dsjax.mla import MLA
    from dsjax.rope import rope_tables

    cfg = dsjax.load_model_config("tiny")
    B, T = 2, 12
    x = jnp.asarray(np.random.default_rng(2).normal(size=(B, T, cfg.hidden_size)), jnp.float32)
    mask = attention_mask(B, T)
    cos, sin = rope_tables(cfg, jnp.broadcast_to(jnp.arange(T), (B, T)))
    params = MLA(cfg).init(jax.random.key(0), x, cos, sin, mask)
    dense = MLA(cfg.replace(attn_kernel="dense")).apply(params, x, cos, sin, mask)
    out = MLA(cfg.replace(attn_kernel="cudnn")).apply(params, x, cos, sin, mask)
    np.testing.assert_allclose(np.asarray(out), np.asarray(dense), atol=1e-5)


def _causal_inputs(B, T, H, K, V, seed=0, kv_heads=None):
    """q [B, T, H, K], k, v with `kv_heads` (default H) heads, an output weight, and a causal
    mask with two packed segments in row 0 and right padding (segment 0) in row 1."""
    rng = np.random.default_rng(seed)
    kh = kv_heads or H
    q = jnp.asarray(rng.normal(size=(B, T, H, K)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, T, kh, K)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, T, kh, V)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(B, T, H, V)), jnp.float32)
    segments = np.ones((B, T), np.int32)
    segments[0, T // 3:] = 2
    segments[-1, T - T // 5:] = 0
    return q, k, v, w, jnp.asarray(segments)


def _value_and_grads(fn, q, k, v, w):
    out = fn(q, k, v)
    return out, jax.grad(lambda *x: (fn(*x) * w).sum(), argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("T, block, kv_heads, blocks", [(600, 512, None, 5), (100, 16, None, 7), (100, 16, 1, 7)])
def test_long_causal_calls_skip_the_masked_blocks_and_equal_dense(T, block, kv_heads, blocks, monkeypatch):
    """A causal call longer than one query block walks only the block pairs on or below the
    diagonal (`blocks` blocks of `causal_block` rows: 600 tokens -> 5 of 128, the default
    sizes); values and gradients equal dense attention's (1e-5) with packed segments,
    padding, and a shared key head."""
    import dsjax.attention as attention

    B, H, K, V = 2, 2, 8, 4
    q, k, v, w, segments = _causal_inputs(B, T, H, K, V, kv_heads=kv_heads)
    mask = attention_mask(B, T, segments)
    assert -(-T // attention.causal_block(T, block, block)) == blocks
    steps = []
    inner = attention._forward_causal
    monkeypatch.setattr(attention, "_forward_causal", lambda q, *a: steps.append(q.shape[2]) or inner(q, *a))

    def full(q, k, v):
        return _dense(q, jnp.repeat(k, H // k.shape[2], 2), jnp.repeat(v, H // v.shape[2], 2), mask, 0.3)

    skipping = lambda q, k, v: blockwise_attention(q, k, v, mask, 0.3, block, block, causal=True)  # noqa: E731
    (a, ga), (b, gb) = _value_and_grads(full, q, k, v, w), _value_and_grads(skipping, q, k, v, w)
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5)
    for x, y in zip(ga, gb):
        assert x.shape == y.shape
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-5)
    assert steps and steps[0] == blocks * attention.causal_block(T, block, block)  # the triangular walk ran


def _tpu_devices(topology: str = "v5p:2x2x1"):
    """The devices of an abstract TPU slice (libtpu's compiler, no TPU needed), or a skip."""
    import importlib.util
    import os

    if importlib.util.find_spec("libtpu") is None:
        pytest.skip(reason="libtpu is not installed (pip install 'dsjax[tpu]'): no TPU compiler here")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # one lock file per process (pytest-xdist)
    from jax.experimental import topologies

    return topologies.get_topology_desc(topology_name=topology, platform="tpu").devices


def test_causal_blockwise_flops_on_a_tpu_are_the_causal_count():
    """XLA:TPU's own flop count of causal blockwise attention, forward + backward, at 2,048
    tokens with MLA's head widths (K + R = 192, V = 128), the loops unrolled (XLA counts a
    loop body once): within 1.15x of the causal count (measured 1.07: 16 blocks of 128, the
    diagonal ones computed whole, as at 4,096 tokens in 16 blocks of 256, which compiles 4x
    slower), where the full square would be ~2x. One head: the count scales with B * H,
    XLA's compile time with the head count too.

    Causal count: the B * H * T (T + 1) / 2 visible (query, key) pairs, each costing
    2 (K+R) + 2 V flops forward (q k^T, p v) and 3 * 2 (K+R) + 2 * 2 V backward (the
    scores again, dO v^T, dV = p^T dO, dK = dS^T q, dQ = dS k)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    device = _tpu_devices()[0]
    B, T, H, KR, V = 1, 2048, 1, 192, 128
    one = NamedSharding(jax.sharding.Mesh(np.array([device]), ("one",)), P())
    shape = lambda *s, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(s, dtype, sharding=one)  # noqa: E731

    def loss(q, k, v, w, mask):
        return (blockwise_attention(q, k, v, mask, 0.1, causal=True, unroll=True) * w).sum()

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(
        shape(B, T, H, KR), shape(B, T, H, KR), shape(B, T, H, V), shape(B, T, H, V),
        shape(B, T, T, dtype=jnp.bool_)).compile()
    assert " while(" not in compiled.as_text()
    flops = compiled.cost_analysis()["flops"]
    causal = B * H * T * (T + 1) / 2 * ((2 * KR + 2 * V) + (3 * 2 * KR + 2 * 2 * V))
    assert causal <= flops <= 1.15 * causal, flops / causal


def test_splash_equals_blockwise_with_mla_head_widths():
    """The splash kernel in Pallas's interpreter, float32, MLA's head widths (queries and
    keys K + R = 192, values V = 128) and softmax scale (K + R)^-1/2, causal with two
    packed segments and right padding: values and gradients (q, k, v) equal blockwise
    attention's within 1e-5 absolute (they are of order 1; measured 3e-6). 384 tokens: 3
    blocks of 128, so the kernel skips the 3 blocks above the diagonal."""
    from dsjax.splash_attention import block_size, segments_from_mask, splash_attention, unsupported

    B, T, H, K, V = 2, 384, 2, 192, 128
    q, k, v, w, segments = _causal_inputs(B, T, H, K, V, seed=3)
    mask = attention_mask(B, T, segments)
    assert unsupported(q, k, v, causal=True) is None and block_size(T) == 128
    ids = segments_from_mask(mask)
    np.testing.assert_array_equal(np.asarray(attention_mask(B, T, ids)), np.asarray(mask))
    scale = K ** -0.5
    reference = lambda q, k, v: blockwise_attention(q, k, v, mask, scale, causal=True)  # noqa: E731
    kernel = lambda q, k, v: splash_attention(q, k, v, ids, scale)  # noqa: E731
    (a, ga), (b, gb) = _value_and_grads(reference, q, k, v, w), _value_and_grads(kernel, q, k, v, w)
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5)
    for x, y in zip(ga, gb):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-5)


def test_segments_read_back_from_the_mask_rebuild_it():
    """Any segment ids, a repeated id apart from its first run included: the ids read back
    from the causal mask (each query's first visible key) rebuild the same mask."""
    from dsjax.splash_attention import segments_from_mask

    segments = jnp.asarray([[3, 3, 1, 1, 3, 3, 0, 0], [5, 5, 5, 5, 5, 5, 5, 5]], jnp.int32)
    mask = attention_mask(2, 8, segments)
    ids = segments_from_mask(mask)
    np.testing.assert_array_equal(np.asarray(ids), [[0, 0, 2, 2, 0, 0, 6, 6], [0] * 8])
    np.testing.assert_array_equal(np.asarray(attention_mask(2, 8, ids)), np.asarray(mask))


def test_splash_falls_back_to_blockwise_where_it_cannot_take_the_call():
    from dsjax.splash_attention import splash_or_blockwise, unsupported

    q, k, v, w, segments = _causal_inputs(1, 100, 2, 8, 4)
    mask = attention_mask(1, 100, segments)
    assert "multiple of 128" in unsupported(q, k, v, causal=True)
    assert "causal" in unsupported(q, k, v, causal=False)
    q2, k2, v2, _, _ = _causal_inputs(1, 128, 2, 8, 4)
    assert unsupported(q2, k2, v2, causal=True) is None
    assert "key heads" in unsupported(q2, k2[:, :, :1], v2[:, :, :1], causal=True)
    np.testing.assert_allclose(np.asarray(splash_or_blockwise(q, k, v, mask, 0.3, causal=True)),
                               np.asarray(_dense(q, k, v, mask, 0.3)), atol=1e-5)


def test_splash_under_a_mesh_runs_per_device_and_equals_one_device():
    """Under a 2 x 2 mesh with batch on 'data' and heads on 'tensor' the kernel runs per
    device under shard_map (interpreted) and gives the one-device values and gradients."""
    import flax.linen as nn

    from dsjax.splash_attention import splash_attention

    B, T, H, K, V = 2, 128, 2, 16, 8
    q, k, v, w, segments = _causal_inputs(B, T, H, K, V, seed=5)
    ids = segments
    kernel = lambda q, k, v: splash_attention(q, k, v, ids, 0.3)  # noqa: E731
    a, ga = _value_and_grads(kernel, q, k, v, w)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "tensor"))  # as sharding.mesh
    with jax.set_mesh(mesh), nn.logical_axis_rules((("batch", "data"), ("heads", "tensor"))):
        step = jax.jit(lambda q, k, v, w: _value_and_grads(kernel, q, k, v, w))
        assert "shard_map" in str(step.trace(q, k, v, w).jaxpr)
        b, gb = step(q, k, v, w)
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6)
    for x, y in zip(ga, gb):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-6)


def test_the_model_under_splash_equals_blockwise():
    """tiny cut to 2 layers (a dense one, a MoE one) and its MTP block (K + R = 48, V = 32)
    at 128 tokens with packed segments: logits and parameter gradients under
    attn_kernel='splash' (interpreted) equal attn_kernel='blockwise' (1e-5 on the logits,
    1e-5 relative to each gradient's largest entry)."""
    cfg = dsjax.load_model_config("tiny").replace(attn_kernel="blockwise", num_hidden_layers=2)
    B, T = 2, 128
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, cfg.vocab_size)
    segments = jnp.asarray([[1] * 50 + [2] * 78, [1] * 100 + [0] * 28], jnp.int32)
    variables = jax.jit(dsjax.Transformer(cfg).init)(jax.random.key(0), tokens)

    def run(kernel):
        model = dsjax.Transformer(cfg.replace(attn_kernel=kernel))

        def loss(p):
            out = model.apply({**variables, "params": p}, tokens, segment_ids=segments)
            return (out.logits ** 2).mean() + (out.mtp_logits ** 2).mean(), out.logits
        traced = jax.jit(jax.value_and_grad(loss, has_aux=True)).trace(variables["params"])
        assert ("pallas_call" in str(traced.jaxpr)) == (kernel == "splash")  # the kernel ran, not a fallback
        return traced.lower().compile()(variables["params"])

    ((la, logits_a), ga), ((lb, logits_b), gb) = run("blockwise"), run("splash")
    np.testing.assert_allclose(np.asarray(logits_b), np.asarray(logits_a), atol=1e-5)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        scale = float(np.abs(np.asarray(x)).max()) or 1.0
        np.testing.assert_allclose(np.asarray(y) / scale, np.asarray(x) / scale, atol=1e-5)


def test_a_tpu_program_of_the_model_on_auto_holds_the_splash_and_grouped_gemm_kernels():
    """`tiny`'s loss gradient at 256 tokens, compiled by XLA:TPU for a v5p:2x2x1 (batch
    over 4 chips, fsdp rules) from this CPU host with every implementation left on 'auto'
    and resolved for the mesh's platform: its HLO holds the splash kernels (forward, dq
    and dk/dv; Mosaic custom calls, per device under shard_map) and the MoE's
    grouped GEMM (ragged_dot). docs/model.md records the same check for `small` at 4,096."""
    import flax.linen as nn
    from jax.sharding import NamedSharding, PartitionSpec as P

    from dsjax import impl
    from sharding.rules import activation_rules

    devices = _tpu_devices()
    mesh = jax.sharding.Mesh(np.array(devices).reshape(1, 4, 1, 1), ("data", "fsdp", "expert", "tensor"))
    cfg = impl.resolve(dsjax.load_model_config("tiny"), impl.platform_of(mesh))
    assert (cfg.attn_kernel, cfg.moe_impl) == ("splash", "ragged")
    B, T = 4, 256
    model = dsjax.Transformer(cfg)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((B, T), jnp.int32))
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P())),
                          nn.meta.unbox(abstract))
    rows = NamedSharding(mesh, P("fsdp", None))
    tokens = jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=rows)

    def loss(variables, tokens):
        return model.apply(variables, tokens).logits.mean()

    with jax.set_mesh(mesh), nn.logical_axis_rules(activation_rules("fsdp")):
        hlo = jax.jit(jax.grad(loss)).lower(params, tokens).compile().as_text()
    kernels = {line.split(" = ")[0].strip() for line in hlo.splitlines() if 'custom_call_target="tpu_custom_call"' in line}
    for name in ("%splash_mha_fwd", "%splash_mha_dq", "%splash_mha_dkv", "%ragged-dot"):
        assert any(k.startswith(name) for k in kernels), (name, sorted(kernels))
