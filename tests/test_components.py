"""Component-level parity with transformers (norm, RoPE, MLA, gate, MoE) and fast vs
reference paths (ragged, blocked, gather vs dense MoE, absorbed vs naive MLA), values and gradients."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.deepseek_v2 import modeling_deepseek_v2 as hf_v2
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_v3

import dsjax
from dsjax.cpu.linear import matmul
from dsjax.layers import RMSNorm
from dsjax.mla import MLA
from dsjax.losses import cross_entropy, mtp_cross_entropy
from dsjax.model import attention_mask, init_cache
from dsjax.moe import MoE, route, sequence_balance_loss
from dsjax.rope import apply_rope, rope_tables
from tests.hf_models import build_hf

pytestmark = pytest.mark.filterwarnings("ignore:.*has no MTP weights")


def _capture(module, store, key):
    def hook(mod, args, kwargs, out):
        store[key] = (args[0] if args else kwargs["hidden_states"], out)
    return module.register_forward_hook(hook, with_kwargs=True)


@pytest.fixture(scope="module", params=["v3_yarn_groups", "v2_lite_like"])
def captured(request, tmp_path_factory):
    """HF model run once with hooks on layer 1 (an MoE layer), and the dsjax load of it."""
    name = request.param
    hf = build_hf(name, seed=3)
    path = str(tmp_path_factory.mktemp(name))
    hf.save_pretrained(path)
    model, variables = dsjax.from_pretrained(path)
    layer = hf.model.layers[1]
    store = {}
    handles = [_capture(layer.input_layernorm, store, "norm"), _capture(layer.self_attn, store, "attn"),
               _capture(layer.mlp, store, "moe"), _capture(layer.mlp.gate, store, "gate")]
    tokens = torch.randint(0, hf.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hf(tokens)
    for h in handles:
        h.remove()
    cfg = model.cfg
    j = 1 - cfg.num_dense_layers  # layer 1 inside the MoE stack
    layer_vars = jax.tree.map(lambda a: a[j], variables["params"]["moe_layers"])
    bias = variables.get("moe_bias", {}).get("moe_layers")
    bias = jax.tree.map(lambda a: a[j], bias) if bias else None
    return cfg, store, layer_vars, bias, hf


def _np(t):
    return t.detach().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def test_rmsnorm(captured):
    cfg, store, params, _, _ = captured
    x, ref = store["norm"]
    got = RMSNorm(cfg, cfg.rms_norm_eps).apply({"params": params["attn_norm"]}, jnp.asarray(_np(x)))
    np.testing.assert_allclose(got, _np(ref), atol=1e-5)


def test_attention(captured):
    cfg, store, params, _, _ = captured
    x, (ref, _) = store["attn"]
    x = jnp.asarray(_np(x))
    B, T, _ = x.shape
    cos, sin = rope_tables(cfg, jnp.broadcast_to(jnp.arange(T), (B, T)))
    mask = attention_mask(B, T)
    for impl in ("naive", "absorb"):
        got = MLA(cfg.replace(attn_impl=impl)).apply({"params": params["attn"]}, x, cos, sin, mask)
        np.testing.assert_allclose(got, _np(ref), atol=1e-5, err_msg=impl)


def test_gate(captured):
    cfg, store, params, bias, _ = captured
    x, (_, ref_w, ref_i) = store["gate"]
    logits = jnp.asarray(_np(x).reshape(-1, cfg.hidden_size)) @ params["ffn"]["gate"]["weight"]
    b = bias["ffn"]["gate"]["bias"] if bias else jnp.zeros((cfg.n_routed_experts,))
    w, i, _ = route(cfg, logits, b)
    order_ref, order = np.argsort(_np(ref_i), -1), np.argsort(np.asarray(i), -1)
    np.testing.assert_array_equal(np.take_along_axis(_np(ref_i), order_ref, -1),
                                  np.take_along_axis(np.asarray(i), order, -1))
    np.testing.assert_allclose(np.take_along_axis(np.asarray(w), order, -1),
                               np.take_along_axis(_np(ref_w), order_ref, -1), atol=1e-6)


@pytest.mark.parametrize("impl", ["dense", "ragged", "blocked", "gather"])
def test_moe_block(captured, impl):
    cfg, store, params, bias, _ = captured
    x, ref = store["moe"]
    variables = {"params": params["ffn"]}
    if bias:
        variables["moe_bias"] = bias["ffn"]
    y, loads, _ = MoE(cfg.replace(moe_impl=impl)).apply(variables, jnp.asarray(_np(x)))
    np.testing.assert_allclose(y, _np(ref), atol=1e-5)
    assert float(loads.sum()) == x.shape[0] * x.shape[1] * cfg.num_experts_per_tok


def test_rope_matches_hf_layouts(captured):
    cfg, _, _, _, hf = captured
    B, T, H, R = 2, 30, 3, cfg.qk_rope_head_dim
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(B, H, T, R)).astype(np.float32), rng.normal(size=(B, 1, T, R)).astype(np.float32)
    pos = torch.arange(T)[None].expand(B, T)
    cos, sin = rope_tables(cfg, jnp.asarray(pos.numpy()))
    mine_q = np.asarray(apply_rope(jnp.asarray(q.transpose(0, 2, 1, 3)), cos, sin)).transpose(0, 2, 1, 3)
    if isinstance(hf, hf_v3.DeepseekV3ForCausalLM):
        c, s = hf.model.rotary_emb(torch.from_numpy(q), pos)
        ref_q, _ = hf_v3.apply_rotary_pos_emb_interleave(torch.from_numpy(q), torch.from_numpy(k), c, s)
        # HF returns the rotated pairs de-interleaved; same dot products, permuted layout.
        np.testing.assert_allclose(mine_q[..., 0::2], _np(ref_q)[..., :R // 2], atol=1e-5)
        np.testing.assert_allclose(mine_q[..., 1::2], _np(ref_q)[..., R // 2:], atol=1e-5)
    else:
        freqs = hf.model.rotary_emb(torch.from_numpy(q), pos)
        ref_q, _ = hf_v2.apply_rotary_emb(torch.from_numpy(q), torch.from_numpy(k), freqs)
        np.testing.assert_allclose(mine_q, _np(ref_q), atol=1e-5)


def _moe_cfg(**kw):
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                num_hidden_layers=2, num_attention_heads=4, q_lora_rank=16, kv_lora_rank=16,
                qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=8,
                n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
                first_k_dense_replace=1, num_nextn_predict_layers=1, max_position_embeddings=64)
    return dsjax.ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("impl", ["ragged", "blocked", "gather"])
def test_fast_and_dense_moe_agree_in_value_and_gradient(impl):
    cfg = _moe_cfg()
    x = jax.random.normal(jax.random.key(1), (2, 16, cfg.hidden_size))
    variables = MoE(cfg).init(jax.random.key(0), x)
    variables = dsjax.unbox(variables)
    variables["moe_bias"] = jax.tree.map(lambda b: b + jnp.linspace(-0.1, 0.1, b.shape[0]), variables["moe_bias"])

    def loss(params, impl, x):
        y, _, bal = MoE(cfg.replace(moe_impl=impl)).apply({**variables, "params": params}, x)
        return jnp.sum(jnp.sin(y)) + bal

    value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 2)), static_argnums=1)
    (l_d, g_d), (l_r, g_r) = [value_and_grad(variables["params"], i, x) for i in ("dense", impl)]
    np.testing.assert_allclose(l_d, l_r, rtol=1e-6)
    chex.assert_trees_all_close(g_d, g_r, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_matmul_gradient_equals_the_plain_product_and_runs_as_a_plain_gemm_on_cpu(dtype):
    """The CPU wing's matmul (every linear layer and the output head under
    matmul_impl='cpu') gives x @ w's value and both gradients, and its weight gradient compiles to no dot that contracts the left
    operand's leading dimension (the form XLA:CPU hands to Eigen at half the GEMM rate)."""
    dt = jnp.dtype(dtype)
    x = jax.random.normal(jax.random.key(0), (2, 24, 16)).astype(dt)
    w = jax.random.normal(jax.random.key(1), (16, 40)).astype(dt)
    up = jax.random.normal(jax.random.key(2), (2, 24, 40)).astype(dt)

    def loss(mm):
        return lambda x, w: jnp.sum((mm(x, w) * up).astype(jnp.float32))

    ours = jax.jit(jax.value_and_grad(loss(matmul), argnums=(0, 1)))
    (v, (dx, dw)), (v_ref, (dx_ref, dw_ref)) = ours(x, w), jax.value_and_grad(loss(jnp.matmul), argnums=(0, 1))(x, w)
    assert (dx.dtype, dw.dtype) == (dt, dt)
    tol = 1e-5 if dtype == "float32" else 2e-2
    np.testing.assert_allclose(v, v_ref, rtol=tol)
    for got, want in ((dx, dx_ref), (dw, dw_ref)):
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol)
    hlo = jax.jit(jax.grad(loss(matmul), argnums=1)).lower(x, w).compile().as_text()
    assert "lhs_contracting_dims={0}" not in hlo, "the weight gradient contracts x's leading dimension"
    if dtype == "float32":  # the form this avoids (in float32), so the check above can fail
        naive = jax.jit(jax.grad(loss(jnp.matmul), argnums=1)).lower(x, w).compile().as_text()
        assert "lhs_contracting_dims={0}" in naive


def test_model_weight_gradients_reach_matmul(monkeypatch):
    """The model's linear layers (MLA, MLPs, shared experts, MTP) and its output head go
    through the registered 'matmul' implementation (on a CPU, the wing's): the compiled
    gradient of a whole model holds no Eigen-routed weight-gradient dot but the router's
    float32 product (left as autodiff writes it)."""
    import re

    from dsjax import impl

    cfg = _moe_cfg(moe_impl="blocked")
    tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, cfg.vocab_size)
    variables = dsjax.unbox(dsjax.Transformer(cfg).init(jax.random.key(0), tokens))

    def eigen_scopes():
        loss = lambda p: jnp.mean(dsjax.Transformer(cfg).apply({**variables, "params": p}, tokens).logits)  # noqa: E731
        hlo = jax.jit(jax.grad(loss)).lower(variables["params"]).compile().as_text()
        return {re.search(r'op_name="([^"]*)"', line).group(1).split("/")[-3]
                for line in hlo.splitlines() if "lhs_contracting_dims={0}" in line}

    assert eigen_scopes() == {"gate"}
    monkeypatch.setitem(impl._TABLE, ("matmul", "cpu"), lambda x, w, copy=None: jnp.matmul(x, w))
    assert eigen_scopes() > {"gate"}


def test_blocked_experts_weight_gradients_run_as_plain_gemms_on_cpu(monkeypatch):
    """The blocked dispatch's per-block weight gradients use the wing's `transposed` too: its
    compiled gradient has no dot contracting a left operand's leading dimension (three,
    one per weight, with a plain transpose)."""
    from dsjax.cpu import moe

    N, k, E, D, F = 64, 2, 4, 16, 8
    keys = jax.random.split(jax.random.key(0), 5)
    x, weights = jax.random.normal(keys[0], (N, D)), jax.random.uniform(keys[2], (N, k))
    indices = jax.random.randint(keys[1], (N, k), 0, E)
    w1, w2 = jax.random.normal(keys[3], (E, D, F)), jax.random.normal(keys[4], (E, F, D))

    def eigen_dots():
        loss = lambda w1, w3, w2: jnp.sum(jnp.sin(moe.experts_blocked(x, weights, indices, w1, w3, w2, block=8)))  # noqa: E731
        hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(w1, 0.5 * w1, w2).compile().as_text()
        return hlo.count("lhs_contracting_dims={0}")

    monkeypatch.setattr(moe, "blocked_kernel_applies", lambda *a: False)  # XLA's form, not the native kernel
    assert eigen_dots() == 0
    monkeypatch.setattr(moe, "transposed", lambda a: a.T)
    assert eigen_dots() == 3


def test_absorbed_and_naive_attention_agree_in_gradient():
    cfg = _moe_cfg(num_nextn_predict_layers=0)
    tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, cfg.vocab_size)
    variables = dsjax.unbox(dsjax.Transformer(cfg).init(jax.random.key(0), tokens))

    def loss(params, impl):
        out = dsjax.Transformer(cfg.replace(attn_impl=impl)).apply({**variables, "params": params}, tokens)
        return jnp.mean(jax.nn.log_softmax(out.logits)[..., 0])

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    g_naive, g_absorb = grad(variables["params"], "naive"), grad(variables["params"], "absorb")
    chex.assert_trees_all_close(g_naive, g_absorb, atol=1e-5)


def test_sequence_balance_loss_formula():
    cfg = _moe_cfg()
    rng = np.random.default_rng(0)
    B, T, E, k = 2, 5, cfg.n_routed_experts, cfg.num_experts_per_tok
    scores = rng.uniform(0.1, 1.0, size=(B * T, E)).astype(np.float32)
    idx = np.stack([rng.choice(E, k, replace=False) for _ in range(B * T)]).astype(np.int32)
    expected = 0.0
    for b in range(B):
        s, ii = scores[b * T:(b + 1) * T], idx[b * T:(b + 1) * T]
        f = np.array([(ii == e).any(-1).sum() for e in range(E)]) * E / (k * T)
        p = (s / s.sum(-1, keepdims=True)).mean(0)
        expected += (f * p).sum() / B
    got = sequence_balance_loss(cfg, jnp.asarray(idx), jnp.asarray(scores), B)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # Perfectly balanced routing with uniform affinities gives exactly 1.
    uniform = jnp.full((E, E), 1.0 / E)
    balanced = jnp.stack([jnp.arange(E), (jnp.arange(E) + 1) % E], -1)
    np.testing.assert_allclose(sequence_balance_loss(cfg, balanced, uniform, 1), 1.0, rtol=1e-6)


def test_absorbed_cache_holds_c_plus_r_values_per_token_per_layer():
    """DESIGN.md's defining number, counted on the cache the decoder builds: the absorbed
    MLA cache holds kv_lora_rank + qk_rope_head_dim values per token per layer (main
    layers and MTP block alike) and nothing else; the naive one holds H x (K + R + V)."""
    B, S = 2, 8
    for impl in ("absorb", "naive"):
        cfg = dsjax.load_model_config("tiny", attn_impl=impl)
        cache = init_cache(dsjax.Transformer(cfg), B, S)
        assert set(cache) == {"dense_layers", "moe_layers", "mtp_0"}
        per_layer = {"dense_layers": cfg.num_dense_layers, "moe_layers": cfg.num_moe_layers, "mtp_0": 1}
        expected = cfg.cache_values_per_token if impl == "absorb" else \
            cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
        for name, layers in per_layer.items():
            values = sum(x.size for x in jax.tree.leaves(cache[name])) // (layers * B * S)
            assert values == expected, (impl, name, values)
    assert cfg.cache_values_per_token == cfg.kv_lora_rank + cfg.qk_rope_head_dim == 80


def test_cross_entropy_against_numpy():
    """Masked next-token cross-entropy (float32 from bfloat16 logits) and the MTP variant,
    where depth k at t is scored against targets[t + 1 + k] inside t's segment."""
    rng = np.random.default_rng(0)
    B, T, V = 2, 6, 11
    logits = rng.normal(size=(B, T, V)).astype(np.float32)
    targets = rng.integers(0, V, size=(B, T))
    mask = rng.random((B, T)) < 0.6
    mask[0, 0] = True
    nll = -(logits - np.log(np.exp(logits).sum(-1, keepdims=True)))[np.arange(B)[:, None], np.arange(T), targets]
    np.testing.assert_allclose(cross_entropy(logits, targets), nll.mean(), rtol=1e-6)
    np.testing.assert_allclose(cross_entropy(logits, targets, mask), nll[mask].mean(), rtol=1e-6)
    bf16 = jnp.asarray(logits, jnp.bfloat16)
    got = cross_entropy(bf16, targets, mask)
    assert got.dtype == jnp.float32
    rounded = np.asarray(bf16.astype(jnp.float32))
    nll16 = -(rounded - np.log(np.exp(rounded).sum(-1, keepdims=True)))[np.arange(B)[:, None], np.arange(T), targets]
    np.testing.assert_allclose(got, nll16[mask].mean(), rtol=1e-6)
    segments = np.array([[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    mtp_logits = rng.normal(size=(2, B, T, V)).astype(np.float32)
    want = []
    for k in range(2):
        lp = mtp_logits[k] - np.log(np.exp(mtp_logits[k]).sum(-1, keepdims=True))
        scored = [(b, t) for b in range(B) for t in range(T - 1 - k)
                  if mask[b, t + 1 + k] and segments[b, t] == segments[b, t + 1 + k]]
        want.append(np.mean([-lp[b, t, targets[b, t + 1 + k]] for b, t in scored]))
    np.testing.assert_allclose(mtp_cross_entropy(mtp_logits, targets, mask, segments), np.mean(want), rtol=1e-6)


def test_remat_policies_keep_gradients_and_save_memory():
    # Every remat policy gives the gradients of no remat (1e-5, float32), and `full`
    # actually recomputes: its compiled temp memory is below `none`'s.
    cfg = dsjax.load_model_config("tiny").replace(num_hidden_layers=2, vocab_size=64, num_nextn_predict_layers=0,
                                                  moe_impl="dense")
    tokens = jax.random.randint(jax.random.key(0), (2, 65), 0, 64)
    variables = dsjax.unbox(dsjax.Transformer(cfg).init(jax.random.key(1), tokens))

    def program(policy):
        model = dsjax.Transformer(cfg.replace(remat_policy=policy))

        def loss(params):
            out = model.apply({**variables, "params": params}, tokens[:, :-1])
            return cross_entropy(out.logits, tokens[:, 1:])

        return jax.jit(jax.grad(loss)).lower(variables["params"]).compile()

    compiled = {p: program(p) for p in ("none", "full", "dots", "dots_no_batch")}
    grads = {p: c(variables["params"]) for p, c in compiled.items()}
    for policy in ("full", "dots", "dots_no_batch"):
        chex.assert_trees_all_close(grads[policy], grads["none"], atol=1e-5, rtol=1e-5)
    temp = {p: c.memory_analysis().temp_size_in_bytes for p, c in compiled.items()}
    assert temp["full"] < temp["none"], temp
