"""Two `python -m train` processes (gloo CPU collectives, fsdp across them) give the loss
curve of one process with the same global batch; checkpoints move between 2 and 1 process;
when one process dies the other stops with one line."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import xla_flags
from tests.test_train import ROOT, SMALL

# Schedules that do not depend on train.steps, so a run can stop at 4 and resume to 8.
COMMON = SMALL + ["train.schedule=constant", "train.mtp_lambda_switch=1.0", "train.bias_update_stop=1.0",
                  "train.checkpoint_every=4", "train.sample_tokens=0", "train.eval_every=4"]


def _cmd(workdir, steps):
    cmd = [sys.executable, "-m", "train", "--workdir", str(workdir)]
    for o in COMMON + [f"train.steps={steps}"]:
        cmd += ["--set", o]
    return cmd


def _env(devices):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = xla_flags(devices)
    return env


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two(workdir, steps):
    port = _free_port()
    procs = [subprocess.Popen(_cmd(workdir, steps) + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                                                      "--process-id", str(i)],
                              cwd=ROOT, env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return outs[0]


def run_one(workdir, steps):
    done = subprocess.run(_cmd(workdir, steps), cwd=ROOT, env=_env(2), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _curve(workdir):
    recs = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return np.array([r["loss"] for r in recs if "loss" in r]), [r["val_loss"] for r in recs if "val_loss" in r]


def _logged_steps(workdir):
    """The last step in metrics.jsonl (0 while there is none, or while a line is half written)."""
    try:
        return max((json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))), default=0)
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def _kill_one_after(procs, workdir, step) -> str:
    """Waits until the two processes have logged `step`, kills the second, and checks the
    first stops with one line and status 1 (within 120 s); returns its output."""
    deadline = time.time() + 400
    while time.time() < deadline and procs[0].poll() is None and _logged_steps(workdir) < step:
        time.sleep(0.1)
    if _logged_steps(workdir) < step:
        for p in procs:
            p.kill()
        pytest.fail(f"the two-process run did not reach step {step}: " + procs[0].communicate()[0][-3000:])
    procs[1].kill()
    killed = time.time()
    out = procs[0].communicate(timeout=240)[0]
    procs[1].wait()
    said = "\n".join(line for line in out.splitlines() if not re.match(r"^([EFWI]\d{4} |\s+@ )", line))
    assert procs[0].returncode == 1 and time.time() - killed < 120, (procs[0].returncode, said[-3000:])
    last = out.strip().splitlines()[-1]
    assert "another process of this run stopped" in last and "Traceback" not in out, out[-3000:]
    return out


def test_two_processes_match_one_checkpoints_cross_over_and_a_dead_peer_stops_the_other(tmp_path):
    # One process to step 8 is the reference. Two processes run steps 1-4 and hand over to
    # one process; one process's steps 1-4 hand over to two. Every loss and both
    # validation losses match the reference, so two processes match one on every step.
    run_one(tmp_path / "one", 8)
    one, one_val = _curve(tmp_path / "one")
    assert len(one) == 8 and len(one_val) == 2

    run_two(tmp_path / "two_then_one", 4)  # saved by 2 processes ...
    two_first, two_val = _curve(tmp_path / "two_then_one")
    np.testing.assert_allclose(two_first, one[:4], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(two_val, one_val[:1], rtol=1e-5)
    out = run_one(tmp_path / "two_then_one", 8)  # ... restored by 1
    assert "resumed from" in out and "at step 4" in out
    np.testing.assert_allclose(_curve(tmp_path / "two_then_one")[0], one, rtol=1e-5, atol=1e-5)

    # The reference's step-4 checkpoint is what one process running steps 1-4 leaves. Two
    # processes resume it and run on past step 9 until one of them is killed: the other,
    # in a training step's collectives, stops with one line. (No checkpoint falls in that
    # window: a peer dying while the other waits in one of orbax's barriers is seen only by
    # jax.distributed's heartbeat, which aborts the process after heartbeat_timeout_seconds.)
    workdir = tmp_path / "one_then_two"
    shutil.copytree(tmp_path / "one", workdir)
    shutil.rmtree(workdir / "checkpoints" / "8")
    port = _free_port()
    procs = [subprocess.Popen(_cmd(workdir, 400) + ["--set", "train.checkpoint_every=1000",
                                                    "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                                                    "--process-id", str(i)],
                              cwd=ROOT, env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    out = _kill_one_after(procs, workdir, 10)
    assert "resumed from" in out and "at step 4" in out
    curve, val = _curve(workdir)
    np.testing.assert_allclose(curve[:8], one, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(val[:2], one_val, rtol=1e-5)


# GRPO: prompts x completions that split over 2 devices, two updates per rollout (rows stay
# on the device that decoded them), dynamic sampling (kept groups move between devices),
# and a reward with spread on a random model (language), so the losses are not all 0.
GRPO = SMALL + ["model.moe_impl=dense", "train.schedule=constant", "train.sample_tokens=0", "train.eval_every=3",
                "train.checkpoint_every=3", "grpo.prompts_per_step=4", "grpo.group_size=4", "grpo.max_new_tokens=8",
                "grpo.eval_problems=4", "grpo.train_problems=20", "grpo.rewards=accuracy:1,format:0.1,language:1",
                "grpo.dynamic_sampling=true", "grpo.minibatches=2", "grpo.beta=0.01"]
GRPO_KEYS = ("reward_mean", "reward_std", "frac_reward_zero_std", "completion_len", "reward/language", "loss", "kl",
             "grad_norm", "entropy", "rollout_logprob_diff")


def _grpo_cmd(workdir, steps, *extra):
    cmd = [sys.executable, "-m", "train", "grpo", "--workdir", str(workdir)]
    for o in GRPO + [f"train.steps={steps}"] + list(extra):
        cmd += ["--set", o]
    return cmd


def _grpo_two(workdir, steps, *extra):
    port = _free_port()
    return [subprocess.Popen(_grpo_cmd(workdir, steps, *extra) + ["--coordinator", f"127.0.0.1:{port}",
                                                                  "--num-processes", "2", "--process-id", str(i)],
                             cwd=ROOT, env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(2)]


def _grpo_records(workdir):
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def _grpo_close(got, want, steps, keys=GRPO_KEYS + ("test_accuracy", "test_completion_len")):
    by_step = {r["step"]: r for r in want}
    for r in got:
        if r["step"] in steps:
            for key in keys:
                assert (key in r) == (key in by_step[r["step"]]), (r["step"], key)
                if key in r:
                    np.testing.assert_allclose(r[key], by_step[r["step"]][key], rtol=1e-4, atol=1e-4,
                                               err_msg=f"step {r['step']} {key}")


def test_grpo_on_two_processes_matches_one_resumes_and_a_dead_peer_stops_the_other(tmp_path):
    # Three `python -m train grpo` runs of cold processes (each compiles the rollout,
    # update, scoring and evaluation programs; the cache is shared): one process with 2
    # devices for 5 steps is the reference; two processes with 1 device each for 3 steps log
    # the same rewards, losses and held-out figures (the rows each process decodes, scores
    # and trains on are those of its device in the one-process run, and sampling does not
    # depend on which process decodes a row).
    done = subprocess.run(_grpo_cmd(tmp_path / "one", 5), cwd=ROOT, env=_env(2), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    one = _grpo_records(tmp_path / "one")
    assert [r["step"] for r in one] == [0, 1, 2, 3, 4, 5] and one[3]["reward_std"] > 0 and one[3]["loss"] != 0
    assert any(r.get("sampling_rounds", 1) > 1 and r["frac_reward_zero_std"] not in (0, 1) for r in one[1:])

    workdir = tmp_path / "two"
    procs = _grpo_two(workdir, 3)
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    two = _grpo_records(workdir)
    assert [r["step"] for r in two] == [0, 1, 2, 3]
    _grpo_close(two, one, steps={0, 1, 2, 3})

    # The two processes resume their step-3 checkpoint (steps 4 and 5 as the reference's)
    # and run on until one of them is killed: the other stops with one line.
    procs = _grpo_two(workdir, 400, "train.checkpoint_every=1000", "train.eval_every=1000")
    out = _kill_one_after(procs, workdir, 6)
    assert "resumed from" in out and "at step 3" in out
    _grpo_close(_grpo_records(workdir), one, steps={4, 5}, keys=GRPO_KEYS)
