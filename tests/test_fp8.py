"""FP8 recipe: tile/block quantization and the GEMMs, forward and backward, against a
numpy reference built from the recipe's definition (ml_dtypes' E4M3 casts, no dsjax.fp8
helpers); the native and emulated GEMMs against each other; the model switches."""

import functools
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from dsjax.fp8 import blockwise_dot, fp8_matmul, fp8_ragged_dot, quantize_blocks, quantize_tiles


def _inputs(kind, shape, seed=0):
    x = jax.random.normal(jax.random.key(seed), shape)
    if kind == "outliers":  # heavy tails: a few values 1000x the rest
        spikes = jax.random.bernoulli(jax.random.key(seed + 1), 0.002, shape)
        x = jnp.where(spikes, x * 1000.0, x)
    return x


# ----------------------------------------------------------- the numpy reference
# DeepSeek-V3's recipe from its definition: one scale per block (1x128 activation tiles,
# 128x128 weight blocks), scale = amax / 448 in float32 (with pow2: 2^ceil(log2(amax / 448))),
# 1 for an all-zero block; each value divided by its scale and rounded to E4M3 by
# ml_dtypes' cast; the GEMM multiplies the E4M3 values times their scales (exact in float32)
# and sums them, here in float64. XLA divides by the constant 448 as a multiplication by
# its float32 reciprocal, so the reference does too: the correctly rounded quotient differs
# from it in the last bit for about half the blocks, and that moves x / scale off an E4M3
# rounding tie now and then (one value of 77k in test_fp8_matmul's x).
_INV_E4M3_MAX = np.float32(1 / 448)


def _ref_quantize(x, rows, cols, pow2=False):
    """x [M, K] in `rows` x `cols` blocks -> (E4M3 [M, K], float32 scales [ceil(M/rows), ceil(K/cols)])."""
    x = np.asarray(x, np.float32)
    M, K = x.shape
    q = np.zeros((M, K), ml_dtypes.float8_e4m3fn)
    s = np.ones((-(-M // rows), -(-K // cols)), np.float32)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = x[i * rows:(i + 1) * rows, j * cols:(j + 1) * cols]
            amax = np.abs(blk).max()
            if amax > 0:
                s[i, j] = amax * _INV_E4M3_MAX
                if pow2:
                    s[i, j] = 2.0 ** np.ceil(np.log2(np.float64(s[i, j])))
            q[i * rows:(i + 1) * rows, j * cols:(j + 1) * cols] = (blk / s[i, j]).astype(ml_dtypes.float8_e4m3fn)
    return q, s


def _ref_values(x, rows, cols, pow2=False):
    """x [M, K] as the FP8 GEMM sees it: E4M3 values times their block's scale, float64."""
    q, s = _ref_quantize(x, rows, cols, pow2)
    M, K = q.shape
    scale = np.repeat(np.repeat(s, rows, 0), cols, 1)[:M, :K]
    return q.astype(np.float64) * scale


def _tiles(x, pow2=False):
    """1x128 tiles along the last axis (activations, dy)."""
    return _ref_values(x, 1, 128, pow2)


def _blocks(w, pow2=False):
    """128x128 blocks (weights)."""
    return _ref_values(w, 128, 128, pow2)


def _ref_matmul(x, w, dy, pow2=False):
    """(y, dx, dw) of x [M, K] @ w [K, N] with cotangent dy [M, N]: Fprop x in 1x128 tiles,
    W in 128x128 blocks; Dgrad dy in 1x128 tiles, W^T in 128x128 blocks; Wgrad x^T and dy in
    128x1 tiles along the tokens."""
    x, w, dy = (np.asarray(a, np.float32) for a in (x, w, dy))
    y = _tiles(x, pow2) @ _blocks(w, pow2)
    dx = _tiles(dy, pow2) @ _blocks(w.T, pow2)
    dw = _tiles(x.T, pow2) @ _tiles(dy.T, pow2).T
    return y, dx, dw


def _ref_ragged(x, w, dy, sizes, pow2=False):
    """(y, dx, dw) of the grouped GEMM: rows of group e times expert e's w, rows past the
    groups 0. Fprop and Dgrad as in _ref_matmul per expert; Wgrad's 128x1 tiles run along
    all rows (a tile may straddle two experts and share its scale)."""
    x, w, dy = (np.asarray(a, np.float32) for a in (x, w, dy))
    G, K, N = w.shape
    y, dx, dw = np.zeros((x.shape[0], N)), np.zeros(x.shape), np.zeros(w.shape)
    xs, dys = _tiles(x, pow2), _tiles(dy, pow2)
    xt, dyt = _tiles(x.T, pow2).T, _tiles(dy.T, pow2).T
    bounds = np.cumsum([0, *sizes])
    for e in range(G):
        a, b = bounds[e], bounds[e + 1]
        y[a:b] = xs[a:b] @ _blocks(w[e], pow2)
        dx[a:b] = dys[a:b] @ _blocks(w[e].T, pow2)
        dw[e] = xt[a:b].T @ dyt[a:b]
    return y, dx, dw


def _assert_close(got, ref, what=""):
    """float32 accumulation in another order than the float64 reference's."""
    ref = np.asarray(ref)
    np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max(),
                               err_msg=what)


def _rel(got, ref):
    return float(np.linalg.norm(np.asarray(got) - np.asarray(ref)) / np.linalg.norm(np.asarray(ref)))


# ---------------------------------------------------------------------- the tests


@pytest.mark.parametrize("kind", ["random", "outliers"])
@pytest.mark.parametrize("pow2", [False, True])
def test_quantization_matches_the_recipe_and_e4m3_bound(kind, pow2):
    x = np.array(_inputs(kind, (64, 300)))  # 300: a partial last tile
    x[5, 128:256] = 0  # an all-zero tile: scale 1
    q, s = quantize_tiles(jnp.asarray(x), pow2=pow2)
    assert q.dtype == jnp.float8_e4m3fn and s.shape == (64, 3)
    rq, rs = _ref_quantize(x, 1, 128, pow2)
    np.testing.assert_array_equal(np.asarray(s), rs)
    np.testing.assert_array_equal(np.asarray(q)[:, :300].view(np.uint8), rq.view(np.uint8))
    np.testing.assert_array_equal(np.asarray(q, np.float32)[:, 300:], 0)  # the padding
    assert rs[5, 1] == 1
    if pow2:
        np.testing.assert_array_equal(np.log2(np.asarray(s)) % 1, 0)
    # E4M3 keeps 3 mantissa bits: relative error <= 2^-4 for normals, and half the
    # subnormal step (2^-10 in scaled units) below 2^-6.
    back, scale = _tiles(x, pow2), np.repeat(rs, 128, axis=1)[:, :300]
    assert np.all(np.abs(back - x) <= np.maximum(np.abs(x) * 2.0 ** -4, scale * 2.0 ** -10) * 1.0001)
    w = np.asarray(_inputs(kind, (300, 200), seed=3))
    qw, sw = quantize_blocks(jnp.asarray(w), pow2=pow2)
    rq, rs = _ref_quantize(w, 128, 128, pow2)
    assert sw.shape == (3, 2)
    np.testing.assert_array_equal(np.asarray(sw), rs)
    np.testing.assert_array_equal(np.asarray(qw)[:300, :200].view(np.uint8), rq.view(np.uint8))
    back, scale = _blocks(w, pow2), np.repeat(np.repeat(rs, 128, 0), 128, 1)[:300, :200]
    assert np.all(np.abs(back - w) <= np.maximum(np.abs(w) * 2.0 ** -4, scale * 2.0 ** -10) * 1.0001)


def test_an_outlier_only_changes_its_own_tile_or_block():
    x = _inputs("random", (8, 512))
    _, s = quantize_tiles(x)
    _, s2 = quantize_tiles(x.at[3, 200].set(1e4))
    changed = np.argwhere(np.asarray(s != s2))
    assert changed.tolist() == [[3, 1]]
    w = _inputs("random", (512, 256))
    _, sw = quantize_blocks(w)
    _, sw2 = quantize_blocks(w.at[300, 10].set(1e4))
    assert np.argwhere(np.asarray(sw != sw2)).tolist() == [[2, 0]]


@functools.partial(jax.jit, static_argnums=0)
def _value_and_vjp(fn, x, w, dy):
    """(fn(x, w), dx, dw) for the cotangent dy."""
    y, vjp = jax.vjp(fn, x, w)
    return (y,) + vjp(dy)


@pytest.mark.parametrize("kind,gemm,pow2", [("random", "emulated", False), ("outliers", "native", False),
                                            ("outliers", "emulated", True), ("random", "native", True)])
def test_fp8_matmul_matches_the_recipe_forward_and_backward(kind, gemm, pow2):
    # [2, 100, 384] @ [384, 160]: 3 blocks of K, 2 of N (one partial), 200 tokens (2 tiles
    # of Wgrad, one partial).
    x, w = _inputs(kind, (2, 100, 384)), _inputs("random", (384, 160), seed=5) * 0.05
    dy = _inputs("random", (2, 100, 160), seed=9)
    y, dx, dw = _value_and_vjp(functools.partial(fp8_matmul, pow2=pow2, gemm=gemm), x, w, dy)
    ref = _ref_matmul(x.reshape(200, 384), w, dy.reshape(200, 160), pow2)
    for got, r, what in zip((y.reshape(200, 160), dx.reshape(200, 384), dw), ref, ("y", "dx", "dw")):
        _assert_close(got, r, what)
    # And within FP8's precision of float32: two E4M3 roundings of ~2^-5 each, averaged.
    fy, (fx, fw) = x @ w, jax.grad(lambda x, w: jnp.sum((x @ w) * dy), argnums=(0, 1))(x, w)
    for got, f in ((y, fy), (dx, fx), (dw, fw)):
        assert _rel(got, f) < 0.05


def _grouped_case(sizes, K=256, N=192, seed=0):
    M = sum(sizes) + 24  # rows past the groups' sum must come back 0 with 0 gradient
    x = _inputs("outliers", (M, K), seed)
    w = _inputs("random", (len(sizes), K, N), seed + 2) * 0.05
    dy = _inputs("random", (M, N), seed + 4)
    return x, w, dy, jnp.asarray(sizes, jnp.int32)


@pytest.mark.parametrize("sizes,gemm,pow2", [([128, 0, 256, 128], "emulated", False),  # groups of whole tiles
                                             ([70, 0, 200, 33], "emulated", False),  # tiles straddle experts
                                             ([70, 0, 200, 33], "native", True)])
def test_fp8_ragged_dot_matches_the_recipe_forward_and_backward(sizes, gemm, pow2):
    x, w, dy, group_sizes = _grouped_case(sizes, seed=11)
    fn = lambda x, w, pow2, gemm: fp8_ragged_dot(x, w, group_sizes, pow2=pow2, gemm=gemm)
    y, dx, dw = _value_and_vjp(functools.partial(fn, pow2=pow2, gemm=gemm), x, w, dy)
    for got, r, what in zip((y, dx, dw), _ref_ragged(x, w, dy, sizes, pow2), ("y", "dx", "dw")):
        _assert_close(got, r, what)
    end = sum(sizes)
    np.testing.assert_array_equal(y[end:], 0)
    np.testing.assert_array_equal(dx[end:], 0)
    grouped = lambda x, w: jax.lax.ragged_dot(x, w, group_sizes)
    fy, (fx, fw) = grouped(x, w), jax.grad(lambda x, w: jnp.sum(grouped(x, w) * dy), argnums=(0, 1))(x, w)
    for got, f in ((y, fy), (dx, fx), (dw, fw)):
        assert _rel(got, f) < 0.05


@pytest.mark.parametrize("gemm", ["native", "emulated"])
def test_blockwise_dot_accumulates_each_block_with_its_scales(gemm):
    qa = jnp.ones((2, 256), jnp.float8_e4m3fn)
    qb = jnp.ones((256, 3), jnp.float8_e4m3fn)
    sa = jnp.asarray([[1.0, 2.0], [0.5, 0.0]])
    sb = jnp.asarray([[1.0, 1.0, 3.0], [1.0, 2.0, 1.0]])
    out = blockwise_dot(qa, sa, qb, sb, gemm=gemm)
    np.testing.assert_allclose(out, [[128 * (1 + 2), 128 * (1 + 4), 128 * (3 + 2)], [64, 64, 192]])
    # Random E4M3 operands and scales: Σ_blocks (qa_blk @ qb_blk) * sa_blk * sb_blk.
    rng = np.random.default_rng(0)
    qa = np.clip(rng.standard_normal((64, 384)) * 100, -448, 448).astype(ml_dtypes.float8_e4m3fn)
    qb = np.clip(rng.standard_normal((384, 96)) * 100, -448, 448).astype(ml_dtypes.float8_e4m3fn)
    sa, sb = rng.uniform(0.01, 2, (64, 3)).astype(np.float32), rng.uniform(0.01, 2, (3, 96)).astype(np.float32)
    a, b = qa.astype(np.float64), qb.astype(np.float64)
    ref = sum((a[:, i * 128:(i + 1) * 128] @ b[i * 128:(i + 1) * 128]) * sa[:, i, None] * sb[i][None, :]
              for i in range(3))
    _assert_close(blockwise_dot(jnp.asarray(qa), jnp.asarray(sa), jnp.asarray(qb), jnp.asarray(sb), gemm=gemm), ref)


_GEMM_TYPES = re.compile(r"(?:stablehlo\.dot_general|chlo\.ragged_dot).* : \((.*)\) -> tensor<([^>]*)>")


def _gemms(text):
    """(op, operand types, result type) of every dot_general and ragged_dot in StableHLO text."""
    out = []
    for line in text.splitlines():
        m = _GEMM_TYPES.search(line)
        if m:
            op = "ragged_dot" if "chlo.ragged_dot" in line else "dot_general"
            out.append((op, re.findall(r"tensor<([^>]*)>", m.group(1))[:2], m.group(2)))
    return out


@pytest.mark.parametrize("platform", ["cpu", "cuda"])
def test_native_fp8_gemms_lower_to_fp8_dots_without_partial_products(platform):
    # Forced 'native', lowered (not compiled) for the CPU and for a GPU: every GEMM of the
    # forward and backward passes multiplies E4M3 operands into float32, and no op makes
    # the [blocks, rows, columns] float32 partial products of a one-shot blockwise GEMM.
    M, K, N, G = 200, 384, 256, 4  # 3 blocks of K, 2 of N, 2 of M (padded to 256)
    x, w, sizes = jnp.zeros((M, K)), jnp.zeros((G, K, N)), jnp.asarray([70, 0, 100, 30], jnp.int32)
    dense = lambda x, w: jnp.sum(fp8_matmul(x, w[0], gemm="native"))
    grouped = lambda x, w: jnp.sum(fp8_ragged_dot(x, w, sizes, gemm="native"))
    partials = [f"{b}x{m}x{n}xf32" for b, m, n in ((3, M, N), (2, M, K), (2, K, N), (G * 3, M, N))]
    for fn, grouped_op in ((dense, "dot_general"), (grouped, "ragged_dot" if platform == "cuda" else "dot_general")):
        step = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
        text = step.trace(x, w).lower(lowering_platforms=(platform,)).as_text()
        gemms = _gemms(text)
        for op, operands, result in gemms:
            assert all(t.endswith("xf8E4M3FN") for t in operands) and result.endswith("xf32"), (op, operands, result)
        # Fprop [M, N], Dgrad [M, K], Wgrad [K, N]; the grouped Fprop and Dgrad as ragged_dots.
        results = {(op, result) for op, _, result in gemms}
        assert {(grouped_op, f"{M}x{N}xf32"), (grouped_op, f"{M}x{K}xf32"), ("dot_general", f"{K}x{N}xf32")} <= results
        assert not [p for p in partials if p in text], partials


def test_native_fp8_gemms_match_emulated():
    # XLA's CPU runs dot_general and ragged_dot on E4M3 operands, so the native path runs
    # here: its values and gradients equal the emulated path's up to float32 summation order.
    # Dense: 3 blocks of K. Grouped: ragged groups, an empty one, rows past the groups, and
    # 9 row tiles + 5 groups = 14 Wgrad pieces (more than one UNROLL of the loop).
    x, w = _inputs("outliers", (200, 384)), _inputs("random", (384, 160), seed=5) * 0.05
    dy = _inputs("random", (200, 160))
    gx, gw, gdy, sizes = _grouped_case([70, 0, 600, 33, 300], K=128, N=128, seed=3)
    cases = {"dense": (fp8_matmul, x, w, dy),
             "grouped": (lambda x, w, gemm: fp8_ragged_dot(x, w, sizes, gemm=gemm), gx, gw, gdy)}
    for name, (fn, x, w, dy) in cases.items():
        out = {gemm: _value_and_vjp(functools.partial(fn, gemm=gemm), x, w, dy) for gemm in ("native", "emulated")}
        for got, ref, what in zip(out["native"], out["emulated"], ("y", "dx", "dw")):
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()),
                                       err_msg=f"{name} {what}")
    np.testing.assert_array_equal(out["native"][0][1003:], 0)  # rows past the groups
    np.testing.assert_array_equal(out["native"][1][1003:], 0)


def test_fp8_export_round_trip(tmp_path):
    import torch
    from transformers import DeepseekV3ForCausalLM

    import dsjax
    from dsjax.safetensors_io import SafetensorsReader
    from tests.hf_models import build_hf

    hf = build_hf("v3_yarn_groups")
    hf.save_pretrained(str(tmp_path / "src"))
    model, variables = dsjax.from_pretrained(str(tmp_path / "src"), mtp="off")
    dsjax.save_pretrained(model, variables, str(tmp_path / "fp8"), fp8=True)
    reader = SafetensorsReader(str(tmp_path / "fp8"))
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    assert str(reader.dtype(name)) == "float8_e4m3fn"
    assert reader.shape(name[:-len("weight")] + "weight_scale_inv") == (1, 1)
    assert str(reader.dtype("model.layers.1.mlp.gate.weight")) == "float32"  # the router stays wide
    model2, variables2 = dsjax.from_pretrained(str(tmp_path / "fp8"))
    w, w2 = variables["params"]["moe_layers"]["attn"]["wkv_b"], variables2["params"]["moe_layers"]["attn"]["wkv_b"]
    assert bool(jnp.all(jnp.abs(w2 - w) <= jnp.maximum(jnp.abs(w) * 2.0 ** -4, jnp.abs(w).max() / 448 * 2.0 ** -10)))
    tokens = np.random.default_rng(0).integers(0, 96, (2, 20)).astype(np.int32)
    ours = np.asarray(model2.apply(variables2, tokens).logits)
    reloaded = DeepseekV3ForCausalLM.from_pretrained(str(tmp_path / "fp8"), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = reloaded(torch.from_numpy(tokens).long()).logits.float().numpy()
    assert np.abs(ours - theirs).max() <= 1e-4


def test_fp8_training_step_near_bf16_and_same_under_expert_parallelism():
    # precision=fp8 in the model: three one-device steps stay within FP8's precision of the
    # default precision. Then the grouped FP8 GEMMs under shard_map (8 experts over 8
    # devices): the forward pass quantizes per row and per expert, so the loss equals one
    # device's; Wgrad's 128-row tiles group other rows there, so gradients agree to FP8's
    # precision.
    from flax import linen as nn

    import dsjax
    from dsjax.moe import expert_parallel_axes
    from sharding.mesh import MeshConfig, make_mesh
    from sharding.rules import activation_rules
    from tests.test_sharding import OVERRIDES
    from train.config import build_config
    from train.optim import make_optimizer
    from train.steps import TrainState, make_train_step, state_shardings

    # hidden 128: the activation tiles and weight blocks are full 128-wide ones.
    cfg = build_config("pretrain", OVERRIDES + ["model.hidden_size=128"])
    tokens = jax.random.randint(jax.random.key(0), (8, 17), 2, 256)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    steps, first = {}, {}
    for precision in ("default", "fp8"):
        model = dsjax.Transformer(cfg.model.replace(precision=precision))
        boxed = model.init(jax.random.key(1), batch["inputs"])
        v = dsjax.unbox(boxed)
        tx, schedule = make_optimizer(cfg.train, boxed["params"])
        state = TrainState(jnp.zeros((), jnp.int32), v["params"], tx.init(v["params"]), v["moe_bias"])
        step = jax.jit(make_train_step(model, tx, cfg.train, schedule))
        new, first[precision] = step(state, batch)
        for _ in range(2):
            new, metrics = step(new, batch)
        steps[precision] = metrics
    assert np.isfinite(float(steps["fp8"]["loss"]))
    assert float(steps["fp8"]["ce"]) < float(first["fp8"]["ce"]) - 0.02  # it learns (in warmup)
    np.testing.assert_allclose(steps["fp8"]["ce"], steps["default"]["ce"], rtol=0.01)
    # ... and the switch took effect: FP8 differs from the default by far more than the
    # 1e-5 that the expert-parallel comparison below allows.
    assert abs(float(first["fp8"]["loss"]) / float(first["default"]["loss"]) - 1) > 5e-5
    np.testing.assert_allclose(steps["fp8"]["grad_norm"], steps["default"]["grad_norm"], rtol=0.1)

    ref = first["fp8"]  # model, tx, state: the FP8 ones from the loop
    mesh = make_mesh(MeshConfig(fsdp=1, expert=8, rules="fsdp_ep"))
    state_sh = state_shardings(boxed, tx, mesh, "fsdp_ep")
    batch_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp", "expert")))
    with jax.set_mesh(mesh), nn.logical_axis_rules(activation_rules("fsdp_ep")):
        assert expert_parallel_axes() is not None  # the shard_map dispatch, not GSPMD's
        step = jax.jit(make_train_step(model, tx, cfg.train, schedule, activation_rules("fsdp_ep")),
                       in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None))
        _, got = step(jax.device_put(state, state_sh), jax.device_put(batch, batch_sh))
    for key in ("loss", "ce", "balance_loss"):
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(got["grad_norm"], ref["grad_norm"], rtol=0.02)


def test_fp8_forward_is_causal_and_keeps_rows_apart():
    # Activation tiles run along the features of one token, never across tokens or rows,
    # so the FP8 forward pass cannot leak later tokens (or other sequences) into a logit.
    import dsjax
    from tests.test_sharding import OVERRIDES
    from train.config import build_config

    cfg = build_config("pretrain", OVERRIDES + ["model.hidden_size=128", "model.precision=fp8",
                                                "model.dtype=bfloat16", "model.moe_impl=dense"]).model
    model = dsjax.Transformer(cfg)
    tokens = jax.random.randint(jax.random.key(0), (2, 24), 2, 256)
    variables = dsjax.unbox(model.init(jax.random.key(1), tokens))
    logits = jax.jit(lambda t: model.apply(variables, t).logits.astype(jnp.float32))
    ref = logits(tokens)
    later = logits(tokens.at[:, 16:].set(7))
    np.testing.assert_array_equal(later[:, :16], ref[:, :16])
    assert float(jnp.abs(later[:, 16:] - ref[:, 16:]).max()) > 0
    other_row = logits(tokens.at[1].set(9))
    np.testing.assert_array_equal(other_row[0], ref[0])


def test_fp8_gemm_switch_reaches_the_layers_and_experts():
    # model.fp8_gemm picks the path of every FP8 product of the model: 'native' lowers the
    # linear layers to FP8 dot_generals and the routed experts to FP8 ragged_dots (GPU
    # lowering), 'emulated' multiplies no FP8 operands anywhere.
    import dsjax
    from dsjax.config import ConfigError
    from tests.test_sharding import OVERRIDES
    from train.config import build_config

    cfg = build_config("pretrain", OVERRIDES + ["model.hidden_size=128", "model.precision=fp8"]).model
    assert "fp8_gemm" not in cfg.to_hf()
    with pytest.raises(ConfigError, match="fp8_gemm"):
        cfg.replace(fp8_gemm="fast")
    tokens = jnp.zeros((2, 16), jnp.int32)
    variables = jax.eval_shape(dsjax.Transformer(cfg).init, jax.random.key(0), tokens)
    found = {}
    for gemm in ("native", "emulated"):
        model = dsjax.Transformer(cfg.replace(fp8_gemm=gemm))
        text = jax.jit(model.apply).trace(dsjax.unbox(variables), tokens).lower(lowering_platforms=("cuda",)).as_text()
        found[gemm] = {op for op, operands, _ in _gemms(text) if all(t.endswith("xf8E4M3FN") for t in operands)}
    assert found == {"native": {"dot_general", "ragged_dot"}, "emulated": set()}


def _primitives(jaxpr) -> set:
    """Names of the primitives of a jaxpr and of every jaxpr inside it."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for sub in _sub_jaxprs(eqn):
            names |= _primitives(sub)
    return names


def _sub_jaxprs(eqn):
    from jax.extend.core import ClosedJaxpr, Jaxpr

    for value in eqn.params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, (ClosedJaxpr, Jaxpr)):
                yield v.jaxpr if isinstance(v, ClosedJaxpr) else v


def _custom_vjp_bodies(jaxpr) -> list:
    """The primitives of the forward body of every custom_vjp call in a jaxpr (nested ones
    included, e.g. under the layers' scan)."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "custom_vjp_call":
            out.append(_primitives(eqn.params["call_jaxpr"].jaxpr))
        else:
            for sub in _sub_jaxprs(eqn):
                out += _custom_vjp_bodies(sub)
    return out


def test_fp8_pow2_scales_switch_reaches_the_layers_and_experts():
    # model.fp8_pow2_scales reaches every FP8 product of the model, the linear layers'
    # fp8_matmul and the experts' fp8_ragged_dot: with it each rounds its scales up to a
    # power of two (a ceil in its forward body), without it none does.
    import dsjax
    from dsjax.config import ConfigError
    from tests.test_sharding import OVERRIDES
    from train.config import build_config

    # (dense attention: the blockwise kernel's custom_vjp holds dot_generals too)
    cfg = build_config("pretrain", OVERRIDES + ["model.hidden_size=128", "model.precision=fp8",
                                                "model.moe_impl=ragged", "model.attn_kernel=dense"]).model
    assert "fp8_pow2_scales" not in cfg.to_hf()
    with pytest.raises(ConfigError, match="fp8_pow2_scales"):
        cfg.replace(fp8_pow2_scales="yes")
    tokens = jnp.zeros((2, 16), jnp.int32)
    variables = dsjax.unbox(jax.eval_shape(dsjax.Transformer(cfg).init, jax.random.key(0), tokens))
    for pow2 in (False, True):
        model = dsjax.Transformer(cfg.replace(fp8_pow2_scales=pow2))
        # the FP8 GEMMs' custom_vjps (they cast to float8; the output head's layers.matmul,
        # kept in the compute dtype, is a custom_vjp around a lone dot_general)
        bodies = [b for b in _custom_vjp_bodies(jax.make_jaxpr(model.apply)(variables, tokens).jaxpr)
                  if b & {"dot_general", "ragged_dot_general"} and b != {"dot_general"}]
        grouped = [b for b in bodies if "ragged_dot_general" in b]
        assert 0 < len(grouped) < len(bodies), (len(grouped), len(bodies))
        assert [("ceil" in b) for b in bodies] == [pow2] * len(bodies)
