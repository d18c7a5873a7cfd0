"""The GRPO stage as `python -m train grpo` builds it, on the findings of an audit: the
learning-rate and bias schedules count GRPO steps (not optimizer updates), garbage
log-probabilities at positions outside the mask never reach the loss or its gradient, a
prompt file may not name a field after the reward call's own arguments, and an empty
answer earns no format reward."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train.stages.grpo
from dsjax.checkpoint import load_trained
from eval import tasks
from train.__main__ import main
from train.config import build_config
from train.optim import lr_schedule
from train.stages import all_stages
from tests.test_grpo import _grpo_args, _records


def test_schedules_count_grpo_steps_whatever_mu_and_minibatches(tmp_path):
    """mu=2 x minibatches=2: four updates a step. The logged lr of every step is the
    schedule (warmup 2, then cosine) at that GRPO step, and bias_update_stop=0.5 of 4
    steps stops the router bias after GRPO step 2 (0-based 1), not after 2 updates."""
    schedule = ["train.steps=4", "train.warmup_steps=2", "train.schedule=cosine", "train.lr=1e-3",
                "train.bias_update_stop=0.5", "train.bias_update_speed=0.01", "grpo.moe_bias=update",
                "train.keep_checkpoints=5", "train.eval_every=100"]
    argv = _grpo_args(tmp_path, "grpo.mu=2", "grpo.minibatches=2", "grpo.dynamic_sampling=false", *schedule)
    assert main(argv) == 0
    tcfg = build_config("grpo", [argv[i + 1] for i in range(3, len(argv), 2)], all_stages()).train
    expected = lr_schedule(tcfg)
    trained = [r for r in _records(tmp_path) if "lr" in r]
    assert [r["step"] for r in trained] == [1, 2, 3, 4]
    for r in trained:  # record `step` s logs GRPO step s - 1 (0-based)
        assert r["skipped"] == 0
        np.testing.assert_allclose(r["lr"], float(expected(r["step"] - 1)), rtol=1e-6, err_msg=str(r["step"]))
    assert trained[0]["lr"] == 0 and trained[2]["lr"] == pytest.approx(1e-3)  # warmup ends at GRPO step 2

    def bias(step):
        _, variables, _ = load_trained(str(tmp_path), step)
        return np.asarray(variables["moe_bias"]["moe_layers"]["ffn"]["gate"]["bias"])

    biases = [bias(s) for s in (1, 2, 3, 4)]
    assert np.any(biases[1] != biases[0])  # GRPO step 1 still moves the bias
    np.testing.assert_array_equal(biases[2], biases[1])  # steps 2 and 3 do not
    np.testing.assert_array_equal(biases[3], biases[1])


def test_huge_log_probs_outside_the_mask_leave_the_update_finite(tmp_path, monkeypatch):
    """The stage's reference and rollout-policy log-probs (grpo.beta > 0, mu=2) replaced by
    +-1e4 at every position outside the completion mask: exp of them overflows, yet no
    update is skipped and the loss, KL and gradient norm stay finite."""
    make_score = train.stages.grpo.make_score

    def garbage_outside_the_mask(model, temperature, rules=()):
        score = make_score(model, temperature, rules)

        def scored(params, moe_bias, batch):
            logp = score(params, moe_bias, batch)
            sign = jnp.where(jnp.arange(logp.shape[1]) % 2 == 0, 1.0, -1.0)  # old: -1e4, ref: +1e4, alike
            return jnp.where(batch["mask"], logp, 1e4 * sign)

        return scored

    monkeypatch.setattr(train.stages.grpo, "make_score", garbage_outside_the_mask)
    argv = _grpo_args(tmp_path, "grpo.mu=2", "grpo.beta=0.05", "grpo.dynamic_sampling=false", "train.steps=2",
                      "train.eval_every=100", "train.sample_tokens=0")
    assert main(argv) == 0
    trained = [r for r in _records(tmp_path) if "loss" in r]
    assert len(trained) == 2
    for r in trained:
        assert r["skipped"] == 0, r
        for key in ("loss", "grad_norm", "kl", "pg_loss"):
            assert np.isfinite(r[key]), (key, r)


@pytest.mark.parametrize("field", ["completion", "max_tokens"])
def test_a_prompt_field_named_like_a_reward_argument_exits_2_with_one_line(tmp_path, capsys, field):
    prompts = tmp_path / "p.jsonl"
    lines = [{"prompt": "Q: hi? A: "}, {"prompt": "Q: yo? A: ", field: "x"}]
    prompts.write_text("".join(json.dumps(row) + "\n" for row in lines))
    source = f"grpo.sources=[{{task: addition}}, {{name: chat, prompts: {prompts}, rewards: 'format:1'}}]"
    assert main(_grpo_args(tmp_path / "wd", source, "train.steps=1")) == 2
    err = capsys.readouterr().err.strip()
    assert f"{prompts}:2: field '{field}'" in err and "\n" not in err and "Traceback" not in err, err
    assert not (tmp_path / "wd" / "config.yaml").exists()


def test_an_empty_answer_earns_no_format_reward_in_the_stage_scores():
    """The stage's rewards (grpo defaults: accuracy + format on addition) on completions
    with empty, blank and real answers: only the real one is well formed."""
    from eval.completions import Completions
    from train.rl.rewards import RewardSet

    g = build_config("grpo", ["grpo.rewards=accuracy:1,format:0.1"], all_stages()).grpo
    sources = g.resolved_sources()
    problem = tasks.get("addition", 1).split("train", 1)[0]
    texts = ["<think></think><answer></answer>", "<think>x</think><answer> </answer>",
             f"<think>x</think><answer>{problem.answer}</answer>"]
    comp = Completions(tokens=np.zeros((3, 4), np.int32), logprobs=np.zeros((3, 4), np.float32),
                       lengths=np.full(3, 4, np.int32), texts=texts, truncated=np.zeros(3, bool))
    scores = RewardSet.load(g, sources).score(np.zeros(3, np.int64), [problem] * 3, comp)
    np.testing.assert_array_equal(scores.format, [0, 0, 1])
    np.testing.assert_array_equal(scores.parts["format"], [0, 0, 1])
    np.testing.assert_allclose(scores.reward, [0, 0, 1.1], rtol=1e-6)


def test_updates_per_step_divides_the_update_count_in_every_schedule():
    """make_optimizer's schedule and train.steps.schedules' gamma at update u are the step
    schedules at u // updates_per_step; fewer than one update a step is refused."""
    import dsjax
    from train.optim import make_optimizer
    from train.steps import schedules

    cfg = build_config("grpo", ["train.steps=10", "train.warmup_steps=2", "train.schedule=cosine",
                                "train.bias_update_stop=0.5", "train.bias_update_speed=0.01"], all_stages())
    model = dsjax.Transformer(cfg.model)
    boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    step_lr, (_, step_gamma) = lr_schedule(cfg.train), schedules(cfg.train)
    _, lr = make_optimizer(cfg.train, boxed["params"], updates_per_step=3)
    _, gamma = schedules(cfg.train, updates_per_step=3)
    for u in range(30):
        assert float(lr(u)) == float(step_lr(u // 3)), u
        assert float(gamma(u)) == float(step_gamma(u // 3)), u
    assert float(gamma(14)) == pytest.approx(0.01) and float(gamma(15)) == 0.0  # stops at step 5 = update 15
    with pytest.raises(ValueError, match="updates_per_step=0 must be at least 1"):
        make_optimizer(cfg.train, boxed["params"], updates_per_step=0)
    with pytest.raises(ValueError, match="updates_per_step=0 must be at least 1"):
        schedules(cfg.train, updates_per_step=0)
