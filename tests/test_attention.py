"""Blockwise attention (model.attn_kernel=blockwise, the default off GPUs) and the
cuDNN-shaped fused call equal the dense softmax in value and gradient, with causal masks,
packed segments and padding, in the naive and the absorbed MLA forms; blockwise never
holds all the scores."""

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
    assert at(cfg, "tpu", 256) == "blockwise"
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
