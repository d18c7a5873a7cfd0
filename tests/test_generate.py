"""Generation: cached decoding (naive and absorbed MLA) against full recomputation, cache
sizes, MTP speculative decoding (greedy equality, the sampling rule, the sampled output
distribution end to end), compile reuse (batched and streamed)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsjax
from dsjax import decoding as gen_lib
from dsjax.decoding import generate, sampling_logprobs, speculative_accept
from dsjax.model import cache_bytes
from train.config import build_config
from train.optim import make_optimizer
from train.steps import TrainState, make_train_step

PROMPTS = np.array([[5, 6, 7, 8, 9, 10, 11], [20, 21, 22, 0, 0, 0, 0], [3, 0, 0, 0, 0, 0, 0]])
LENGTHS = [7, 3, 1]


@pytest.fixture(scope="module")
def random_model():
    cfg = dsjax.load_model_config("tiny", vocab_size=64)
    model = dsjax.Transformer(cfg)
    variables = dsjax.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    # Larger weights give peaked, varied predictions.
    variables["params"] = jax.tree.map(lambda x: x * 3 if x.ndim >= 2 else x, variables["params"])
    variables["moe_bias"] = jax.tree.map(lambda b: b + 0.01 * jnp.arange(b.shape[-1]), variables["moe_bias"])
    return cfg, variables


@pytest.fixture(scope="module")
def counting_model():
    """A tiny model trained for a moment on 'each token is the previous plus one', so the
    MTP module's drafts are mostly right."""
    cfg = build_config("pretrain", ["model.vocab_size=32", "model.num_hidden_layers=2", "train.lr=1e-2",
                                    "train.steps=120", "train.warmup_steps=10", "model.moe_impl=dense"])
    model = dsjax.Transformer(cfg.model)
    boxed = model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))
    variables = dsjax.unbox(boxed)
    tx, schedule = make_optimizer(cfg.train, boxed["params"])
    state = TrainState(jnp.zeros((), jnp.int32), variables["params"], tx.init(variables["params"]),
                       variables["moe_bias"])
    step = jax.jit(make_train_step(model, tx, cfg.train, schedule))
    rng = np.random.default_rng(0)
    for _ in range(cfg.train.steps):
        starts = rng.integers(0, 32, size=(8, 1))
        seq = (starts + np.arange(33)) % 32
        state, _ = step(state, {"inputs": jnp.asarray(seq[:, :-1]), "targets": jnp.asarray(seq[:, 1:])})
    return cfg.model, {"params": state.params, "moe_bias": state.moe_bias}


def _full_recompute(model, variables, prompt, new_tokens):
    seq = jnp.asarray([list(prompt) + list(new_tokens)])
    logits = model.apply(variables, seq, mtp=False).logits[0, len(prompt) - 1:-1]
    logp = jax.nn.log_softmax(logits)
    return np.asarray(jnp.argmax(logits, -1)), np.asarray(logp[jnp.arange(len(new_tokens)), jnp.asarray(new_tokens)])


@pytest.mark.parametrize("impl", ["naive", "absorb"])
def test_cached_decoding_matches_full_recompute(random_model, impl):
    cfg, variables = random_model
    model = dsjax.Transformer(cfg.replace(attn_impl=impl))
    out = generate(model, variables, PROMPTS, LENGTHS, max_new_tokens=10)
    assert out.tokens.shape == (3, 10) and list(out.lengths) == [10, 10, 10]
    for b in range(3):
        ref_tokens, ref_logp = _full_recompute(model, variables, PROMPTS[b, :LENGTHS[b]], np.asarray(out.tokens[b]))
        np.testing.assert_array_equal(np.asarray(out.tokens[b]), ref_tokens)
        np.testing.assert_allclose(np.asarray(out.logprobs[b]), ref_logp, atol=1e-4)
    other = generate(dsjax.Transformer(cfg.replace(attn_impl="naive" if impl == "absorb" else "absorb")),
                     variables, PROMPTS, LENGTHS, max_new_tokens=10)
    np.testing.assert_array_equal(other.tokens, out.tokens)
    np.testing.assert_allclose(other.logprobs, out.logprobs, atol=1e-4)


def test_decoding_holds_the_layers_apart_where_they_run_unrolled(random_model):
    """On one CPU device the decoder runs on per-layer weights (`to_layout`); with the
    layer scan it keeps the stacks. Same tokens and log-probs either way, batched and
    streamed; variables already in the 'layers' layout are used as they are."""
    from dsjax.model import to_layout

    cfg, variables = random_model
    model = dsjax.Transformer(cfg.replace(attn_impl="absorb"))
    apart = jax.eval_shape(model.clone(layout="layers").init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    split = to_layout(variables, "layers")
    assert jax.tree.map(lambda x: x.shape, dsjax.unbox(apart)) == jax.tree.map(lambda x: x.shape, split)
    # boxed variables convert with their axis names, as init in that layout names them
    boxed = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    names = lambda tree: [x.names for x in jax.tree.leaves(  # noqa: E731
        tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))]
    assert names(to_layout(boxed, "layers")) == names(apart)
    # the naive (training) form of attention on them: same logits
    naive = dsjax.Transformer(cfg.replace(attn_impl="naive"))
    np.testing.assert_allclose(naive.clone(layout="layers").apply(split, PROMPTS).logits,
                               naive.apply(variables, PROMPTS).logits, atol=1e-5)
    assert gen_lib._decoder(model, variables)[0].layout == "layers"
    scanned = dsjax.Transformer(cfg.replace(attn_impl="absorb", layer_loop="scan"))
    assert gen_lib._decoder(scanned, variables)[0].layout == "stacked"
    out = generate(model, variables, PROMPTS, LENGTHS, max_new_tokens=6)
    ref = generate(scanned, variables, PROMPTS, LENGTHS, max_new_tokens=6)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-4)
    again = generate(model.clone(layout="layers"), split, PROMPTS, LENGTHS, max_new_tokens=6)
    np.testing.assert_array_equal(again.tokens, ref.tokens)
    streamed = list(dsjax.generate_stream(model, variables, PROMPTS[0, :LENGTHS[0]], max_new_tokens=6))
    assert streamed == list(np.asarray(out.tokens[0]))
    with pytest.raises(ValueError, match="layout must be one of"):
        to_layout(variables, "experts")


def test_decode_copies_hold_wkv_b_head_major_and_absorbed_attention_reads_them(random_model):
    """On a CPU `generate` passes each MLA block's wkv_b head-major ([H, C, K+V], the CPU
    wing's weight copies in `impl.DECODE_COPIES`) so that a decoding step does not
    transpose it; any layout, boxed or not."""
    from dsjax import impl
    from dsjax.cpu.decode import copies as decode_weights
    from dsjax.model import to_layout

    cfg, variables = random_model
    mtp, stacks = cfg.num_nextn_predict_layers, (cfg.num_dense_layers > 0) + (cfg.num_moe_layers > 0)
    for params, blocks in ((variables["params"], stacks + mtp),
                           (to_layout(variables, "layers")["params"], cfg.num_hidden_layers + mtp)):
        found = [(path, x) for path, x in jax.tree_util.tree_flatten_with_path(params)[0]
                 if path[-1].key == "wkv_b"]
        heads = dict(jax.tree_util.tree_flatten_with_path(decode_weights(params))[0])
        assert len(heads) == len(found) == blocks
        for path, w in found:
            head_major = heads[path[:-1] + (jax.tree_util.DictKey("wkv_b_heads"),)]
            np.testing.assert_array_equal(head_major, np.swapaxes(w, -3, -2))
    boxed = dsjax.Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    boxes = jax.tree.leaves(decode_weights(boxed), is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert {x.names for x in boxes} == {("layers", "heads", "kv_lora", "head_dim"), ("heads", "kv_lora", "head_dim")}
    # generate's decoder gets the copy (absorbed MLA only), and the absorbed attention reads
    # it: the same logits with it, others with it zeroed
    model = dsjax.Transformer(cfg.replace(attn_impl="absorb"))
    assert impl.DECODE_COPIES in gen_lib._decoder(model, variables)[1]
    naive = gen_lib._decoder(dsjax.Transformer(cfg.replace(attn_impl="naive")), variables)[1]
    assert not [path for path, _ in jax.tree_util.tree_flatten_with_path(naive.get(impl.DECODE_COPIES, {}))[0]
                if path[-1].key == "wkv_b_heads"]
    # off the CPU wing (matmul_impl='xla', as resolved for a GPU or TPU): no copies
    assert impl.DECODE_COPIES not in gen_lib._decoder(dsjax.Transformer(cfg.replace(attn_impl="absorb",
                                                                                    matmul_impl="xla")), variables)[1]
    logits = lambda dw: model.apply({**variables, impl.DECODE_COPIES: dw}, PROMPTS).logits  # noqa: E731
    ref = model.apply(variables, PROMPTS).logits
    np.testing.assert_allclose(logits(decode_weights(variables["params"])), ref, atol=1e-5)
    assert not np.allclose(logits(jax.tree.map(jnp.zeros_like, decode_weights(variables["params"]))), ref, atol=1e-2)


def test_stop_tokens_end_rows(random_model):
    cfg, variables = random_model
    model = dsjax.Transformer(cfg)
    full = generate(model, variables, PROMPTS, LENGTHS, max_new_tokens=10)
    stop = int(full.tokens[0, 3])
    out = generate(model, variables, PROMPTS, LENGTHS, max_new_tokens=10, stop_tokens=(stop,))
    first = list(np.asarray(full.tokens[0])).index(stop)
    assert int(out.lengths[0]) == first + 1
    np.testing.assert_array_equal(out.tokens[0, :first + 1], full.tokens[0, :first + 1])
    assert (np.asarray(out.tokens[0, first + 1:]) == 0).all() and (np.asarray(out.logprobs[0, first + 1:]) == 0).all()


@pytest.mark.parametrize("impl", ["absorb", "naive"])
def test_cache_bytes_formula(impl):
    cfg = dsjax.load_model_config("tiny", attn_impl=impl)
    model = dsjax.Transformer(cfg)
    B, S, L = 3, 100, cfg.num_hidden_layers
    if impl == "absorb":
        expected = L * B * S * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    else:
        expected = L * B * S * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * 4
    assert cache_bytes(model, B, S) == expected
    assert cache_bytes(model, B, S, mtp=True) == expected * (L + 1) // L
    big = dsjax.load_model_config("deepseek-v3-671b", attn_impl=impl)
    per_token = cache_bytes(dsjax.Transformer(big), 1, 1)
    assert per_token == (61 * (512 + 64) * 2 if impl == "absorb" else 61 * 128 * (192 + 128) * 2)


def test_greedy_speculative_equals_greedy_plain(random_model, counting_model):
    for cfg, variables in (random_model, counting_model):
        model = dsjax.Transformer(cfg)
        prompts = PROMPTS % cfg.vocab_size
        plain = generate(model, variables, prompts, LENGTHS, max_new_tokens=16)
        spec = generate(model, variables, prompts, LENGTHS, max_new_tokens=16, speculative=True)
        np.testing.assert_array_equal(spec.tokens, plain.tokens)
        np.testing.assert_allclose(spec.logprobs, plain.logprobs, atol=1e-4)
        np.testing.assert_array_equal(spec.lengths, plain.lengths)
    # On the counting model most drafts are right: fewer forward passes per token.
    assert spec.acceptance_rate > 0.6, spec.acceptance_rate
    assert spec.tokens_per_forward > 1.5
    assert (np.diff(np.asarray(plain.tokens[0])) % cfg.vocab_size == 1).all()


def test_speculative_accept_rule_gives_the_target_distribution():
    V, n = 6, 200_000
    p = jnp.asarray([0.35, 0.25, 0.2, 0.1, 0.07, 0.03])
    q = jnp.asarray([0.05, 0.1, 0.4, 0.25, 0.1, 0.1])
    keys = jax.random.split(jax.random.key(0), n)

    def one(key):
        k_draft, k_acc = jax.random.split(key)
        draft = jax.random.categorical(k_draft, jnp.log(q))[None]
        tok, acc = speculative_accept(k_acc, jnp.log(p)[None], jnp.log(q)[None], draft)
        return tok[0], acc[0]

    tokens, accepted = jax.jit(jax.vmap(one))(keys)
    freq = np.bincount(np.asarray(tokens), minlength=V) / n
    np.testing.assert_allclose(freq, p, atol=4 * np.sqrt(0.25 / n))
    # Acceptance probability is sum_x min(p, q).
    np.testing.assert_allclose(np.asarray(accepted).mean(), float(jnp.minimum(p, q).sum()), atol=0.005)


def test_sampled_speculative_decoding_runs_and_reports(counting_model):
    cfg, variables = counting_model
    model = dsjax.Transformer(cfg)
    out = generate(model, variables, PROMPTS % 32, LENGTHS, max_new_tokens=12, temperature=0.7,
                   rng=jax.random.key(3), speculative=True, top_k=8, top_p=0.95)
    assert out.tokens.shape == (3, 12) and int(out.drafted) > 0 and 0 <= out.acceptance_rate <= 1
    assert np.isfinite(np.asarray(out.logprobs)).all()


def _chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson's chi-square test of sample counts against exact probabilities (cells
    expected under 5 times pooled into one)."""
    from scipy import stats

    c, e = counts.ravel(), probs.ravel() * counts.sum()
    small = e < 5
    if small.any():
        c, e = (np.append(x[~small], x[small].sum()) for x in (c, e))
    return float(stats.chi2.sf(((c - e) ** 2 / e).sum(), len(e) - 1))


def test_sampled_speculative_decoding_gives_the_model_distribution():
    """End to end: 4096 seeded samples of the first three tokens of one prompt under
    speculative sampling follow the main model's exact distribution, computed from its
    logits on every continuation. The MTP module is re-initialized so its drafts often
    disagree: token 2 is an accepted draft or a resample, token 3 a bonus token (after an
    accepted draft) or a second round's accepted draft or resample."""
    V, T, B, prompt = 8, 0.9, 4096, np.array([3, 5, 2, 6], np.int32)
    L = len(prompt)
    cfg = dsjax.load_model_config(
        "tiny", vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, q_lora_rank=32,
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=32, moe_impl="dense")
    model = dsjax.Transformer(cfg)
    init = jax.jit(lambda key: dsjax.unbox(model.init(key, jnp.zeros((1, L), jnp.int32))))
    variables, other = init(jax.random.key(0)), init(jax.random.key(1))
    # Larger weights give peaked predictions; the MTP module of another initialization drafts badly.
    params = {**variables["params"], "mtp_0": other["params"]["mtp_0"]}
    variables["params"] = jax.tree.map(lambda x: x * 4 if x.ndim >= 2 else x, params)

    # Exact: the main model (p) and the MTP drafts (q) on prompt + every (t1, t2).
    t1, t2 = np.meshgrid(np.arange(V), np.arange(V), indexing="ij")
    seqs = np.concatenate([np.broadcast_to(prompt, (V * V, L)), t1.reshape(-1, 1), t2.reshape(-1, 1)], axis=1)
    out = jax.jit(model.apply)(variables, jnp.asarray(seqs))
    dist = lambda x: np.asarray(jax.nn.softmax(x / T), np.float64).reshape(V, V, L + 2, V)  # noqa: E731
    p, q = dist(out.logits), dist(out.mtp_logits[0])
    p1, p2, p3 = p[0, 0, L - 1], p[:, 0, L], p[:, :, L + 1]  # [V], [t1, V], [t1, t2, V]
    q2, q3 = q[:, 0, L - 1], q[:, :, L]  # the draft of token 2 given t1; of token 3 given t1, t2
    joint = p1[:, None, None] * p2[:, :, None] * p3  # P(t1, t2, t3)
    accept2 = (p1 * np.minimum(p2, q2).sum(-1)).sum()
    reject2 = p1[:, None] * np.maximum(p2 - q2, 0)  # P(t1, draft rejected, t2)
    accept3 = (reject2 * np.minimum(p3, q3).sum(-1)).sum()
    assert 0.3 < accept2 < 0.8, accept2  # drafts are both accepted and rejected

    gen = generate(model, variables, np.broadcast_to(prompt, (B, L)), np.full(B, L), max_new_tokens=3,
                   temperature=T, rng=jax.random.key(0), speculative=True, prompt_bucket=L)
    tok = np.asarray(gen.tokens)
    counts12, counts23 = np.zeros((V, V)), np.zeros((V, V))
    np.add.at(counts12, (tok[:, 0], tok[:, 1]), 1)
    np.add.at(counts23, (tok[:, 1], tok[:, 2]), 1)
    assert _chi2_pvalue(counts12, joint.sum(2)) > 1e-3
    assert _chi2_pvalue(counts23, joint.sum(0)) > 1e-3
    # Every row drafts token 2, and token 3 after a rejection; each count is within five
    # standard deviations (at most sqrt(B) / 2) of its expectation.
    np.testing.assert_allclose(int(gen.drafted), B * (2 - accept2), atol=5 * np.sqrt(B) / 2)
    np.testing.assert_allclose(int(gen.accepted), B * (accept2 + accept3), atol=5 * np.sqrt(B) / 2)
    # The log-probabilities are the model's at temperature 1, accepted drafts and bonus tokens included.
    logp = np.asarray(jax.nn.log_softmax(out.logits)).reshape(V, V, L + 2, V)
    exact = np.stack([logp[0, 0, L - 1, tok[:, 0]], logp[tok[:, 0], 0, L, tok[:, 1]],
                      logp[tok[:, 0], tok[:, 1], L + 1, tok[:, 2]]], axis=1)
    np.testing.assert_allclose(np.asarray(gen.logprobs), exact, atol=1e-4)


def test_top_k_and_top_p():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda lp: np.isfinite(np.asarray(lp[0]))
    assert list(kept(sampling_logprobs(logits, 1.0, top_k=2))) == [True, True, False, False]
    assert list(kept(sampling_logprobs(logits, 1.0, top_p=0.75))) == [True, True, False, False]
    assert list(kept(sampling_logprobs(logits, 1.0, top_p=0.85))) == [True, True, True, False]
    np.testing.assert_allclose(np.exp(sampling_logprobs(logits, 1.0, top_p=0.75))[0, :2], [0.625, 0.375], rtol=1e-5)


def test_compiles_once_per_bucket_and_bad_input(random_model):
    cfg, variables = random_model
    model = dsjax.Transformer(cfg)
    generate(model, variables, PROMPTS, LENGTHS, max_new_tokens=5)
    before = gen_lib._generate_plain._cache_size()
    generate(model, variables, PROMPTS[:, :5], [5, 3, 1], max_new_tokens=5)  # same 64-token bucket
    generate(model, variables, np.ones((3, 20), np.int32), [20, 2, 9], max_new_tokens=5)
    assert gen_lib._generate_plain._cache_size() == before
    with pytest.raises(ValueError, match=r"prompt_lengths must be in \[1, 7\]"):
        generate(model, variables, PROMPTS, [8, 1, 1])
    with pytest.raises(ValueError, match="needs an explicit rng"):
        generate(model, variables, PROMPTS, LENGTHS, temperature=0.5)
    plain = dsjax.Transformer(cfg.replace(num_nextn_predict_layers=0))
    with pytest.raises(ValueError, match="needs an MTP module"):
        generate(plain, variables, PROMPTS, LENGTHS, speculative=True)


def test_stream_matches_batched_and_cli(random_model, tmp_path):
    import subprocess
    import sys

    from dsjax.decoding import generate_stream
    from tests.test_train import ROOT

    cfg, variables = random_model
    model = dsjax.Transformer(cfg)
    batched = generate(model, variables, PROMPTS[:1], LENGTHS[:1], max_new_tokens=8)
    streamed = list(generate_stream(model, variables, PROMPTS[0], max_new_tokens=8))
    assert streamed == list(np.asarray(batched.tokens[0]))
    dsjax.save_pretrained(model, variables, str(tmp_path))
    done = subprocess.run([sys.executable, "-m", "eval", "generate", "--hf", str(tmp_path), "--tokenizer", "bytes",
                           "--prompt", "ab", "--max-new-tokens", "6"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("ab")
    # --set reaches the model the CLI builds; keys that would change the model are refused.
    from eval.__main__ import _load, _parser, main as eval_main
    loaded, _, _ = _load(_parser().parse_args(["generate", "--hf", str(tmp_path), "--prompt", "ab",
                                               "--set", "model.precision=fp8", "--set", "model.dtype=bfloat16"]))
    assert (loaded.cfg.precision, loaded.cfg.dtype, loaded.cfg.attn_impl) == ("fp8", "bfloat16", "absorb")
    assert eval_main(["generate", "--hf", str(tmp_path), "--prompt", "ab", "--set", "model.vocab_size=8"]) == 2
    assert eval_main(["generate", "--hf", str(tmp_path), "--prompt", "ab", "--set", "train.steps=8"]) == 2
    missing = subprocess.run([sys.executable, "-m", "eval", "generate", "--hf", str(tmp_path / "nope"),
                              "--prompt", "x"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr


def test_stream_compiles_once_per_bucket(random_model):
    from dsjax.decoding import generate_stream

    cfg, variables = random_model
    model = dsjax.Transformer(cfg)
    batched = generate(model, variables, PROMPTS, LENGTHS, max_new_tokens=5, prompt_bucket=8)
    compiled = lambda: (gen_lib._stream_prefill._cache_size(), gen_lib._stream_step._cache_size())  # noqa: E731
    before = compiled()
    for b in range(3):  # prompt lengths 7, 3, 1: one 8-token bucket
        streamed = list(generate_stream(model, variables, PROMPTS[b, :LENGTHS[b]], max_new_tokens=5, prompt_bucket=8))
        assert streamed == list(np.asarray(batched.tokens[b])), b
        if b == 0:
            first = compiled()
            assert first[0] <= before[0] + 1 and first[1] <= before[1] + 1
    assert compiled() == first


def test_generate_is_called_as_the_readme_shows():
    """`dsjax.generate` is the function of README.md and DESIGN.md, on `model.init`'s output."""
    import dsjax

    cfg = dsjax.load_model_config("tiny")
    model = dsjax.Transformer(cfg.replace(attn_impl="absorb", moe_impl="ragged"))
    tokens = jnp.asarray([[5, 6, 7, 8], [9, 10, 0, 0]], jnp.int32)
    variables = model.init(jax.random.key(0), tokens)
    prompts, prompt_lengths, eos_id = tokens, jnp.asarray([4, 2], jnp.int32), cfg.eos_token_id
    gen = dsjax.generate(model, variables, prompts, prompt_lengths, max_new_tokens=32,
                         temperature=0.0, rng=None, speculative=False,
                         top_k=0, top_p=1.0, stop_tokens=(eos_id,))
    assert gen.tokens.shape == gen.logprobs.shape == (2, 32) and gen.lengths.shape == (2,)
    assert float(gen.tokens_per_forward) == 1.0  # no drafts without speculative=True
    logits = model.apply(variables, tokens).logits
    assert [int(gen.tokens[0, 0]), int(gen.tokens[1, 0])] == [int(logits[0, 3].argmax()), int(logits[1, 1].argmax())]


def test_cli_stream_leaves_out_trailing_whitespace(capsys):
    """`python -m eval generate` writes whitespace only once text follows it: a greedy run
    ending in spaces ends the line; multi-byte characters appear whole."""
    from eval.__main__ import _parser, show_stream

    decode = lambda ids: bytes(ids).decode("utf-8", errors="replace")  # noqa: E731
    pieces: list[str] = []
    tokens = list("ab  c".encode()) + list("é".encode()) + [32] * 40 + [1, 100]
    assert show_stream(iter(tokens), decode, (1,), pieces.append) == 40
    assert "".join(pieces) == "ab  cé\n"
    assert all("\ufffd" not in p for p in pieces)
    pieces.clear()
    assert show_stream(iter([32, 10, 32]), decode, (), pieces.append) == 3
    assert pieces == ["\n"]
    help_text = " ".join(_parser().format_help().split())
    assert "--max-new-tokens MAX_NEW_TOKENS tokens to sample per completion (default: generate 128" in help_text
