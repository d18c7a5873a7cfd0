"""The CPU wing's native kernels (dsjax/cpu/kernels.py): they build, are what the wing's
implementations run in float32 on a CPU, agree with the JAX forms they replace, reject
bad inputs, and step aside (with one warning) where they cannot build. The wing's MoE
dispatches against the dense one, over several routings, are in test_moe_dispatch.py.
Tests that need the kernels skip where no C++ compiler exists."""

import os
import shutil
import tempfile
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.cpu import kernels as cpu_kernels
from dsjax.cpu import moe
from dsjax.moe.dispatch import swiglu

needs_kernels = pytest.mark.skipif(shutil.which(os.environ.get("CXX") or "c++") is None,
                                   reason="no C++ compiler: the CPU wing's native kernels cannot build here")

E, D, F = 6, 40, 24  # D and F not multiples of a vector's 8 floats


def _inputs(n: int, k: int, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(keys[0], (n, D))
    weights = jax.random.uniform(keys[1], (n, k))
    indices = jax.vmap(lambda key: jax.random.permutation(key, E)[:k])(jax.random.split(keys[2], n))
    w1, w3 = (0.3 * jax.random.normal(key, (E, D, F)) for key in keys[3:5])
    w2 = 0.3 * jax.random.normal(keys[5], (E, F, D))
    return x, weights, indices.astype(jnp.int32), w1, w3, w2


def _runs_kernel(fn, *args) -> bool:
    return cpu_kernels.TARGET in jax.jit(fn).lower(*args).as_text()


@pytest.fixture
def fresh_state():
    """cpu_kernels' load state, emptied for the test and put back after it."""
    saved = dict(cpu_kernels._state)
    cpu_kernels._state.clear()
    yield
    cpu_kernels._state.clear()
    cpu_kernels._state.update(saved)


@needs_kernels
def test_the_kernel_builds_here_and_is_reused(tmp_path):
    # The CI machine has a C++ compiler: the kernel must build there, not fall back quietly.
    assert cpu_kernels.available(), cpu_kernels._state.get("error")
    path = cpu_kernels.build(str(tmp_path))
    stamp = (tmp_path / path.split("/")[-1]).stat().st_mtime_ns
    assert cpu_kernels.build(str(tmp_path)) == path  # cached: not built again
    assert (tmp_path / path.split("/")[-1]).stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [path.split("/")[-1]]  # no temp file left


def test_the_cache_falls_back_to_the_temp_directory_when_home_cannot_hold_it(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.write_text("")  # a file: no ~/.cache under it, whoever runs the test
    monkeypatch.delenv("DSJAX_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    assert os.path.dirname(cpu_kernels.cache_dir()) == str(tmp_path / "tmp")
    monkeypatch.setenv("DSJAX_CACHE_DIR", str(tmp_path / "mine"))
    assert cpu_kernels.cache_dir() == str(tmp_path / "mine")


@pytest.mark.parametrize("n, k", [(1, 4), (5, 2), (8, 3)])
@needs_kernels
def test_gather_dispatch_runs_the_kernel_and_matches_the_xla_loop(n, k):
    args = _inputs(n, k, seed=n)
    assert _runs_kernel(moe.experts_gather, *args)
    assert not _runs_kernel(moe._loop_experts, *args)
    y = jax.jit(moe.experts_gather)(*args)
    loop = jax.jit(moe._loop_experts)(*args)
    batched = jax.jit(moe._per_copy)(*args)
    np.testing.assert_allclose(y, loop, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y, batched, rtol=1e-5, atol=1e-5)
    # Gradients come from the batched gather's VJP, kernel or not.
    loss = lambda f: lambda x, weights, w1: (f(x, weights, args[2], w1, *args[4:]) ** 2).sum()
    grads = jax.jit(jax.grad(loss(moe.experts_gather), (0, 1, 2)))(args[0], args[1], args[3])
    ref = jax.jit(jax.grad(loss(moe._per_copy), (0, 1, 2)))(args[0], args[1], args[3])
    for g, r in zip(grads, ref):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


@needs_kernels
def test_kernel_is_only_for_float32_without_a_multi_device_mesh(monkeypatch):
    args = _inputs(4, 2)
    bf16 = [a.astype(jnp.bfloat16) if a.dtype == jnp.float32 else a for a in args]
    assert not _runs_kernel(moe.experts_gather, *bf16)
    mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
    with jax.set_mesh(mesh):
        assert not _runs_kernel(moe.experts_gather, *args)
    monkeypatch.setenv("DSJAX_CPU_KERNELS", "0")
    assert not cpu_kernels.available()
    assert not _runs_kernel(moe.experts_gather, *args)


@needs_kernels
def test_kernel_rejects_an_expert_index_out_of_range():
    x, weights, indices, w1, w3, w2 = _inputs(3, 2)
    assert cpu_kernels.available()
    bad = indices.at[1, 0].set(E)
    with pytest.raises(Exception, match=r"expert index is outside \[0, E\)"):
        jax.block_until_ready(jax.jit(cpu_kernels.gather_swiglu)(x, weights, bad, w1, w3, w2))


def test_without_a_compiler_the_dispatch_warns_once_and_keeps_xla(tmp_path, monkeypatch, fresh_state):
    monkeypatch.setenv("DSJAX_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler-dsjax")
    args = _inputs(4, 2)
    with pytest.warns(RuntimeWarning, match="no C.. compiler 'no-such-compiler-dsjax'"):
        assert not cpu_kernels.available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: no second warning
        assert not _runs_kernel(moe.experts_gather, *args)
    np.testing.assert_allclose(jax.jit(moe.experts_gather)(*args), jax.jit(moe._per_copy)(*args),
                               rtol=1e-5, atol=1e-5)
    assert list(tmp_path.iterdir()) == []


def test_a_compile_error_is_named(tmp_path):
    # `false` stands for a compiler that fails: the error says which tool and source failed.
    with pytest.raises(RuntimeError, match="false failed on cpu_kernels.cc"):
        cpu_kernels.build(str(tmp_path), compiler="false")
    assert list(tmp_path.iterdir()) == []  # the temp output is removed


def _shared(seed: int = 7, hidden: int = 16):
    keys = jax.random.split(jax.random.key(seed), 3)
    return (0.3 * jax.random.normal(keys[0], (D, hidden)), 0.3 * jax.random.normal(keys[1], (D, hidden)),
            0.3 * jax.random.normal(keys[2], (hidden, D)))


@pytest.mark.parametrize("n, k", [(1, 4), (6, 2)])
@needs_kernels
def test_shared_experts_run_in_the_kernel_with_their_gradients(n, k):
    x, weights, indices, w1, w3, w2 = _inputs(n, k, seed=n)
    s1, s3, s2 = _shared()

    def ref(x, weights, w1, s1, s3, s2):
        return moe._per_copy(x, weights, indices, w1, w3, w2) + swiglu(x, s1, s3, s2)

    def fused(x, weights, w1, s1, s3, s2):
        return moe.experts_gather(x, weights, indices, w1, w3, w2, shared=(s1, s3, s2))

    args = (x, weights, w1, s1, s3, s2)
    assert jax.jit(fused).lower(*args).as_text().count(cpu_kernels.TARGET) == 1
    np.testing.assert_allclose(jax.jit(fused)(*args), jax.jit(ref)(*args), rtol=1e-5, atol=1e-5)
    loss = lambda f: lambda *a: (f(*a) ** 2).sum()
    grads = jax.jit(jax.grad(loss(fused), range(6)))(*args)
    ref_grads = jax.jit(jax.grad(loss(ref), range(6)))(*args)
    for g, r in zip(grads, ref_grads):  # through dy = 2y: the forward's rounding, doubled
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


@needs_kernels
def test_a_decoding_moe_layer_runs_its_shared_experts_in_the_kernel(monkeypatch):
    # A few tokens pick the gather dispatch; the layer then hands its shared-experts MLP to
    # the kernel (no separate shared-expert products), and its output and gradients equal
    # the unfused layer's (the kernel switched off).
    from dsjax import impl
    from dsjax.config import load_model_config
    from dsjax.moe import MoE

    cfg = impl.resolve(load_model_config("tiny"), "cpu")
    assert cfg.n_shared_experts and impl.moe_dispatch(cfg, tokens=2) == "gather"
    layer = MoE(cfg)
    x = jax.random.normal(jax.random.key(1), (2, 1, cfg.hidden_size))
    variables = layer.init(jax.random.key(0), x)

    def run(v, x):
        y, _, _ = layer.apply(v, x)
        return (y ** 2).sum(), y

    def products(v, x):  # the forward's dot_generals and kernel calls
        text = jax.jit(lambda v, x: run(v, x)).lower(v, x).as_text()  # a fresh trace
        return text.count("stablehlo.dot_general"), text.count(cpu_kernels.TARGET)

    fused = jax.jit(jax.value_and_grad(run, has_aux=True))
    (_, y), grads = fused(variables, x)
    dots, calls = products(variables, x)
    monkeypatch.setenv("DSJAX_CPU_KERNELS", "0")
    plain = jax.jit(jax.value_and_grad(run, has_aux=True))
    (_, y0), grads0 = plain(variables, x)
    plain_dots, plain_calls = products(variables, x)
    assert (calls, plain_calls) == (1, 0)
    assert dots == 1 and plain_dots >= 1 + 3  # the router's; without the kernel, + the shared MLP's 3
    np.testing.assert_allclose(y, y0, rtol=1e-5, atol=1e-6)
    for g, g0 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads0)):
        np.testing.assert_allclose(g, g0, rtol=1e-4, atol=1e-6)


def test_shared_experts_are_refused_where_the_kernel_does_not_run(monkeypatch):
    monkeypatch.setenv("DSJAX_CPU_KERNELS", "0")
    with pytest.raises(ValueError, match="fused only where the native kernel runs"):
        moe.experts_gather(*_inputs(2, 2), shared=_shared())


# ---- the few-row product kernel (cpu_kernels.rows_dot, dsjax.cpu.linear.matmul's `copy`) ----


def _runs_rows_kernel(fn, *args) -> bool:
    return cpu_kernels.ROWS_TARGET in jax.jit(fn).lower(*args).as_text()


@pytest.mark.parametrize("m, k, n", [(2, 40, 13), (3, 16, 9), (8, 37, 20), (32, 64, 5), (5, 7, 4)])
@needs_kernels
def test_rows_dot_matches_numpy(m, k, n):
    # K not a multiple of the 8-float vector, N not of the 4-row tile, odd M: every tail.
    assert cpu_kernels.available()
    x = np.random.default_rng(m).standard_normal((m, k)).astype(np.float32)
    wt = np.random.default_rng(n).standard_normal((n, k)).astype(np.float32)
    y = jax.jit(cpu_kernels.rows_dot)(x, wt)
    np.testing.assert_allclose(y, x.astype(np.float64) @ wt.T.astype(np.float64), rtol=1e-5, atol=1e-5)


@needs_kernels
def test_rows_dot_rejects_operands_that_disagree():
    assert cpu_kernels.available()
    with pytest.raises(Exception, match="disagree on K"):
        jax.block_until_ready(jax.jit(cpu_kernels.rows_dot)(jnp.ones((2, 8)), jnp.ones((3, 9))))


@needs_kernels
def test_blocked_kernel_rejects_a_layout_outside_its_blocks():
    assert cpu_kernels.available()
    xs, w = jnp.ones((4, 8, 16)), jnp.ones((3, 16, 32))
    first, count = jnp.asarray([0, 2, 3], jnp.int32), jnp.asarray([2, 1, 2], jnp.int32)  # 3 + 2 > 4 blocks
    with pytest.raises(Exception, match="an expert's blocks fall outside xs"):
        jax.block_until_ready(jax.jit(cpu_kernels.blocked_swiglu_fwd)(xs, first, count, w, w, w.transpose(0, 2, 1)))
    overlap = jnp.asarray([0, 1, 3], jnp.int32)
    with pytest.raises(Exception, match="experts' blocks overlap"):
        jax.block_until_ready(jax.jit(cpu_kernels.blocked_swiglu_fwd)(xs, overlap, count.at[2].set(1), w, w,
                                                                      w.transpose(0, 2, 1)))


@needs_kernels
def test_matmul_runs_few_rows_through_the_kernel_with_gradients():
    from dsjax.cpu import linear as layers

    keys = jax.random.split(jax.random.key(3), 2)
    x = jax.random.normal(keys[0], (2, 3, 24))  # 6 rows
    w = jax.random.normal(keys[1], (24, 10))

    def ours(x, w):
        return layers.matmul(x, w, w.T)  # the gradient reaches w through its transposed copy

    assert _runs_rows_kernel(ours, x, w)
    np.testing.assert_allclose(jax.jit(ours)(x, w), x @ w, rtol=1e-5, atol=1e-5)
    loss = lambda f: lambda x, w: (f(x, w) ** 2).sum()  # noqa: E731
    for g, r in zip(jax.jit(jax.grad(loss(ours), (0, 1)))(x, w), jax.grad(loss(jnp.matmul), (0, 1))(x, w)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)
    assert _runs_rows_kernel(ours, x[:1, :1], w)  # one row too
    # Many rows (a prefill's GEMMs), bfloat16: XLA.
    assert not _runs_rows_kernel(ours, jnp.ones((layers.ROWS_KERNEL_MAX + 1, 24)), w)
    assert not _runs_rows_kernel(ours, x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
    assert not _runs_rows_kernel(layers.matmul, x, w)  # no transposed copy given


def _tiny_decoding(**overrides):
    import dsjax
    from dsjax.config import load_model_config

    cfg = load_model_config("tiny").replace(attn_impl="absorb", **overrides)
    model = dsjax.Transformer(cfg)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    return model, variables


def test_decode_copies_fold_the_absorbed_products_and_transpose_the_rest():
    from flax.core import meta

    from dsjax.cpu.decode import copies

    model, variables = _tiny_decoding()
    params = meta.unbox(variables["params"])
    out = meta.unbox(copies(variables["params"], absorbed=True, transposed=True))
    attn, dw = params["moe_layers"]["attn"], out["moe_layers"]["attn"]
    np.testing.assert_array_equal(dw["wq_a_t"], np.swapaxes(attn["wq_a"], -1, -2))
    mlp, mlp_t = params["dense_layers"]["ffn"], out["dense_layers"]["ffn"]
    np.testing.assert_array_equal(mlp_t["w2_t"], np.swapaxes(mlp["w2"], -1, -2))
    np.testing.assert_array_equal(out["head_t"], params["head"].T)
    assert "wq_b_t" not in dw and "wo_folded_t" not in dw  # wq_b folded; wo plain (W_UV runs in the kernel)
    np.testing.assert_array_equal(dw["wo_t"], np.swapaxes(attn["wo"].reshape(attn["wo"].shape[0], -1,
                                                                             attn["wo"].shape[-1]), -1, -2))
    assert "ffn" not in out["moe_layers"]  # routed and shared experts have their own kernel
    # The folds: q_nope W_UK and (o_lat W_UV) wo as single products, layer 0.
    cfg = model.cfg
    H, K, R, C, V = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank,
                     cfg.v_head_dim)
    c_q = jax.random.normal(jax.random.key(1), (3, cfg.q_lora_rank))
    wq_b, wkv_b, wo = attn["wq_b"][0], attn["wkv_b"][0], attn["wo"][0]
    q = jnp.einsum("bl,lhk->bhk", c_q, wq_b)
    want = jnp.concatenate([jnp.einsum("bhk,chk->bhc", q[..., :K], wkv_b[..., :K]), q[..., K:]], -1)
    np.testing.assert_allclose((c_q @ dw["wq_folded_t"][0].T).reshape(3, H, C + R), want, rtol=1e-4, atol=1e-5)
    assert V == wo.shape[1]


def _kernel_calls_and_generate(model, variables, prompts, lengths, target, speculative):
    """(custom calls to `target` in the lowered plain greedy decoding, 6 tokens of
    `dsjax.generate`)."""
    import dsjax
    from dsjax import decoding

    plain = lambda v: decoding._plain(model, v, jnp.asarray(prompts), jnp.asarray(lengths),  # noqa: E731
                                      jax.random.key(0), jnp.float32(1.0), max_new_tokens=6, greedy=True,
                                      top_k=0, top_p=1.0, stop_tokens=())
    text = jax.jit(plain).lower(variables).as_text()
    out = dsjax.generate(model, variables, prompts, lengths, max_new_tokens=6, speculative=speculative)
    return text.count(target), out


@pytest.mark.parametrize("speculative, overrides, calls_per_layer", [
    (False, {}, 4), (True, {}, 4),
    # no query compression: wq (folded) instead of wq_a and wq_b; the head is the embedding
    (False, {"q_lora_rank": None, "tie_word_embeddings": True}, 3)])
@needs_kernels
def test_generate_with_the_row_kernel_matches_xla(monkeypatch, speculative, overrides, calls_per_layer):
    from dsjax.cpu import linear as layers

    model, variables = _tiny_decoding(**overrides)
    prompts = np.random.default_rng(0).integers(2, model.cfg.vocab_size, (3, 16))  # prefill: 48 rows, XLA
    lengths = np.array([16, 9, 16])
    args = (model, variables, prompts, lengths, cpu_kernels.ROWS_TARGET, speculative)
    calls, out = _kernel_calls_and_generate(*args)
    monkeypatch.setattr(layers, "ROWS_KERNEL_MAX", 1)  # off
    jax.clear_caches()
    off_calls, ref = _kernel_calls_and_generate(*args)
    # a decode step: 4 layers x ([wq_a,] wkv_a, folded query, output), the dense MLP's 3, the head
    assert (calls, off_calls) == (4 * calls_per_layer + 3 + 1, 0)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_allclose(out.logprobs, ref.logprobs, rtol=1e-4, atol=1e-4)


def _latent_inputs(B=3, T=2, H=4, C=37, R=8, S=20, W=19):
    keys = jax.random.split(jax.random.key(5), 5)
    return (jax.random.normal(keys[0], (B, T, H, C)), jax.random.normal(keys[1], (B, T, H, R)),
            jax.random.normal(keys[2], (B, S, C)), jax.random.normal(keys[3], (B, S, R)),
            jax.random.normal(keys[4], (H, C, W)))


@needs_kernels
def test_latent_attention_matches_the_masked_softmax():
    from dsjax.mla import masked_softmax

    assert cpu_kernels.available()
    q_lat, q_pe, c_kv, k_pe, w = _latent_inputs()  # C not a multiple of 8: the dot products' tails
    S = c_kv.shape[1]
    # the first slot only, the last slot, a middle one; and a row with nothing visible (the
    # dense softmax of an all-masked row weighs every slot alike)
    positions = jnp.asarray([[0, 1], [5, S - 1], [-1, 7]], jnp.int32)
    mask = jnp.arange(S)[None, None, :] <= positions[:, :, None]
    scores = jnp.einsum("bthc,bsc->bhts", q_lat, c_kv) + jnp.einsum("bthr,bsr->bhts", q_pe, k_pe)
    o_lat = jnp.einsum("bhts,bsc->bthc", masked_softmax(scores * 0.3, mask), c_kv)
    want = jnp.einsum("bthc,hcv->bthv", o_lat, w[..., 7:])  # W_UV: w's columns from 7
    got = jax.jit(lambda *a: cpu_kernels.latent_attention(*a[:4], positions, a[4], 7, 0.3))(q_lat, q_pe, c_kv, k_pe, w)
    assert got.shape == (3, 2, 4, 12)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@needs_kernels
def test_latent_attention_rejects_shapes_that_disagree():
    assert cpu_kernels.available()
    q_lat, q_pe, c_kv, k_pe, w = _latent_inputs()
    run = lambda *a: cpu_kernels.latent_attention(*a[:4], jnp.zeros((3, 2), jnp.int32), a[4], 7, 1.0)  # noqa: E731
    with pytest.raises(Exception, match="latent_attention: shapes disagree"):
        jax.block_until_ready(jax.jit(run)(q_lat, q_pe, c_kv[:, :, :-1], k_pe, w))
    with pytest.raises(Exception, match="latent_attention: shapes disagree"):
        jax.block_until_ready(jax.jit(run)(q_lat, q_pe, c_kv, k_pe, w[:3]))


@pytest.mark.parametrize("speculative", [False, True])
@needs_kernels
def test_generate_with_the_latent_attention_kernel_matches_xla(monkeypatch, speculative):
    from dsjax.cpu import attention as mla

    model, variables = _tiny_decoding()
    prompts = np.random.default_rng(1).integers(2, model.cfg.vocab_size, (3, 20))  # prefill: 20 > 16 queries, XLA
    lengths = np.array([20, 11, 20])
    args = (model, variables, prompts, lengths, cpu_kernels.LATENT_TARGET, speculative)
    calls, out = _kernel_calls_and_generate(*args)
    monkeypatch.setattr(mla, "LATENT_KERNEL_QUERIES", 0)  # off
    jax.clear_caches()
    off_calls, ref = _kernel_calls_and_generate(*args)
    assert (calls, off_calls) == (model.cfg.num_hidden_layers, 0)  # one per layer of a decode step
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_allclose(out.logprobs, ref.logprobs, rtol=1e-4, atol=1e-4)


def _attention_inputs(B=3, T=150, H=2, K=20, V=12, seed=6):
    # T over two query chunks of 64 and not a multiple of them; K and V not multiples of a vector
    keys = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(keys[0], (B, T, H, K)), jax.random.normal(keys[1], (B, T, H, K)),
            jax.random.normal(keys[2], (B, T, H, V)))


def _packed_causal_mask(B, T, split):
    """Causal within two packed segments [0, split) and [split, T)."""
    seg = (jnp.arange(T) >= split).astype(jnp.int32)
    mask = jnp.tril(jnp.ones((T, T), bool)) & (seg[:, None] == seg[None, :])
    return jnp.broadcast_to(mask, (B, T, T))


@needs_kernels
def test_native_attention_matches_blockwise_values_and_gradients():
    from dsjax.attention import blockwise_attention
    from dsjax.cpu.attention import native_attention

    assert cpu_kernels.available()
    q, k, v = _attention_inputs()
    mask = _packed_causal_mask(3, 150, 90)

    def loss(fn):
        return lambda q, k, v: (fn(q, k, v) * jnp.cos(jnp.arange(12.0))).sum()

    ours = lambda q, k, v: native_attention(q, k, v, mask, 0.3)  # noqa: E731
    ref = lambda q, k, v: blockwise_attention(q, k, v, mask, 0.3, causal=True)  # noqa: E731
    np.testing.assert_allclose(jax.jit(ours)(q, k, v), ref(q, k, v), rtol=1e-5, atol=1e-5)
    for g, r in zip(jax.jit(jax.grad(loss(ours), (0, 1, 2)))(q, k, v), jax.grad(loss(ref), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


@needs_kernels
def test_native_attention_weighs_every_key_alike_for_a_row_that_sees_none():
    from dsjax.cpu.attention import native_attention
    from dsjax.mla import masked_softmax

    assert cpu_kernels.available()
    q, k, v = _attention_inputs(B=1, T=70)
    mask = _packed_causal_mask(1, 70, 40).at[0, 66].set(False)  # row 66 sees nothing: its chunk reads all keys
    scores = jnp.einsum("bthk,bshk->bhts", q, k)
    want = jnp.einsum("bhts,bshv->bthv", masked_softmax(scores * 0.3, mask), v)
    np.testing.assert_allclose(jax.jit(lambda *a: native_attention(*a, mask, 0.3))(q, k, v), want, rtol=1e-5,
                               atol=1e-5)


@needs_kernels
def test_native_attention_rejects_shapes_that_disagree():
    assert cpu_kernels.available()
    q, k, v = _attention_inputs()
    with pytest.raises(Exception, match="attention: shapes disagree"):
        jax.block_until_ready(jax.jit(lambda *a: cpu_kernels.attention_fwd(*a, 1.0))(
            q, k[:, :, :, :-1], v, _packed_causal_mask(3, 150, 90)))


@needs_kernels
def test_training_attention_runs_the_native_kernel_in_float32_only():
    from dsjax.cpu.attention import native_or_blockwise

    q, k, v = _attention_inputs()
    mask = _packed_causal_mask(3, 150, 90)
    grad = lambda q, k, v: jax.grad(lambda q: native_or_blockwise(q, k, v, mask, 0.3, causal=True).sum())(q)  # noqa: E731
    text = jax.jit(grad).lower(q, k, v).as_text()
    assert cpu_kernels.ATTENTION_FWD_TARGET in text and cpu_kernels.ATTENTION_BWD_TARGET in text
    half = [a.astype(jnp.bfloat16) for a in (q, k, v)]
    assert cpu_kernels.ATTENTION_FWD_TARGET not in jax.jit(grad).lower(*half).as_text()
    shared = lambda q, k, v: native_or_blockwise(q, k[:, :, :1], v[:, :, :1], mask, 0.3)  # noqa: E731
    assert cpu_kernels.ATTENTION_FWD_TARGET not in jax.jit(shared).lower(q, k, v).as_text()  # one shared head
