"""The run's programs compiled by XLA:TPU (libtpu) for a v5p slice from this CPU host:
`python -m train --dry-run --topology v5p:2x2x1`, the path users take (train/aot.py,
sharding/topology.py). Tiny models and short sequences keep each compile to seconds.

Checked: the JSON line's keys; the compiled per-chip memory against train/plan.py's plan;
that the TPU programs hold none of the CPU wing's custom calls (`dsjax_*`) and do hold
the grouped GEMM XLA:TPU makes of `jax.lax.ragged_dot`; one-line errors with status 2 for
a bad topology and without libtpu. Skipped where libtpu is not installed."""

import json
import os

import pytest

from sharding.topology import have_libtpu

# libtpu takes a lock file per process; these only compile, so pytest-xdist's workers and
# the lead's other processes may load it side by side.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

needs_libtpu = pytest.mark.skipif(not have_libtpu(), reason='needs libtpu (pip install "dsjax[tpu]")')

# The plan against the compiled peak per chip, plan / compiled. At real sizes the plan is
# within 15% of XLA:TPU (small, V2-Lite and V3 in docs/scaling.md, `python -m bench
# tpu_compile`). tiny is another matter: its 16- to 64-wide head and expert dimensions
# are padded to XLA:TPU's (8, 128) tiles (2x to 8x), and buffers the plan does not count
# (per-op scratch, the grouped GEMM's metadata) are the same size as its few MB of state:
# the plan holds 0.3-0.5 of tiny's compiled peak. The band still fails when the plan
# loses a row (parameters, moments, activations: below 0.25) or counts one twice (above
# 1.15).
PLAN_BAND = (0.25, 1.15)

KEYS = {"topology", "device_kind", "chips", "mesh", "stage", "hbm_gib", "plan_gib", "compiled_gib",
        "plan_vs_compiled", "fits", "compile_s", "programs"}


def _dry_run(capsys, *args) -> tuple[int, dict | None, str]:
    """(status, the JSON line or None, stderr) of `python -m train ... --dry-run` in this process."""
    from train.__main__ import main

    status = main(["--dry-run", *args])
    out = capsys.readouterr()
    lines = [line for line in out.out.splitlines() if line.startswith("{")]
    return status, json.loads(lines[-1]) if lines else None, out.err


def _cpu_calls(program: dict) -> list[str]:
    return [name for name in program["custom_calls"] if name.startswith("dsjax_")]


@needs_libtpu
def test_tiny_train_step_compiles_for_a_v5p(capsys):
    status, line, err = _dry_run(capsys, "--topology", "v5p:2x2x1", "--set", "train.batch_size=8",
                                 "--set", "train.seq_len=64")
    assert status == 0, err
    assert KEYS <= set(line)
    assert line["topology"] == "v5p:2x2x1" and line["chips"] == 4 and "v5" in line["device_kind"].lower()
    assert line["hbm_gib"] == 95.0 and line["fits"] is True
    assert line["mesh"] == {"data": 1, "fsdp": 4, "expert": 1, "tensor": 1}
    step = line["programs"]["train_step"]
    # Donation: the state the step takes is the state it gives back (parameters, moments).
    assert step["alias_gib"] > 0.5 * step["argument_gib"]
    assert step["collectives"].get("all-gather", 0) > 0 and step["collectives"].get("reduce-scatter", 0) + \
        step["collectives"].get("all-reduce", 0) > 0
    assert not _cpu_calls(step), step["custom_calls"]
    assert any("ragged" in name or "megablox" in name or "gmm" in name for name in step["custom_calls"]), \
        step["custom_calls"]
    assert PLAN_BAND[0] <= line["plan_vs_compiled"] <= PLAN_BAND[1], line


@needs_libtpu
def test_tiny_grpo_update_and_rollout_compile_for_a_v5p(capsys):
    status, line, err = _dry_run(capsys, "grpo", "--topology", "v5p:2x2x1", "--set", "grpo.prompts_per_step=4",
                                 "--set", "grpo.group_size=2", "--set", "grpo.max_new_tokens=16")
    assert status == 0, err
    assert KEYS <= set(line) and line["stage"] == "grpo"
    assert line["batch_size"] == 4 * 2  # an update's rows: prompts x group
    update, rollout = line["programs"]["grpo_update"], line["programs"]["rollout"]
    for program in (update, rollout):
        assert not _cpu_calls(program), program["custom_calls"]
    assert any("ragged" in name or "megablox" in name or "gmm" in name for name in update["custom_calls"])
    # The rows (16 + 16 - 1 tokens) are padded to the splash kernel's block: no blockwise fallback.
    assert any(name.startswith("tpu_custom_call:splash_mha") for name in update["custom_calls"]), update
    assert line["seq_len"] % 128 == 0
    # The rollout runs with the optimizer state resident beside the parameters it reads.
    assert rollout["resident_gib"] > 0
    assert line["compiled_gib"] == max(p["peak_gib"] for p in line["programs"].values())
    assert PLAN_BAND[0] <= line["plan_vs_compiled"] <= PLAN_BAND[1], line


@needs_libtpu
def test_bad_topology_is_one_line_with_status_2(capsys):
    status, line, err = _dry_run(capsys, "--topology", "v5p:3x3x3x3")
    assert status == 2 and line is None
    assert err.startswith("error: unknown TPU topology 'v5p:3x3x3x3'") and len(err.strip().splitlines()) == 1
    status, _, err = _dry_run(capsys, "--topology", "v5p:2x2x1", "--set", "mesh.fsdp=3")
    assert status == 2 and "use 3 devices but 4 are present" in err and len(err.strip().splitlines()) == 1


def test_without_libtpu_the_dry_run_says_how_to_install_it(capsys, monkeypatch):
    import sharding.topology

    monkeypatch.setattr(sharding.topology, "have_libtpu", lambda: False)
    status, line, err = _dry_run(capsys, "--topology", "v5p:2x2x1")
    assert status == 2 and line is None
    assert 'pip install "dsjax[tpu]"' in err and len(err.strip().splitlines()) == 1


def test_hbm_per_chip_from_the_device_kind():
    from types import SimpleNamespace

    from sharding.topology import hbm_gib

    for kind, gib in (("TPU v4", 32), ("TPU v5 lite", 16), ("TPU v5p", 95), ("TPU v6 lite", 32)):
        assert hbm_gib(SimpleNamespace(device_kind=kind)) == gib
    with pytest.raises(ValueError, match="no HBM size known"):
        hbm_gib(SimpleNamespace(device_kind="TPU v9 imaginary"))
