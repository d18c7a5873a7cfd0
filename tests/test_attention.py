"""Blockwise attention (model.attn_kernel=blockwise) equals the dense softmax in value and
gradient, with causal masks, packed segments and padding, and never holds all the scores."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsjax
from dsjax.attention import blockwise_attention
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


def test_mla_with_blockwise_attention_equals_dense():
    """The MLA layer under model.attn_kernel=blockwise: same output and gradients (parameters
    and input) as the dense scores, with packed segments and padding."""
    from dsjax.mla import MLA
    from dsjax.rope import rope_tables

    cfg = dsjax.load_model_config("tiny")
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
