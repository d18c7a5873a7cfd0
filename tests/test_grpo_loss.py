"""GRPO's advantages and every loss variant against a plain numpy reference written with
loops (clip edges, epsilon_high, GSPO, masks, the three aggregations), the zero-gradient
and KL properties."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train.rl.loss import group_advantages, policy_loss


def ref_advantages(rewards, scale, eps=1e-4):
    rewards = np.asarray(rewards, np.float64)
    out = np.zeros_like(rewards)
    batch_std = np.sqrt(np.mean((rewards - rewards.mean()) ** 2))
    for p in range(rewards.shape[0]):
        mean = sum(rewards[p]) / len(rewards[p])
        std = np.sqrt(sum((r - mean) ** 2 for r in rewards[p]) / len(rewards[p]))
        for g in range(rewards.shape[1]):
            centered = rewards[p, g] - mean
            out[p, g] = {"group": centered / (std + eps), "batch": centered / (batch_std + eps),
                         "none": centered}[scale]
    return out


def ref_loss(logp, old, ref, adv, mask, eps_low, eps_high, beta, importance, agg, max_tokens):
    B, T = logp.shape
    per_tok = np.zeros((B, T))
    for b in range(B):
        n = mask[b].sum()
        seq_log_ratio = sum(logp[b, t] - old[b, t] for t in range(T) if mask[b, t]) / max(n, 1)
        for t in range(T):
            lr = seq_log_ratio if importance == "sequence" else logp[b, t] - old[b, t]
            r = np.exp(lr)
            r_clip = min(max(r, 1 - eps_low), 1 + eps_high)
            loss = -min(r * adv[b], r_clip * adv[b])
            if beta:
                d = ref[b, t] - logp[b, t]
                loss += beta * (np.exp(d) - d - 1)
            per_tok[b, t] = loss
    if agg == "seq-mean-token-mean":
        return np.mean([sum(per_tok[b, t] for t in range(T) if mask[b, t]) / max(mask[b].sum(), 1)
                        for b in range(B)])
    total = sum(per_tok[b, t] for b in range(B) for t in range(T) if mask[b, t])
    return total / max(mask.sum(), 1) if agg == "token-mean" else total / (B * max_tokens)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_match_reference(scale):
    rewards = np.array([[1, 0, 0, 1, 1.1], [0, 0, 0, 0, 0], [0.5, 2, -1, 0, 3]], np.float32)
    np.testing.assert_allclose(group_advantages(jnp.asarray(rewards), scale), ref_advantages(rewards, scale),
                               rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(group_advantages(jnp.asarray(rewards), scale))[1] == 0)  # equal rewards: no signal


def _batch(seed, B=6, T=9):
    rng = np.random.default_rng(seed)
    logp = rng.normal(-2, 1, (B, T)).astype(np.float32)
    # Ratios spread across both clip edges, and some exactly on them.
    old = (logp - rng.normal(0, 0.3, (B, T))).astype(np.float32)
    old[0, :3] = logp[0, :3] - np.log(0.8)   # ratio exactly 1 - 0.2
    old[1, :3] = logp[1, :3] - np.log(1.28)  # ratio exactly 1 + 0.28
    ref = (logp + rng.normal(0, 0.5, (B, T))).astype(np.float32)
    adv = rng.normal(0, 1, B).astype(np.float32)
    adv[2] = 0.0
    mask = rng.random((B, T)) < 0.7
    mask[3] = False  # a completion with no tokens
    mask[4, :] = True
    return logp, old, ref, adv, mask


@pytest.mark.parametrize("importance, agg, eps_high, beta", [
    (imp, agg, eh, beta) for imp, agg, eh, beta in itertools.product(
        ["token", "sequence"], ["seq-mean-token-mean", "token-mean", "dr_grpo"], [0.2, 0.28], [0.0, 0.04])])
def test_policy_loss_matches_reference(importance, agg, eps_high, beta):
    logp, old, ref, adv, mask = _batch(0)
    got, metrics = policy_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(ref), jnp.asarray(adv),
                               jnp.asarray(mask), epsilon=0.2, epsilon_high=eps_high, beta=beta,
                               importance=importance, loss_agg=agg, max_tokens=12)
    want = ref_loss(logp.astype(np.float64), old, ref, adv, mask, 0.2, eps_high, beta, importance, agg, 12)
    np.testing.assert_allclose(float(got), want, rtol=2e-5, atol=1e-6)
    ratio = np.exp(logp - old)
    if importance == "token":
        m = mask.astype(bool)
        low = ((ratio < 0.8) & (adv[:, None] < 0) & m).sum() / m.sum()
        high = ((ratio > 1 + eps_high) & (adv[:, None] > 0) & m).sum() / m.sum()
        np.testing.assert_allclose(metrics["clip_frac_low"], low, rtol=1e-6)
        np.testing.assert_allclose(metrics["clip_frac_high"], high, rtol=1e-6)


def test_gradient_matches_reference_and_clipped_tokens_carry_none():
    logp, old, ref, adv, mask = _batch(1)

    def loss(lp):
        return policy_loss(lp, jnp.asarray(old), jnp.asarray(ref), jnp.asarray(adv), jnp.asarray(mask),
                           epsilon=0.2, epsilon_high=0.28, beta=0.0)[0]

    grad = np.asarray(jax.grad(loss)(jnp.asarray(logp)))
    ratio = np.exp(logp - old)
    # Tokens clipped on the side that would push further carry no gradient.
    clipped = ((ratio > 1.28) & (adv[:, None] > 0)) | ((ratio < 0.8) & (adv[:, None] < 0))
    assert clipped.any() and np.all(grad[clipped] == 0)
    on_edge = np.isclose(ratio, 0.8, rtol=1e-5) | np.isclose(ratio, 1.28, rtol=1e-5)  # a tie: either side
    live = mask & ~clipped & ~on_edge & (adv[:, None] != 0)
    counts = np.maximum(mask.sum(1, keepdims=True), 1)
    expected = -ratio * adv[:, None] / counts / mask.shape[0]
    np.testing.assert_allclose(grad[live], expected[live], rtol=1e-5)
    assert np.all(grad[~mask] == 0)


def test_kl_is_nonnegative_and_zero_at_the_reference():
    logp, old, ref, adv, mask = _batch(2)
    _, m = policy_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(ref), jnp.asarray(adv), jnp.asarray(mask),
                       beta=0.1)
    assert float(m["kl"]) > 0
    _, m = policy_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(logp), jnp.asarray(adv), jnp.asarray(mask),
                       beta=0.1)
    assert float(m["kl"]) == 0.0
    deltas = jnp.linspace(-20, 20, 401)[None]
    _, m = policy_loss(jnp.zeros_like(deltas), jnp.zeros_like(deltas), deltas, jnp.zeros((1,)),
                       jnp.ones_like(deltas, bool), beta=1.0, loss_agg="token-mean")
    assert float(m["kl"]) >= 0


def test_equal_rewards_give_zero_policy_gradient():
    logp, old, ref, _, mask = _batch(3)
    rewards = jnp.ones((2, 3))  # every completion of both groups scored alike
    adv = group_advantages(rewards, "group").reshape(-1)
    grad = jax.grad(lambda lp: policy_loss(lp, jnp.asarray(old[:6]), None, adv, jnp.asarray(mask[:6]))[0])(
        jnp.asarray(logp[:6]))
    assert np.all(np.asarray(grad) == 0)


@pytest.mark.parametrize("importance", ["token", "sequence"])
def test_garbage_outside_the_mask_changes_nothing(importance):
    """Log-probs of +-1e4 and +-inf outside the mask (exp overflows there): the loss,
    metrics and gradient equal those with plain values there, all finite."""
    logp, old, ref, adv, mask = _batch(4)
    garbage = np.where(np.arange(logp.shape[1]) % 2 == 0, 1e4, -1e4).astype(np.float32)[None]
    garbage = np.broadcast_to(garbage, logp.shape).copy()
    garbage[5, :2] = [np.inf, -np.inf]
    mask[5, :2] = False

    def run(old, ref):
        def loss(lp):
            return policy_loss(lp, jnp.asarray(old), jnp.asarray(ref), jnp.asarray(adv), jnp.asarray(mask),
                               epsilon=0.2, epsilon_high=0.28, beta=0.04, importance=importance)
        (value, metrics), grad = jax.value_and_grad(loss, has_aux=True)(jnp.asarray(logp))
        return value, metrics, grad

    clean = run(old, ref)
    for bad_old, bad_ref in ((np.where(mask, old, garbage), ref), (old, np.where(mask, ref, -garbage)),
                             (np.where(mask, old, -garbage), np.where(mask, ref, garbage))):
        got = run(bad_old, bad_ref)
        assert np.isfinite(float(got[0])) and np.all(np.isfinite(np.asarray(got[2])))
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, clean)


def test_masked_mean_ignores_non_finite_values_outside_the_mask():
    """The metrics GRPO logs (entropy, rollout_logprob_diff) and the cross-entropy average
    with dsjax.losses.masked_mean: a NaN or an infinity at a masked-out position neither
    reaches the mean nor its gradient."""
    from dsjax.losses import masked_mean

    mask = jnp.array([[True, True, False, False]])
    clean = jnp.array([[1.0, 3.0, 0.0, 0.0]])
    dirty = jnp.array([[1.0, 3.0, jnp.nan, jnp.inf]])
    assert float(masked_mean(dirty, mask)) == float(masked_mean(clean, mask)) == 2.0
    grad = jax.grad(lambda v: masked_mean(v * 2.0, mask))(dirty)
    np.testing.assert_array_equal(np.asarray(grad), [[1.0, 1.0, 0.0, 0.0]])
