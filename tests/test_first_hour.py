"""What surprised a new user in their first hour (issue 41): a sequence longer than the
model's context, errors as errnos, key typos, a Hugging Face folder given to --init, a data
folder with no file matching the pattern, and a resumed run whose schedule changes under it.
Each is refused (or explained) before any training starts."""

import dataclasses
import json
import os

import numpy as np
import pytest

from dsjax.config import ConfigError
from dsjax.data import DataConfig, source_files
from tests.test_train import SMALL
from train.__main__ import main, os_error_message
from train.config import TrainConfig, build_config, model_context
from train.loop import _schedule_moves
from train.stages import all_stages

FAST = SMALL + ["model.moe_impl=dense", "train.batch_size=8", "train.eval_every=100", "train.sample_tokens=0", "train.warmup_steps=1",
                "train.checkpoint_every=100"]


def _one_line_error(capsys, argv, status=2) -> str:
    assert main(argv) == status
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def _train(workdir, *overrides):
    argv = ["--workdir", str(workdir)]
    for o in FAST + list(overrides):
        argv += ["--set", o]
    return argv


# --------------------------------------------------------------------- train.seq_len
def test_a_sequence_longer_than_the_context_exits_2_before_anything_runs(capsys, tmp_path):
    for stage in ("pretrain", "sft", "rm", "distill"):  # every stage's run config goes through the check
        with pytest.raises(ConfigError, match="train.seq_len=4096 is longer than the model's context"):
            build_config(stage, ["train.seq_len=4096"], all_stages())
    assert build_config("pretrain", ["train.seq_len=2048"]).train.seq_len == 2048  # the context itself is fine
    err = _one_line_error(capsys, ["--workdir", str(tmp_path / "wd"), "--set", "train.seq_len=4096"])
    assert err == ("error: train.seq_len=4096 is longer than the model's context of 2048 tokens "
                   "(model.max_position_embeddings); set train.seq_len <= 2048, or give the model a longer "
                   "context (model.max_position_embeddings, model.rope_scaling)")
    assert not (tmp_path / "wd").exists()


def test_yarn_scaling_extends_the_context_the_sequence_may_fill():
    yarn = ["model.max_position_embeddings=4096",
            "model.rope_scaling={type: yarn, factor: 4, original_max_position_embeddings: 4096}"]
    cfg = build_config("pretrain", yarn + ["train.seq_len=16384"])
    assert model_context(cfg.model)[0] == 16384
    with pytest.raises(ConfigError) as e:
        build_config("pretrain", yarn + ["train.seq_len=16385"])
    assert "context of 16384 tokens (YaRN: model.rope_scaling factor 4 x original_max_position_embeddings 4096)" \
        in str(e.value)


# --------------------------------------------------------------------- errors
def test_os_errors_print_the_file_and_the_reason_not_an_errno(capsys, tmp_path):
    assert os_error_message(FileNotFoundError(2)) == "No such file or directory"
    assert os_error_message(PermissionError(13, "Permission denied", "/x/y")) == "/x/y: Permission denied"
    err = _one_line_error(capsys, ["--config", str(tmp_path)])
    assert err == f"error: {tmp_path}: Is a directory"
    afile = tmp_path / "afile"
    afile.write_text("")
    err = _one_line_error(capsys, _train(afile / "run"))
    assert err == f"error: --workdir {afile / 'run'} cannot be created: {afile} is a file"


def test_a_key_typo_suggests_the_nearest_key(capsys, tmp_path):
    err = _one_line_error(capsys, ["--set", "train.stpes=5"])
    assert err == "error: unknown config key train.stpes; did you mean train.steps?"
    err = _one_line_error(capsys, ["--set", "trian.steps=5"])
    assert err.endswith("unknown config section 'trian' in --set trian.steps; did you mean train.steps?")
    err = _one_line_error(capsys, ["--set", "model.prest=small"])
    assert err.endswith("did you mean model.preset?")
    err = _one_line_error(capsys, ["--set", "train.zzzz=1"])
    assert err == "error: unknown config key train.zzzz (python -m train --help lists every key)"
    config = tmp_path / "run.yaml"
    config.write_text("train:\n  stpes: 5\n")
    assert _one_line_error(capsys, ["--config", str(config)]) == \
        f"error: {config}: unknown config key train.stpes; did you mean train.steps?"
    config.write_text("trainn:\n  steps: 5\n")
    assert _one_line_error(capsys, ["--config", str(config)]) == \
        f"error: {config}: unknown config section 'trainn'; did you mean train?"


def test_init_given_a_hugging_face_folder_says_to_use_init_hf(capsys, tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "deepseek_v3"}))
    (hf / "model.safetensors").write_bytes(b"")
    err = _one_line_error(capsys, ["sft", "--init", str(hf), "--workdir", str(tmp_path / "wd")])
    assert err == (f"error: init.workdir: {hf} is a Hugging Face directory (config.json and *.safetensors), "
                   f"not a training workdir: start from it with --set init.hf={hf}")
    (hf / "model.safetensors").unlink()  # config.json alone is no model directory
    assert "is not a training workdir (no config.yaml)" in _one_line_error(capsys, ["--init", str(hf)])


def test_a_data_folder_without_matching_files_names_the_pattern(capsys, tmp_path):
    folder = tmp_path / "texts"
    (folder / "more").mkdir(parents=True)
    for name in ("a.txt", "b.txt", "more/c.txt", "notes.md"):
        (folder / name).write_text("hello world\n" * 50)
    with pytest.raises(FileNotFoundError) as e:
        source_files(DataConfig(source=str(folder)))
    assert str(e.value) == (f"data.source: the folder {folder} holds no files matching '*.py' (data.file_pattern); "
                            f"it holds 3 *.txt, 1 *.md; --set data.file_pattern='*.txt' takes the *.txt files")
    assert len(source_files(DataConfig(source=str(folder), file_pattern="*.txt"))) == 3
    with pytest.raises(FileNotFoundError, match=r"holds no files matching '\*.jsonl'; it holds 3"):
        source_files(DataConfig(source=str(folder), file_pattern="*.jsonl"), pattern_key="")
    # One folder of several with no match is named too (it used to be skipped in silence).
    with pytest.raises(FileNotFoundError, match=f"the folder {folder / 'more'} holds no files matching"):
        source_files(DataConfig(source=f"{folder / 'notes.md'},{folder / 'more'}", file_pattern="*.md"))
    err = _one_line_error(capsys, _train(tmp_path / "wd", f"data.source={folder}", "train.steps=1"))
    assert "holds no files matching '*.py' (data.file_pattern)" in err


# --------------------------------------------------------------------- resuming
def test_which_schedule_a_change_moves():
    cosine = TrainConfig(steps=500, lr=3e-3, warmup_steps=50)
    longer = dataclasses.replace(cosine, steps=1000)
    assert _schedule_moves(cosine, longer, 500) == "learning rate at step 500: 0.0003 -> 0.00176"
    flat = TrainConfig(steps=3, schedule="constant", warmup_steps=1)
    longer = dataclasses.replace(flat, steps=400)
    assert _schedule_moves(flat, longer, 3) == "MTP loss weight at step 3: 0.1 -> 0.3"  # switch at 0.7 x steps
    assert _schedule_moves(flat, longer, 3, followed=("lr", "bias")) == "router-bias speed at step 3: 0 -> 0.001"
    assert _schedule_moves(flat, longer, 3, followed=("lr",)) == ""  # a stage that follows the rate only
    assert _schedule_moves(flat, dataclasses.replace(flat, lr=1e-3), 3, followed=("lr",)).startswith(
        "learning rate at step 3: 0.003 -> 0.001")


def _lrs(workdir):
    return {r["step"]: r["lr"] for r in map(json.loads, open(workdir / "metrics.jsonl")) if "lr" in r}


def test_changing_the_schedule_of_a_run_is_refused_unless_allowed(capsys, tmp_path):
    wd = tmp_path / "wd"
    assert main(_train(wd, "train.steps=3")) == 0
    out = capsys.readouterr().out
    assert "compiling the pretrain step for" in out and "the first step includes XLA's compilation" in out
    config = (wd / "config.yaml").read_text()
    lr_at_3 = _lrs(wd)[3]

    # Raising train.steps on the finished cosine run would raise its learning rate again.
    err = _one_line_error(capsys, _train(wd, "train.steps=6"))
    assert err.startswith(f"error: --workdir {wd} holds a run at step 3: train.steps 3 -> 6 changes its schedule "
                          f"(learning rate at step 3: "), err
    assert err.endswith("add --set train.allow_schedule_change=true to go on with the new schedule, or use "
                        "another workdir")
    assert (wd / "config.yaml").read_text() == config and sorted(_lrs(wd)) == [1, 2, 3]  # nothing rewritten

    assert main(_train(wd, "train.steps=6", "train.allow_schedule_change=true")) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("resuming at step 3"))
    assert line.startswith("resuming at step 3 with train.steps 3 -> 6: the schedule changes (learning rate at "
                           "step 3: "), line
    assert sorted(_lrs(wd)) == [1, 2, 3, 4, 5, 6] and _lrs(wd)[3] == lr_at_3
    assert "steps: 6" in (wd / "config.yaml").read_text()

    # Lowering it below the checkpoint trains nothing and rewrites nothing.
    config = (wd / "config.yaml").read_text()
    assert main(_train(wd, "train.steps=4")) == 0
    assert "already trained to step 6 (train.steps=4); nothing to do" in capsys.readouterr().out
    assert (wd / "config.yaml").read_text() == config


def test_a_change_that_leaves_the_schedule_of_the_remaining_steps_alone_goes_on_with_a_note(capsys, tmp_path):
    flat = ["train.schedule=constant", "train.mtp_lambda_switch=1.0", "train.bias_update_stop=1.0"]
    wd = tmp_path / "wd"
    assert main(_train(wd, "train.steps=2", *flat)) == 0
    capsys.readouterr()
    assert main(_train(wd, "train.steps=3", *flat)) == 0
    out = capsys.readouterr().out
    assert "resuming at step 2 with train.steps 2 -> 3: the schedule from step 2 on is unchanged" in out
    lrs = _lrs(wd)
    assert sorted(lrs) == [1, 2, 3] and np.isclose(lrs[2], lrs[3])
