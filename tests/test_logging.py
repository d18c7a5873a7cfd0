"""Every run mirrors metrics.jsonl to TensorBoard event files (WORKDIR/tensorboard/) and,
with `logging.wandb=true`, to Weights & Biases: the same scalars at the same steps, for
every stage, and a resumed run shows no point twice past its restored step."""

import importlib.machinery
import json
import os
import shutil
import struct
import sys
import types

import numpy as np
from tensorboardX.proto import event_pb2

from train.__main__ import main
from train.config import LoggingConfig
from train.report import TENSORBOARD, MetricsLog
from tests.test_sft import _args as _sft_args
from tests.test_sft import _sft_jsonl
from tests.test_train import SMALL

# Schedules that do not depend on train.steps, so runs of 2 and 4 steps compile the same programs.
FAST = SMALL + ["model.moe_impl=dense", "train.batch_size=8", "train.steps=4", "train.checkpoint_every=2",
                "train.eval_every=2", "train.sample_tokens=0", "train.schedule=constant", "train.mtp_lambda_switch=1.0",
                "train.bias_update_stop=1.0"]


def _pretrain(workdir, *extra):
    argv = ["pretrain", "--workdir", str(workdir)]
    for o in FAST + list(extra):
        argv += ["--set", o]
    return main(argv)


def _records(workdir):
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def _expected(workdir):
    """{name: [(step, value)]} of every number in metrics.jsonl."""
    out = {}
    for rec in _records(workdir):
        for name, value in rec.items():
            if name != "step":
                out.setdefault(name, []).append((rec["step"], value))
    return out


def _events(path):
    """The Event protos of one TFRecord file: [length u64][crc u32][data][crc u32] each."""
    data, i, out = open(path, "rb").read(), 0, []
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i:i + 8])
        out.append(event_pb2.Event.FromString(data[i + 12:i + 12 + n]))
        i += 12 + n + 4
    return out


def _event_files(workdir):
    logdir = os.path.join(workdir, TENSORBOARD)
    return [os.path.join(logdir, f) for f in sorted(os.listdir(logdir)) if ".tfevents." in f]


def _tensorboard_view(workdir, purge=True):
    """{tag: [(step, value)]} as TensorBoard shows the run: the event files in order, a
    SessionLog START at step s dropping the points already read at steps >= s."""
    points = {}
    for path in _event_files(workdir):
        for ev in _events(path):
            if purge and ev.HasField("session_log") and ev.session_log.status == event_pb2.SessionLog.START:
                points = {tag: [(s, v) for s, v in p if s < ev.step] for tag, p in points.items()}
            for value in ev.summary.value:
                points.setdefault(value.tag, []).append((ev.step, value.simple_value))
    return points


def _assert_same_scalars(view, expected):
    assert sorted(view) == sorted(expected)
    for tag, points in expected.items():
        assert [s for s, _ in view[tag]] == [s for s, _ in points], tag
        np.testing.assert_allclose([v for _, v in view[tag]], np.float32([v for _, v in points]), rtol=1e-6,
                                   err_msg=tag)


def test_pretrain_event_files_hold_the_metrics_and_a_resume_shows_no_point_twice(tmp_path, capsys):
    full = tmp_path / "full"
    assert _pretrain(full) == 0
    expected = _expected(full)
    assert {"loss", "lr", "grad_norm", "val_loss"} <= set(expected)
    assert [s for s, _ in expected["loss"]] == [1, 2, 3, 4]
    _assert_same_scalars(_tensorboard_view(full), expected)
    assert len(_event_files(full)) == 1

    # Restarted from the step-2 checkpoint: steps 3 and 4 are logged again. The new file opens
    # with a purge marker at step 3, so TensorBoard shows each step once, the new run's.
    shutil.rmtree(full / "checkpoints" / "4")
    assert _pretrain(full) == 0
    assert "at step 2" in capsys.readouterr().out
    resumed = _event_files(full)
    assert len(resumed) == 2
    marks = [ev.step for ev in _events(resumed[1]) if ev.HasField("session_log")]
    assert marks == [3]
    raw = _tensorboard_view(full, purge=False)
    assert [s for s, _ in raw["loss"]] == [1, 2, 3, 4, 3, 4]  # both attempts are in the files
    again = _expected(full)
    assert [s for s, _ in again["loss"]] == [1, 2, 3, 4]
    _assert_same_scalars(_tensorboard_view(full), again)


def test_sft_mirrors_to_tensorboard_and_wandb(tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)

    class Run:
        def log(self, data, step):
            calls.append(("log", dict(data), step))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return Run()

    fake.init = init
    monkeypatch.setitem(sys.modules, "wandb", fake)
    data = _sft_jsonl(tmp_path / "sft.jsonl")
    workdir = tmp_path / "sft_run"
    assert main(_sft_args("sft", workdir, "train.steps=2", f"data.source={data}", "logging.wandb=true",
                          "logging.wandb_project=proj")) == 0
    expected = _expected(workdir)
    assert {"loss", "val_loss"} <= set(expected)
    _assert_same_scalars(_tensorboard_view(workdir), expected)

    assert calls[0][0] == "init" and calls[-1] == ("finish",)
    kwargs = calls[0][1]
    assert kwargs["project"] == "proj" and kwargs["name"] == "sft_run" and kwargs["entity"] is None
    assert kwargs["config"]["sft"] and kwargs["config"]["train"]["steps"] == 2
    logged = [c for c in calls if c[0] == "log"]
    assert [step for _, _, step in logged] == [r["step"] for r in _records(workdir)]
    for (_, scalars, _), rec in zip(logged, _records(workdir)):
        assert scalars == {k: v for k, v in rec.items() if k != "step"}


def test_wandb_without_the_package_exits_2_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not importable, whether installed or not
    assert main(["--workdir", str(tmp_path / "run"), "--set", "logging.wandb=true"]) == 2
    err = capsys.readouterr().err
    assert err == "error: logging.wandb=true needs the wandb package: pip install wandb\n"
    assert not (tmp_path / "run").exists()


def test_tensorboard_off_writes_metrics_only(tmp_path):
    log = MetricsLog(str(tmp_path), None, LoggingConfig(tensorboard=False))
    log.write({"step": 1, "loss": 2.0})
    log.close()
    assert os.listdir(tmp_path) == ["metrics.jsonl"]
    # On: a fresh run's file opens with a purge marker at step 0, so a killed attempt's points
    # from before its first checkpoint are not shown either.
    log = MetricsLog(str(tmp_path), None, LoggingConfig())
    log.write({"step": 1, "loss": 3.0, "reward/accuracy": 0.5})
    log.close()
    (path,) = _event_files(tmp_path)
    assert [ev.step for ev in _events(path) if ev.HasField("session_log")] == [0]
    assert _tensorboard_view(tmp_path) == {"loss": [(1, 3.0)], "reward/accuracy": [(1, 0.5)]}
    assert _records(tmp_path) == [{"step": 1, "loss": 3.0, "reward/accuracy": 0.5}]
