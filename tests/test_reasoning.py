"""Reasoning evaluation, rejection sampling and distillation: the unbiased pass@k against a
brute-force count; majority vote with ties and unparseable answers; rejection sampling
keeps exactly the passing samples and its JSONL goes through `train sft`; `eval tasks`
at temperature 0 is greedy `dsjax.generate`; `train distill` with a KL to the teacher;
bad input exits 2 with one line."""

import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsjax
from dsjax.tokenizer import ByteTokenizer
from eval import reasoning as rs
from eval import tasks
from eval.__main__ import main as eval_main
from eval.completions import encode_prompts, prompt_width
from train.__main__ import main as train_main
from train.stages.sft import SFTConfig, pack, read_examples
from tests.test_train import SMALL


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6])
def test_pass_at_k_is_the_brute_force_count(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            samples = [True] * c + [False] * (n - c)
            subsets = list(itertools.combinations(samples, k))
            want = sum(any(s) for s in subsets) / len(subsets)
            assert rs.pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12), (n, c, k)
    with pytest.raises(ValueError):
        rs.pass_at_k(3, 4, 1)


def test_majority_vote_ties_and_unparseable_answers():
    assert rs.majority_vote(["7", "8", "8", None, None, None]) == "8"  # None never wins
    assert rs.majority_vote(["9", "7", "7", "9"]) == "9"  # a tie goes to the first seen
    assert rs.majority_vote([None, None]) is None
    assert rs.majority_vote([]) is None
    fields = {"answer": "7"}
    assert rs.vote_key("007", fields) == rs.vote_key("7", fields) == "7"
    assert rs.vote_key("seven", fields) is None and rs.vote_key(None, fields) is None
    assert rs.vote_key(" (1 + 2) * 3 ", {"numbers": [1, 2, 3], "target": 9}) == "(1+2)*3"


def _sample(problem, answer, tokens=10, tagged=True, truncated=False):
    text = f"<think>x</think><answer>{answer}</answer>" if tagged else f"the answer is {answer}"
    from eval import rewards

    return rs.Sample(problem=problem, text=text, tokens=tokens, truncated=truncated,
                     correct=bool(rewards.accuracy(problem.prompt, text, **problem.fields)),
                     well_formed=bool(rewards.format_reward(problem.prompt, text)), rewards={})


def test_report_and_rejection_sampling_keep_exactly_the_passing_samples(tmp_path):
    p, q = tasks.get("addition", 2).split("train", 2, seed=3)
    right_p, right_q = p.answer, q.answer
    groups = [
        [_sample(p, right_p, 12), _sample(p, "0" + right_p, 9), _sample(p, "1"), _sample(p, right_p, 12)],
        [_sample(q, "1"), _sample(q, "1"), _sample(q, right_q, tagged=False), _sample(q, right_q, 5, truncated=True)],
    ]
    out = rs.report(groups)
    assert out["pass@1"] == pytest.approx(4 / 8)  # the truncated-but-correct sample counts as correct
    assert out["pass@2"] == pytest.approx(np.mean([rs.pass_at_k(4, 3, 2), rs.pass_at_k(4, 1, 2)]))
    assert out["maj@4"] == pytest.approx(0.5)  # p: '012' and the two right ones vote together; q: '1' wins
    assert out["format_rate"] == pytest.approx(7 / 8) and out["max_len"] == 12

    kept = rs.accepted(groups, dedup=False)
    assert [(s.problem.key, s.text) for s in kept] == [(p.key, groups[0][i].text) for i in (0, 1, 3)]
    assert len(rs.accepted(groups)) == 2  # the repeated completion is dropped
    shortest = rs.accepted(groups, shortest=True)
    assert [s.tokens for s in shortest] == [9]

    path = str(tmp_path / "sft.jsonl")
    rs.write_sft(kept, path)
    examples, skipped = read_examples([path], SFTConfig())
    assert skipped == 0 and [(e[1], e[2]) for e in examples] == [(s.problem.prompt, s.text) for s in kept]
    packed = pack(examples, ByteTokenizer(), 128)
    assert packed.examples == 3 and packed.loss.any()


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """A tiny random DeepSeek-V3 checkpoint in the Hugging Face layout (bytes tokenizer)."""
    from train.config import build_config

    cfg = build_config(None, SMALL).model
    model = dsjax.Transformer(cfg)
    variables = dsjax.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    out = str(tmp_path_factory.mktemp("hf") / "hf")
    dsjax.save_pretrained(model, variables, out)
    return out, model, variables


def test_eval_tasks_at_temperature_0_is_greedy_generate(tmp_path, capsys, hf_model):
    hf, model, variables = hf_model
    out = tmp_path / "completions.jsonl"
    argv = ["tasks", "--hf", hf, "--tokenizer", "bytes", "--task", "addition:2", "--problems", "3",
            "--samples", "2", "--temperature", "0", "--max-new-tokens", "6", "--out", str(out)]
    assert eval_main(argv) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    for key in ("pass@1", "pass@2", "maj@2", "format_rate", "mean_len", "max_len", "tokens_per_s"):
        assert key in line, key
    records = [json.loads(r) for r in open(out)]
    assert len(records) == 6

    problems = tasks.get("addition", 2, template="r1").split("test", 3, seed=0)
    tok = ByteTokenizer()
    width = prompt_width(tok, [p.prompt for p in problems])
    ids, lengths = encode_prompts(tok, [p.prompt for p in problems], width)
    absorb = dsjax.Transformer(model.cfg.replace(attn_impl="absorb"))
    gen = dsjax.generate(absorb, variables, ids, lengths, 6, temperature=0.0, stop_tokens=(tok.eos_id,),
                                  prompt_bucket=width)
    want = []
    for row, n in enumerate(np.asarray(gen.lengths)):
        body = np.asarray(gen.tokens)[row, :n]
        want.append(tok.decode(body[:-1] if n and body[-1] == tok.eos_id else body))
    got = [r["completion"] for r in records]
    assert got == [w for w in want for _ in range(2)]  # two greedy samples of each problem


@pytest.mark.parametrize("argv, message", [
    (["tasks", "--task", "chess"], "unknown task 'chess'"),
    (["tasks", "--task", "addition", "--samples", "0"], "--samples and --problems must be at least 1"),
    (["reject", "--task", "addition"], "reject needs --out"),
])
def test_bad_eval_tasks_input_exits_2_with_one_line(capsys, argv, message, hf_model):
    hf, _, _ = hf_model
    assert eval_main(argv + ["--hf", hf, "--tokenizer", "bytes"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err


def test_eval_tasks_on_a_missing_checkpoint_exits_2(tmp_path, capsys):
    assert eval_main(["tasks", "--checkpoint", str(tmp_path / "nope"), "--task", "addition"]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a training workdir" in err and "\n" not in err, err


def _distill_args(workdir, *extra):
    argv = ["distill", "--workdir", str(workdir)]
    for o in SMALL + ["model.num_hidden_layers=1", "model.first_k_dense_replace=1", "model.num_nextn_predict_layers=0",
                      "train.steps=2", "train.batch_size=8", "train.seq_len=96", "train.sample_tokens=0", "train.eval_every=2"] + list(extra):
        argv += ["--set", o]
    return argv


def test_distill_trains_a_dense_student_with_a_kl_to_the_teacher(tmp_path, capsys, hf_model):
    hf, _, _ = hf_model
    data = tmp_path / "teacher.jsonl"
    with open(data, "w") as f:
        for p in tasks.get("addition", 2).split("train", 12, seed=0):
            f.write(json.dumps({"prompt": p.prompt, "response": p.solution}) + "\n")
    student = tmp_path / "student"
    assert train_main(_distill_args(student, f"distill.teacher_hf={hf}", f"distill.data={data}",
                                    "distill.kl_weight=0.5")) == 0
    records = [json.loads(r) for r in open(student / "metrics.jsonl")]
    assert all(np.isfinite(r["distill_kl"]) and r["distill_kl"] > 0 for r in records)
    assert "val_loss" in records[-1]

    # A random teacher solves nothing: rejection sampling keeps no sample, one line, status 2.
    capsys.readouterr()
    argv = _distill_args(tmp_path / "s2", f"distill.teacher_hf={hf}", "distill.task=addition:2",
                         "distill.problems=2", "distill.samples=2", "distill.max_new_tokens=4")
    assert train_main(argv) == 2
    err = capsys.readouterr().err.strip()  # the sampling progress bar, then one line
    assert "kept no sample" in err.splitlines()[-1] and "Traceback" not in err, err


def distill_step_setup():
    """A SMALL model's state, a fixed batch and the jitted distillation step (KL weight 1,
    the teacher inside the step), the router bias moving and no warmup: (model, variables,
    state, batch, step), step(state, teacher_variables, batch). One program for every test
    that uses it (the compilation cache loads it)."""
    from train.config import build_config
    from train.optim import make_optimizer
    from train.stages import all_stages
    from train.stages.distill import make_distill_step
    from train.steps import TrainState

    cfg = build_config(None, SMALL + ["train.bias_update_speed=0.01", "train.warmup_steps=0"], all_stages())
    model = dsjax.Transformer(cfg.model)
    boxed = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    variables = dsjax.unbox(boxed)
    tx, schedule = make_optimizer(cfg.train, boxed["params"])
    state = TrainState(jnp.zeros((), jnp.int32), variables["params"], tx.init(variables["params"]),
                       variables["moe_bias"])
    tokens = np.random.default_rng(0).integers(2, 250, (2, 9)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": np.ones((2, 8), bool)}
    step = jax.jit(make_distill_step(model, model, tx, cfg.train, schedule, kl_weight=1.0))
    return model, variables, state, batch, step


def test_distill_kl_is_zero_when_the_student_is_the_teacher():
    model, variables, state, batch, step = distill_step_setup()
    other = dsjax.unbox(model.init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32)))
    _, same = step(state, {"params": variables["params"], "moe_bias": variables["moe_bias"]}, batch)
    _, other = step(state, {"params": other["params"], "moe_bias": other["moe_bias"]}, batch)
    assert abs(float(same["distill_kl"])) < 1e-5 and float(other["distill_kl"]) > 1e-3
    # Everything else in the loss is the same: it differs by exactly the KL.
    assert float(other["loss"]) - float(same["loss"]) == pytest.approx(float(other["distill_kl"]), rel=1e-4)
