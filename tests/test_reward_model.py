"""Reward model core: the scalar head read at each response's last token (padded and
packed rows) and the Bradley-Terry loss, against numpy."""

import jax
import jax.numpy as jnp
import numpy as np

import dsjax
from dsjax.reward_model import RewardModel, bradley_terry

CFG = dsjax.load_model_config("tiny").replace(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                               q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                                               qk_rope_head_dim=4, v_head_dim=8, intermediate_size=48,
                                               moe_intermediate_size=16, n_routed_experts=4, n_group=1,
                                               topk_group=1, num_experts_per_tok=2, vocab_size=64,
                                               num_nextn_predict_layers=0)


def _model():
    rm = RewardModel(CFG)
    tokens = jnp.zeros((1, 8), jnp.int32)
    variables = dsjax.unbox(rm.init(jax.random.key(0), tokens, jnp.zeros((1, 1), jnp.int32)))
    variables["params"]["score_bias"] = jnp.float32(0.3)
    return rm, variables


def test_parameters_are_the_language_models_plus_the_head():
    rm, variables = _model()
    lm = dsjax.unbox(dsjax.Transformer(CFG).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    assert set(variables["params"]) - set(lm["params"]) == {"score", "score_bias"}
    assert set(lm["params"]) <= set(variables["params"])


def test_score_is_read_at_the_last_token_of_each_response():
    rm, variables = _model()
    a = np.array([5, 9, 12, 7, 3], np.int32)
    b = np.array([8, 2, 30, 11], np.int32)
    # Padded: one response per row, padding after it.
    padded = np.zeros((2, 12), np.int32)
    padded[0, :5], padded[1, :4] = a, b
    last = np.array([[4], [3]], np.int32)
    scores = np.asarray(jax.jit(rm.apply)(variables, padded, last))
    h = np.asarray(rm.apply(variables, padded, method=RewardModel.trunk)[0], np.float64)
    w, bias = np.asarray(variables["params"]["score"], np.float64), 0.3
    np.testing.assert_allclose(scores[:, 0], [h[0, 4] @ w + bias, h[1, 3] @ w + bias], rtol=1e-5, atol=1e-6)
    # Packed: both in one row with their own segments and positions, plus an unused slot.
    packed = np.zeros((1, 12), np.int32)
    packed[0, :9] = np.concatenate([a, b])
    segments = np.array([[1] * 5 + [2] * 4 + [0] * 3], np.int32)
    positions = np.array([list(range(5)) + list(range(4)) + [0] * 3], np.int32)
    got = np.asarray(rm.apply(variables, packed, np.array([[4, 8, -1]], np.int32), positions, segments))
    np.testing.assert_allclose(got[0, :2], scores[:, 0], rtol=1e-5, atol=1e-5)
    assert got[0, 2] == 0.0


def test_bradley_terry_against_numpy():
    rng = np.random.default_rng(0)
    chosen, rejected = rng.normal(size=32).astype(np.float32), rng.normal(size=32).astype(np.float32)
    mask = rng.random(32) < 0.7
    loss, acc = bradley_terry(jnp.asarray(chosen), jnp.asarray(rejected), jnp.asarray(mask))
    margin = (chosen - rejected).astype(np.float64)[mask]
    np.testing.assert_allclose(loss, np.mean(-np.log(1 / (1 + np.exp(-margin)))), rtol=1e-6)
    np.testing.assert_allclose(acc, np.mean(margin > 0), rtol=1e-6)
    # Swapping the labels mirrors the loss around the margin: -log sigmoid(-m).
    swapped, _ = bradley_terry(jnp.asarray(rejected), jnp.asarray(chosen), jnp.asarray(mask))
    np.testing.assert_allclose(swapped, np.mean(-np.log(1 / (1 + np.exp(margin)))), rtol=1e-6)
