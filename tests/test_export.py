"""`python -m eval export`: a run directory becomes a Hugging Face folder that transformers
loads with its tokenizer (the same ids as dsjax's, logits within 1e-4), a reward model's
head beside it; `eval generate --chat` renders the tokenizer's template; bad input exits 2
in one line."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import dsjax
from dsjax.checkpoint import Checkpointer
from dsjax.reward_model import RewardModel, encode_responses
from dsjax.tokenizer import ByteTokenizer, HFTokenizer
from eval.__main__ import chat_prompt, error
from eval.__main__ import main as eval_main
from eval.export import REWARD_CONFIG, REWARD_HEAD
from tests.test_chat_template import ASSISTANT, BOS, CONVERSATIONS, USER, _tokenizer_dir
from tests.test_train import SMALL
from train.config import build_config
from train.stages import all_stages
from train.workdir import config_yaml

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TEXTS = ["def f(x):\n\treturn x + 1\n", "héllo wörld — 日本語, emoji 🎉, ∑ and \u00a0nbsp",
         "<｜begin▁of▁sentence｜> and <｜end▁of▁sentence｜> spelled out", ""]


def _workdir(path, stage, variables, *extra):
    """A run directory as `python -m train` leaves it: config.yaml and one checkpoint."""
    cfg = build_config(stage, SMALL + ["model.vocab_size=512"] + list(extra), all_stages())
    os.makedirs(path)
    (path / "config.yaml").write_text(config_yaml(cfg, stage))
    ckpt = Checkpointer(str(path / "checkpoints"))
    ckpt.save(3, {"params": variables["params"], "moe_bias": variables["moe_bias"]}, {"step": 3})
    ckpt.close()
    return str(path), cfg


def _perturbed(module, cfg, *inputs, seed=0):
    """Initialized variables with every leaf moved off its initial value (norms off 1,
    router bias off 0), so a misplaced tensor shows in the logits."""
    variables = dsjax.unbox(module(cfg.model).init(jax.random.key(seed), *inputs))
    leaves, tree = jax.tree.flatten(variables)
    rng = np.random.default_rng(seed)
    leaves = [jnp.asarray(np.asarray(x) + rng.normal(0, 0.1, np.shape(x)).astype(np.float32)) for x in leaves]
    return jax.tree.unflatten(tree, leaves)


def _export(capsys, workdir, out, *extra):
    assert eval_main(["export", "--checkpoint", workdir, "--out", str(out), *extra]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    base = tmp_path_factory.mktemp("lm")
    cfg = build_config("pretrain", SMALL + ["model.vocab_size=512"], all_stages())
    variables = _perturbed(dsjax.Transformer, cfg, jnp.zeros((1, 8), jnp.int32))
    workdir, _ = _workdir(base / "run", "pretrain", variables)
    return base, workdir


def test_export_loads_in_transformers_with_the_same_ids_and_logits(lm, capsys):
    base, workdir = lm
    out = base / "hf"
    summary = _export(capsys, workdir, out)
    assert summary["step"] == 3 and summary["stage"] == "pretrain"
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(summary["files"])
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["DeepseekV3ForCausalLM"] and config["model_type"] == "deepseek_v3"
    assert (config["bos_token_id"], config["eos_token_id"]) == (0, 1)

    tok = AutoTokenizer.from_pretrained(str(out))
    ours = ByteTokenizer()
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        assert ids == ours.encode(text).tolist(), text  # non-ASCII, and special-token text stays bytes
        assert tok.decode(ids) == text
    assert (tok.bos_token_id, tok.eos_token_id) == (ours.bos_id, ours.eos_id)
    assert HFTokenizer(str(out)).encode(TEXTS[1]).tolist() == ours.encode(TEXTS[1]).tolist()

    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = np.asarray([ours.encode(TEXTS[0] + TEXTS[1])[:48]], np.int32)
    model, variables, _ = dsjax.load_trained(workdir)
    want = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(ids)).logits)
    with torch.no_grad():
        got = hf(torch.from_numpy(ids).long()).logits.numpy()
    assert np.abs(got - want).max() <= 1e-4, np.abs(got - want).max()
    assert np.abs(want).max() > 0.1  # the comparison is not of near-zero logits
    # dsjax reads its export back, MTP module included.
    again, reread = dsjax.from_pretrained(str(out))
    assert again.cfg.num_nextn_predict_layers == 1
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), reread, variables)


def test_export_carries_the_chat_template(lm, tmp_path, capsys):
    base, _ = lm
    folder = _tokenizer_dir(tmp_path / "tok")
    cfg = build_config("pretrain", SMALL + ["model.vocab_size=512"], all_stages())
    variables = _perturbed(dsjax.Transformer, cfg, jnp.zeros((1, 8), jnp.int32), seed=1)
    workdir, _ = _workdir(tmp_path / "run", "sft", variables, f"data.tokenizer={folder}")
    out = tmp_path / "hf"
    _export(capsys, workdir, out)
    ours, theirs = HFTokenizer(folder), AutoTokenizer.from_pretrained(str(out))
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == ours.chat_template
    for chat in CONVERSATIONS:
        text = theirs.apply_chat_template(chat, tokenize=False)
        assert text == ours.apply_chat_template(chat)
        assert theirs(text, add_special_tokens=False)["input_ids"] == ours.encode(text).tolist()
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (ours.bos_id, ours.eos_id)

    # generate --chat continues the template's rendering of the prompt as a user message.
    rendered = chat_prompt(HFTokenizer(str(out)), "Hi there")
    assert rendered == f"{BOS}{USER}Hi there{ASSISTANT}"
    args = ["generate", "--hf", str(out), "--max-new-tokens", "4"]
    assert eval_main(args + ["--chat", "--prompt", "Hi there"]) == 0
    reply = capsys.readouterr().out
    assert eval_main(args + ["--prompt", rendered]) == 0
    assert capsys.readouterr().out == rendered + reply
    assert chat_prompt(ByteTokenizer(), "Hi") == "User: Hi\nAssistant: "  # no template: the plain SFT format


def test_reward_model_export_reproduces_the_score(tmp_path, capsys):
    cfg = build_config("rm", SMALL + ["model.vocab_size=512"], all_stages())
    variables = _perturbed(RewardModel, cfg, jnp.zeros((1, 8), jnp.int32), jnp.zeros((1, 1), jnp.int32))
    workdir, _ = _workdir(tmp_path / "rm", "rm", variables)
    out = tmp_path / "hf"
    summary = _export(capsys, workdir, out)
    assert {REWARD_HEAD, REWARD_CONFIG, "config.json", "tokenizer.json"} <= set(summary["files"])
    spec = json.loads((out / REWARD_CONFIG).read_text())
    assert spec["head"] == REWARD_HEAD and spec["eos_token_id"] == 1 and spec["step"] == 3
    head = load_file(str(out / REWARD_HEAD))
    assert head["score.weight"].shape == (1, cfg.model.hidden_size) and head["score.bias"].shape == (1,)

    tokens, last = encode_responses(ByteTokenizer(), ["2+3=", "Capital of France? "], ["5", "Paris"], width=32)
    rm, loaded, _ = dsjax.reward_model.load_reward_model(workdir)
    want = np.asarray(rm.apply(loaded, jnp.asarray(tokens), jnp.asarray(last)))[:, 0]
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        h = hf.model(torch.from_numpy(tokens).long()).last_hidden_state.numpy()
    got = h[np.arange(len(tokens)), last[:, 0]] @ head["score.weight"][0] + head["score.bias"][0]
    assert np.abs(got - want).max() <= 1e-4, (got, want)
    assert np.abs(want[0] - want[1]) > 1e-3


def test_bad_input_exits_2_with_one_line(lm, tmp_path, capsys):
    base, workdir = lm

    def fails(argv, message):
        assert eval_main(argv) == 2
        err = capsys.readouterr().err
        assert err == f"error: {message}\n", err

    # A run directory given where a Hugging Face folder is expected (was: "error: 2").
    fails(["generate", "--hf", workdir, "--prompt", "x"],
          f"--hf expects a Hugging Face folder (config.json and *.safetensors); {workdir} is a python -m train run "
          f"directory: use --checkpoint {workdir}")
    fails(["tasks", "--hf", str(tmp_path / "nope"), "--task", "addition"],
          f"--hf expects a Hugging Face folder (config.json and *.safetensors): {tmp_path / 'nope'} does not exist "
          "(for a python -m train run directory use --checkpoint WORKDIR)")
    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    (empty / "config.yaml").write_text((base / "run" / "config.yaml").read_text())
    fails(["export", "--checkpoint", str(empty), "--out", str(tmp_path / "o")],
          f"{empty / 'checkpoints'} holds no finished checkpoint")
    fails(["export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "o")],
          f"{tmp_path} is not a training workdir (no config.yaml)")
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    fails(["export", "--checkpoint", workdir, "--out", str(full)],
          f"--out {full} is not empty (add --overwrite to replace an export there)")
    fails(["export", "--hf", str(full), "--out", str(full)],
          "export needs --checkpoint WORKDIR (a python -m train run directory); a --hf folder is already in the "
          "Hugging Face format")
    # An OSError prints its message and file name, not its errno.
    (tmp_path / "file").write_text("")
    fails(["export", "--checkpoint", workdir, "--out", str(tmp_path / "file" / "hf")],
          f"Not a directory: {tmp_path / 'file' / 'hf'}")
    assert error(FileNotFoundError(2, "No such file or directory", "x.json")) == 2
    assert capsys.readouterr().err == "error: No such file or directory: x.json\n"
    # --overwrite replaces an export's files (a stale shard included) and keeps the others.
    (full / "model-00009-of-00009.safetensors").write_text("stale")
    _export(capsys, workdir, full, "--overwrite")
    assert (full / "notes.txt").read_text() == "mine" and not (full / "model-00009-of-00009.safetensors").exists()
