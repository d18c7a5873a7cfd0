"""`python -m train rm`: a reward model learns a stated preference from generated pairs,
learns the opposite one from swapped labels, and resumes exactly."""

import json
import os

import jax
import numpy as np
import pytest

import dsjax
from dsjax.checkpoint import restore_variables
from dsjax.reward_model import RewardModel, load_reward_model
from dsjax.tokenizer import ByteTokenizer
from eval import rewards
from train.__main__ import main
from train.config import build_config
from train.stages import all_stages
from train.stages.rm import encode_pairs
from tests.test_train import SMALL

RAMBLE = ["well, let me think about it for a while", "hmm, it could be many things really",
          "that is a hard one, maybe later", "numbers are tricky, I would rather not say"]


def _pairs(path, n=160, swap=False):
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for i in range(n):
            a, b = rng.integers(0, 50, 2)
            good, bad = f"<answer>{a + b}</answer>", RAMBLE[i % len(RAMBLE)]
            if swap:
                good, bad = bad, good
            f.write(json.dumps({"prompt": f"{a}+{b}=", "chosen": good, "rejected": bad}) + "\n")
    return str(path)


def _overrides(*extra):
    return SMALL + ["model.moe_impl=dense", "train.batch_size=8", "train.seq_len=64", "train.lr=3e-3",
                    "train.schedule=constant", "train.eval_every=50", "train.checkpoint_every=50",
                    "data.val_fraction=0.2", "train.mtp_lambda_switch=1.0", "train.bias_update_stop=1.0"] + list(extra)


def _run(workdir, data, *extra):
    argv = ["rm", "--workdir", str(workdir)]
    for o in _overrides(f"data.source={data}", *extra):
        argv += ["--set", o]
    return main(argv)


def _records(workdir):
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def _score(workdir, prompt, response):
    cfg = build_config("rm", _overrides(), all_stages())
    rm = RewardModel(cfg.model)
    abstract = dsjax.unbox(jax.eval_shape(rm.init, jax.random.key(0), np.zeros((1, 64), np.int32)))
    variables, _ = restore_variables(os.path.join(workdir, "checkpoints"),
                                     {"params": abstract["params"], "moe_bias": abstract["moe_bias"]})
    enc = encode_pairs([(prompt, response, response)], ByteTokenizer(), 64)
    return float(rm.apply(variables, enc["tokens"][:, 0], enc["last"][:, :1])[0, 0])


def test_reward_model_learns_the_stated_preference_and_its_opposite(tmp_path):
    for name, swap in (("rm", False), ("swapped", True)):
        assert _run(tmp_path / name, _pairs(tmp_path / f"{name}.jsonl", swap=swap), "train.steps=40") == 0
        final = [r for r in _records(tmp_path / name) if "val_accuracy" in r][-1]
        assert final["val_accuracy"] >= 0.9, (name, final)
    digits, ramble = "<answer>61</answer>", "I would rather think about it for a while"
    assert _score(tmp_path / "rm", "17+44=", digits) > _score(tmp_path / "rm", "17+44=", ramble)
    assert _score(tmp_path / "swapped", "17+44=", digits) < _score(tmp_path / "swapped", "17+44=", ramble)

    # As a run's batch reward (train/rl/rewards.py), scored in batches on the device: the
    # same scores as the model called directly, mixed with a rule-based reward.
    from train.rl.rewards import reward_model_scorer

    scorer = reward_model_scorer(str(tmp_path / "rm"), batch_size=4)
    prompts = ["17+44=", "3+4=", "20+20=", "1+2=", "9+9="]
    texts = [digits, ramble, "<answer>40</answer>", RAMBLE[0], "<answer>18</answer>"]
    fields = [{"answer": 61}, {"answer": 7}, {"answer": 40}, {"answer": 3}, {"answer": 18}]
    mixed = rewards.combine("prefers_digits:0.5,format:1", {"prefers_digits": scorer})
    totals, parts = mixed.batch(prompts, texts, fields)
    direct = [_score(tmp_path / "rm", p, t) for p, t in zip(prompts, texts)]
    np.testing.assert_allclose(parts["prefers_digits"], direct, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(totals, 0.5 * np.asarray(direct) + parts["format"], rtol=1e-4, atol=1e-5)
    assert mixed(prompts[0], texts[0])[1]["prefers_digits"] == pytest.approx(direct[0], rel=1e-4, abs=1e-5)
    with pytest.raises(ValueError, match="is not a training workdir"):
        reward_model_scorer(str(tmp_path / "missing"))

    # The library reads the run directory as what it holds, without knowing which stage
    # wrote it: a reward model (backbone and head); not a language model (no output head).
    rm, variables, run = load_reward_model(str(tmp_path / "rm"))
    assert isinstance(rm, RewardModel) and {"score", "score_bias"} <= set(variables["params"])
    enc = encode_pairs([("17+44=", digits, digits)], ByteTokenizer(), 64)
    assert float(rm.apply(variables, enc["tokens"][:, 0], enc["last"][:, :1])[0, 0]) == pytest.approx(
        _score(tmp_path / "rm", "17+44=", digits), rel=1e-5, abs=1e-6)
    with pytest.raises(FileNotFoundError, match="holds no .*a checkpoint of another model"):
        dsjax.load_trained(str(tmp_path / "rm"))


def test_reward_model_resumes_exactly_and_refuses_bad_pairs(tmp_path):
    data = _pairs(tmp_path / "pairs.jsonl", n=48)
    assert _run(tmp_path / "full", data, "train.steps=4", "train.log_every=1") == 0
    assert _run(tmp_path / "part", data, "train.steps=2", "train.log_every=1", "train.checkpoint_every=2") == 0
    assert _run(tmp_path / "part", data, "train.steps=4", "train.log_every=1", "train.checkpoint_every=2") == 0
    full, part = _records(tmp_path / "full"), _records(tmp_path / "part")
    np.testing.assert_allclose([r["loss"] for r in part if "loss" in r], [r["loss"] for r in full if "loss" in r],
                               rtol=1e-5)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "chosen": "2"}\n')
    assert _run(tmp_path / "bad", str(bad), "train.steps=1") == 2


def test_reward_model_starts_from_a_language_model_workdir(tmp_path):
    # A language model's workdir as `python -m train` leaves it (config.yaml and a
    # checkpoint of parameters and router bias), written here directly.
    from dsjax.checkpoint import Checkpointer
    from train.workdir import config_yaml

    cfg = build_config("pretrain", _overrides())
    lm = dsjax.unbox(dsjax.Transformer(cfg.model).init(jax.random.key(7), np.zeros((1, 8), np.int32)))
    os.makedirs(tmp_path / "lm")
    (tmp_path / "lm" / "config.yaml").write_text(config_yaml(cfg, "pretrain"))
    ckpt = Checkpointer(str(tmp_path / "lm" / "checkpoints"))
    ckpt.save(5, {"params": lm["params"], "moe_bias": lm["moe_bias"]}, {"step": 5})
    ckpt.close()

    data = _pairs(tmp_path / "pairs.jsonl", n=48)
    assert _run(tmp_path / "rm", data, "train.steps=1", f"init.workdir={tmp_path / 'lm'}") == 0
    rm = RewardModel(cfg.model)
    abstract = dsjax.unbox(jax.eval_shape(rm.init, jax.random.key(0), np.zeros((1, 64), np.int32)))
    got, _ = restore_variables(os.path.join(tmp_path, "rm", "checkpoints"),
                               {"params": abstract["params"], "moe_bias": abstract["moe_bias"]})
    # The reward model's backbone is the language model's parameters after one AdamW step
    # (at most lr 3e-3 away; a fresh initialization would differ by about 0.02); only the
    # head is new
    # (and the LM's MTP module, which a reward model does not use, is left out).
    flat_lm = dict(jax.tree_util.tree_leaves_with_path(lm["params"]))
    flat_rm = dict(jax.tree_util.tree_leaves_with_path(got["params"]))
    new = {jax.tree_util.keystr(p) for p in set(flat_rm) - set(flat_lm)}
    assert new == {"['score']", "['score_bias']"}, new
    backbone = set(flat_rm) & set(flat_lm)
    assert {jax.tree_util.keystr(p).split("]")[0] for p in set(flat_lm) - backbone} == {"['mtp_0'"}
    for path in backbone:
        assert np.abs(np.asarray(flat_rm[path]) - np.asarray(flat_lm[path])).max() <= 3e-3 * 1.01, path
