"""The memory plan against XLA:TPU's compiled programs, per preset and TPU slice.

    python -m bench tpu_compile                                   # every layout below
    python -m bench tpu_compile -- --presets small --topologies v5p:2x2x1
    python -m bench tpu_compile -- --presets deepseek-v3-671b --set model.remat_policy=full

Each layout runs `python -m train --dry-run --topology NAME` in its own process (the
command a user runs: the run's train step with its optimizer, compiled by libtpu for that
slice from this host, no TPU needed) and prints its JSON line with the layout, the plan
(`plan_gib`, train/plan.py), the compiled peak per chip (`compiled_gib`, argument +
output + temp - alias from `memory_analysis`), the chip's HBM, whether it fits, and the
wall time of the whole command (`wall_s`; `compile_s` is lowering and compiling alone).
Needs libtpu (`pip install "dsjax[tpu]"`); the V3 layout takes several minutes and tens of
GB of host memory to compile.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (preset, topology, --set items): the layouts docs/scaling.md tabulates.
LAYOUTS = (
    ("small", "v5p:2x2x1", ("mesh.fsdp=4", "train.batch_size=16", "train.seq_len=1024")),
    ("deepseek-v2-lite", "v5p:2x2x2", ("mesh.fsdp=8", "train.batch_size=16", "train.seq_len=4096",
                                       "model.dtype=bfloat16", "model.remat_policy=full")),
    ("deepseek-v2-lite", "v5e:2x4", ("mesh.fsdp=8", "train.batch_size=8", "train.seq_len=4096",
                                     "model.dtype=bfloat16", "model.remat_policy=full")),
    ("deepseek-v2-lite", "v5e:8x8", ("mesh.fsdp=64", "train.batch_size=64", "train.seq_len=4096",
                                     "model.dtype=bfloat16", "model.remat_policy=full")),
    ("deepseek-v3-671b", "v5p:8x8x8", ("mesh.fsdp=64", "mesh.expert=8", "train.batch_size=512",
                                       "train.seq_len=4096", "model.dtype=bfloat16")),
)


def run_layout(preset: str, topology: str, sets: tuple[str, ...], timeout: float) -> dict:
    """The dry run's JSON line for one layout, with `wall_s`, or {'error': ...}."""
    cmd = [sys.executable, "-m", "train", "--dry-run", "--topology", topology, "--set", f"model.preset={preset}"]
    for item in sets:
        cmd += ["--set", item]
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {timeout:.0f} s"}
    wall = time.perf_counter() - t0
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"status {done.returncode}: {tail[:300]}"}
    line = json.loads(lines[-1])
    line.pop("programs", None)
    return {**line, "wall_s": round(wall, 1), "status": done.returncode}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="", help="comma-separated presets to keep (default: all)")
    p.add_argument("--topologies", default="", help="comma-separated topologies to keep (default: all)")
    p.add_argument("--set", dest="sets", action="append", default=[], help="further --set items for every layout")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per layout")
    args = p.parse_args()
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        print('needs libtpu: pip install "dsjax[tpu]"', file=sys.stderr)
        return 2
    presets = set(filter(None, args.presets.split(",")))
    topologies = set(filter(None, args.topologies.split(",")))
    chosen = [(pr, tp, sets) for pr, tp, sets in LAYOUTS
              if (not presets or pr in presets) and (not topologies or tp in topologies)]
    if (presets or topologies) and not chosen:  # a layout not in the table: the defaults of its preset
        chosen = [(pr, tp, ()) for pr in presets or {"small"} for tp in topologies or {"v5p:2x2x1"}]
    for preset, topology, sets in chosen:
        result = run_layout(preset, topology, tuple(sets) + tuple(args.sets), args.timeout)
        print(json.dumps({"name": "tpu_compile", "preset": preset, "topology": topology,
                          "sets": list(sets) + args.sets, **result}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
