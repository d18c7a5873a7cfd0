"""`python -m train sft`: the loss covers response tokens only, packed examples never see
each other, runs start from another run's parameters and resume exactly, and bad data
exits 2 in one line."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsjax
from dsjax.checkpoint import restore_variables
from dsjax.tokenizer import ByteTokenizer
from train.__main__ import main
from train.config import build_config
from train.optim import make_optimizer
from train.stages import all_stages
from train.stages.sft import SFTConfig, pack, read_examples, window_batch
from train.steps import TrainState, make_train_step
from tests.test_train import SMALL

EXAMPLES = [("k1", "2+3=", "<a>5</a>"), ("k2", "hello ", "world"), ("k3", "12*4=", "48")]


def test_packing_masks_prompts_and_restarts_positions():
    tok = ByteTokenizer()
    packed = pack(EXAMPLES, tok, seq_len=32)
    assert len(packed) == 1 and packed.examples == 3  # 13 + 12 + 8 tokens fill one window of 33
    b = window_batch(packed.tokens, packed.segments, packed.loss)
    lengths = [len(p) + len(r) + 1 for _, p, r in EXAMPLES]
    starts = np.cumsum([0] + lengths[:-1])
    expected_mask = np.zeros(32, bool)
    expected_pos = np.zeros(32, int)
    for (_, p, r), s, n in zip(EXAMPLES, starts, lengths):
        # Targets t predict token t + 1: the response (and its EOS) of the same example.
        expected_mask[s + len(p) - 1:s + n - 1] = True
        expected_pos[s:s + n] = np.arange(n)[:min(n, 32 - s)]
        np.testing.assert_array_equal(b["segment_ids"][0, s:s + n], (list(starts).index(s) + 1))
    np.testing.assert_array_equal(b["mask"][0], expected_mask)
    np.testing.assert_array_equal(b["positions"][0, :sum(lengths)], expected_pos[:sum(lengths)])
    response = tok.decode(b["targets"][0][b["mask"][0]])
    assert response == "<a>5</a>" + "world" + "48"  # EOS tokens decode to nothing
    assert (b["targets"][0][b["mask"][0]] == tok.eos_id).sum() == 3
    with pytest.raises(ValueError, match="does not fit train.seq_len=8"):
        pack(EXAMPLES, tok, seq_len=8)
    assert pack(EXAMPLES, tok, seq_len=8, truncate=True).truncated == 2  # the third (8 tokens) fits


def test_packed_examples_do_not_see_each_other_and_loss_is_response_only():
    cfg = build_config("sft", SMALL, all_stages())
    model = dsjax.Transformer(cfg.model)
    tok = ByteTokenizer()
    b = window_batch(*(lambda p: (p.tokens, p.segments, p.loss))(pack(EXAMPLES, tok, seq_len=32)))
    boxed = model.init(jax.random.key(0), jnp.zeros((1, 32), jnp.int32))
    variables = dsjax.unbox(boxed)
    apply = jax.jit(model.apply)
    packed_logits = apply(variables, b["inputs"], b["positions"], b["segment_ids"]).logits[0]
    at, nll = 0, []
    for _, p, r in EXAMPLES:
        ids = np.concatenate([tok.encode(p), tok.encode(r), [tok.eos_id]])
        alone = apply(variables, jnp.asarray(ids[None, :-1])).logits[0]
        np.testing.assert_allclose(packed_logits[at:at + len(ids) - 1], alone, atol=1e-5)
        logp = jax.nn.log_softmax(alone)
        nll += [-float(logp[t, ids[t + 1]]) for t in range(len(p) - 1, len(ids) - 1)]
        at += len(ids)
    # The step's cross-entropy is the mean over response tokens only.
    tx, schedule = make_optimizer(cfg.train, boxed["params"])
    state = TrainState(jnp.zeros((), jnp.int32), variables["params"], tx.init(variables["params"]),
                       variables["moe_bias"])
    _, metrics = jax.jit(make_train_step(model, tx, cfg.train, schedule))(state, b)
    np.testing.assert_allclose(metrics["ce"], np.mean(nll), rtol=1e-5)


def test_messages_records_and_malformed_lines(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join([
        json.dumps({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                 {"role": "assistant", "content": "Hello."}]}),
        "{not json",
        json.dumps({"prompt": "p"}),
        json.dumps({"prompt": "q", "response": "r"}),
    ]) + "\n")
    examples, skipped = read_examples([str(path)], SFTConfig(strict=False))
    assert skipped == 2
    assert [(e.prompt, e.response) for e in examples] == [("System: Be brief.\nUser: Hi\nAssistant: ", "Hello."), ("q", "r")]
    with pytest.raises(ValueError, match=r"chat.jsonl:2: not valid JSON"):
        read_examples([str(path)], SFTConfig())


def _sft_jsonl(path, n=48):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"{i}+{i % 7}=", "response": f"<answer>{i + i % 7}</answer>"}) + "\n")
    return str(path)


def _args(stage, workdir, *extra):
    argv = [stage, "--workdir", str(workdir)]
    # Schedules that do not depend on train.steps: runs of 2 and 4 steps compile the same
    # programs, so the compilation cache serves the second.
    for o in SMALL + ["model.moe_impl=dense", "train.batch_size=8", "train.seq_len=64", "train.sample_tokens=0",
                      "train.eval_every=2", "train.checkpoint_every=2", "data.val_fraction=0.1",
                      "train.schedule=constant", "train.mtp_lambda_switch=1.0", "train.bias_update_stop=1.0"] + list(extra):
        argv += ["--set", o]
    return argv


def _losses(workdir):
    return [json.loads(line)["loss"] for line in open(os.path.join(workdir, "metrics.jsonl"))]


def test_sft_resumes_exactly_starts_from_a_run_and_refuses_bad_data(tmp_path, capsys):
    data = _sft_jsonl(tmp_path / "sft.jsonl")
    assert main(_args("sft", tmp_path / "full", "train.steps=4", f"data.source={data}")) == 0
    # Its step-2 checkpoint is what a run of 2 steps leaves: resumed, it redoes steps 3 and 4.
    shutil.copytree(tmp_path / "full", tmp_path / "part")
    shutil.rmtree(tmp_path / "part" / "checkpoints" / "4")
    assert main(_args("sft", tmp_path / "part", "train.steps=4", f"data.source={data}")) == 0
    assert "at step 2" in capsys.readouterr().out
    assert _losses(tmp_path / "full") == _losses(tmp_path / "part")
    records = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
    assert any("val_loss" in r for r in records)

    # --init: a new run starts from full's parameters. Its one step keeps them: the warmup
    # starts at learning rate 0 (and full's step program comes from the compilation cache).
    assert main(_args("sft", tmp_path / "init", "train.steps=1", f"data.source={data}")
                + ["--init", str(tmp_path / "full")]) == 0
    assert "init: parameters from" in capsys.readouterr().out
    target = jax.eval_shape(lambda: dsjax.unbox(dsjax.Transformer(build_config("sft", SMALL, all_stages()).model).init(
        jax.random.key(0), jnp.zeros((1, 8), jnp.int32))))
    target = {"params": target["params"], "moe_bias": target["moe_bias"]}
    start, step = restore_variables(str(tmp_path / "full" / "checkpoints"), target)
    after, _ = restore_variables(str(tmp_path / "init" / "checkpoints"), target)
    assert step == 4
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), after["params"], start["params"])

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "x", "answer": "y"}) + "\n")
    assert main(_args("sft", tmp_path / "bad", "train.steps=1", f"data.source={bad}")) == 2
    err = capsys.readouterr().err.strip()
    assert "bad.jsonl:1: record has neither 'prompt'/'response' nor a 'messages' list" in err and "\n" not in err
    assert not (tmp_path / "bad").exists()
    # A workdir holding another stage's run, or another model, is refused before anything is written.
    assert main(["grpo", "--workdir", str(tmp_path / "full")]) == 2
    assert "holds a sft run; use another workdir for grpo" in capsys.readouterr().err
    assert main(_args("sft", tmp_path / "full", "train.steps=5", f"data.source={data}",
                      "model.hidden_size=32")) == 2
    assert "holds a different model: model.hidden_size=32 (there: 64)" in capsys.readouterr().err
