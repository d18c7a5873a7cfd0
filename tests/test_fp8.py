"""FP8 recipe: tile/block quantization error and locality, the blockwise GEMM, and the
custom_vjp's gradients."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.fp8 import (blockwise_dot, dequantize_blocks, dequantize_tiles, expert_block_values, fp8_matmul,
                       fp8_ragged_dot, quantize_blocks, quantize_tiles, tile_values)


def _inputs(kind, shape, seed=0):
    x = jax.random.normal(jax.random.key(seed), shape)
    if kind == "outliers":  # heavy tails: a few values 1000x the rest
        spikes = jax.random.bernoulli(jax.random.key(seed + 1), 0.002, shape)
        x = jnp.where(spikes, x * 1000.0, x)
    return x


@pytest.mark.parametrize("kind", ["random", "outliers"])
@pytest.mark.parametrize("pow2", [False, True])
def test_quantize_dequantize_within_e4m3_bound(kind, pow2):
    x = _inputs(kind, (64, 300))  # 300: a partial last tile
    q, s = quantize_tiles(x, pow2=pow2)
    assert q.dtype == jnp.float8_e4m3fn and s.shape == (64, 3)
    back = dequantize_tiles(q, s)[:, :300]
    scale = jnp.repeat(s, 128, axis=1)[:, :300]
    # E4M3 keeps 3 mantissa bits: relative error <= 2^-4 for normals, and half the
    # subnormal step (2^-10 in scaled units) below 2^-6.
    bound = jnp.maximum(jnp.abs(x) * 2.0 ** -4, scale * 2.0 ** -10) * 1.0001
    assert bool(jnp.all(jnp.abs(back - x) <= bound))
    if pow2:
        np.testing.assert_array_equal(np.log2(np.asarray(s)) % 1, 0)
    w = _inputs(kind, (300, 200), seed=3)
    qw, sw = quantize_blocks(w, pow2=pow2)
    assert sw.shape == (3, 2)
    back = dequantize_blocks(qw, sw)[:300, :200]
    scale = jnp.repeat(jnp.repeat(sw, 128, 0), 128, 1)[:300, :200]
    assert bool(jnp.all(jnp.abs(back - w) <= jnp.maximum(jnp.abs(w) * 2.0 ** -4, scale * 2.0 ** -10) * 1.0001))


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


@pytest.mark.parametrize("kind", ["random", "outliers"])
def test_fp8_gemm_close_to_float32(kind):
    x, w = _inputs(kind, (96, 384)), _inputs("random", (384, 160), seed=5) * 0.05
    y = fp8_matmul(x, w)
    ref = x @ w
    rel = float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))
    assert rel < 0.05, rel  # two E4M3 roundings of ~2^-5 each, averaged over 384 terms
    # Exactly the blockwise product of the dequantized operands (float32 accumulation).
    qx, sx = quantize_tiles(x)
    qw, sw = quantize_blocks(w)
    deq = dequantize_tiles(qx, sx) @ dequantize_blocks(qw, sw)
    np.testing.assert_allclose(y, deq[:, :160], rtol=1e-5, atol=1e-4)


def test_custom_vjp_gradients():
    x = _inputs("random", (2, 64, 256))
    w = _inputs("random", (256, 192), seed=7) * 0.05
    dy = _inputs("random", (2, 64, 192), seed=9)
    loss = lambda x, w: jnp.sum(fp8_matmul(x, w) * dy)
    gx, gw = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
    # Against autodiff of the dequantized reference, each GEMM with its FP8 operands.
    flat_x, flat_dy = x.reshape(-1, 256), dy.reshape(-1, 192)
    ref_gx = tile_values(flat_dy) @ expert_block_values(w.T[None])[0]
    ref_gw = tile_values(flat_x.T) @ tile_values(flat_dy.T).T
    np.testing.assert_allclose(gx.reshape(-1, 256), ref_gx, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(gw, ref_gw, rtol=1e-4, atol=1e-3)
    # And close to the float32 gradients.
    fx, fw = jax.grad(lambda x, w: jnp.sum((x @ w) * dy), argnums=(0, 1))(x, w)
    for got, ref in ((gx, fx), (gw, fw)):
        assert float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref)) < 0.05


def _grouped_case(sizes, K=256, N=192, seed=0):
    M = sum(sizes) + 24  # rows past the groups' sum must come back 0 with 0 gradient
    x = _inputs("outliers", (M, K), seed)
    w = _inputs("random", (len(sizes), K, N), seed + 2) * 0.05
    dy = _inputs("random", (M, N), seed + 4)
    return x, w, dy, jnp.asarray(sizes, jnp.int32)


def test_fp8_grouped_gemm_matches_per_expert_fp8_gemms():
    # With every group a multiple of 128 rows, no Wgrad tile straddles two experts, so the
    # grouped GEMM must equal one fp8_matmul per expert: values and both gradients.
    x, w, dy, sizes = _grouped_case([128, 0, 256, 128])
    loss = lambda x, w: jnp.sum(fp8_ragged_dot(x, w, sizes) * dy)
    y = jax.jit(fp8_ragged_dot)(x, w, sizes)
    gx, gw = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
    bounds = np.cumsum([0, 128, 0, 256, 128])
    ref_gw = []
    for e in range(4):
        a, b = bounds[e], bounds[e + 1]
        if a == b:
            ref_gw.append(jnp.zeros_like(w[e]))
            continue
        np.testing.assert_allclose(y[a:b], fp8_matmul(x[a:b], w[e]), rtol=1e-5, atol=1e-3)  # f32 summation order
        ex, ew = jax.grad(lambda x, w: jnp.sum(fp8_matmul(x, w) * dy[a:b]), argnums=(0, 1))(x[a:b], w[e])
        np.testing.assert_allclose(gx[a:b], ex, rtol=1e-4, atol=1e-3)
        ref_gw.append(ew)
    np.testing.assert_allclose(gw, jnp.stack(ref_gw), rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(y[bounds[-1]:], 0)
    np.testing.assert_array_equal(gx[bounds[-1]:], 0)


def test_fp8_grouped_gemm_gradients():
    # Ragged groups (tiles straddle experts): against autodiff of the dequantized reference
    # GEMMs and against float32.
    x, w, dy, sizes = _grouped_case([70, 0, 200, 33], seed=11)
    loss = lambda x, w: jnp.sum(fp8_ragged_dot(x, w, sizes) * dy)
    gx, gw = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
    mm = lambda a, b: jax.lax.ragged_dot(a, b, sizes, preferred_element_type=jnp.float32)
    ref_gx = mm(tile_values(dy), jnp.swapaxes(expert_block_values(w), 1, 2))
    ref_gw = jax.grad(lambda m: jnp.sum(mm(tile_values(x.T).T, m) * tile_values(dy.T).T))(w)
    np.testing.assert_allclose(gx, ref_gx, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(gw, ref_gw, rtol=1e-4, atol=1e-3)
    y = fp8_ragged_dot(x, w, sizes)
    fy = jax.lax.ragged_dot(x, w, sizes)
    fx, fw = jax.grad(lambda x, w: jnp.sum(jax.lax.ragged_dot(x, w, sizes) * dy), argnums=(0, 1))(x, w)
    for got, ref in ((y, fy), (gx, fx), (gw, fw)):
        assert float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref)) < 0.05


@pytest.mark.parametrize("gemm", ["native", "emulated"])
def test_blockwise_dot_accumulates_each_block_with_its_scales(gemm):
    qa = jnp.ones((2, 256), jnp.float8_e4m3fn)
    qb = jnp.ones((256, 3), jnp.float8_e4m3fn)
    sa = jnp.asarray([[1.0, 2.0], [0.5, 0.0]])
    sb = jnp.asarray([[1.0, 1.0, 3.0], [1.0, 2.0, 1.0]])
    out = blockwise_dot(qa, sa, qb, sb, gemm=gemm)
    np.testing.assert_allclose(out, [[128 * (1 + 2), 128 * (1 + 4), 128 * (3 + 2)], [64, 64, 192]])
    # Both ways agree on random FP8 operands and scales (float32 summation order aside).
    qa, sa = quantize_tiles(_inputs("outliers", (64, 384)))
    qb, sb = quantize_tiles(_inputs("random", (96, 384), seed=2))
    other = blockwise_dot(qa, sa, qb.T, sb.T, gemm="emulated" if gemm == "native" else "native")
    np.testing.assert_allclose(blockwise_dot(qa, sa, qb.T, sb.T, gemm=gemm), other, rtol=1e-5, atol=1e-3)


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


@functools.partial(jax.jit, static_argnums=0)
def _value_and_vjp(fn, x, w, dy):
    """(fn(x, w), dx, dw) for the cotangent dy."""
    y, vjp = jax.vjp(fn, x, w)
    return (y,) + vjp(dy)


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
