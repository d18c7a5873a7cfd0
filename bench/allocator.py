"""The training step and forward pass with XLA's buffers kept mapped between steps
(dsjax/cpu/allocator.py `keep_buffers`), with transparent huge pages for them instead
(`reexec`), and with neither: what `python -m train` sets for itself against a plain
process, each setting in its own child process, the settings alternated.

    python -m bench.allocator [--preset small] [--batch 8] [--seq-len 256] [--steps 6] [--rounds 2]

Each child builds `python -m train`'s step for the preset (MTP off, AdamW, the dispatch
`auto` picks, the state donated), compiles it, times --steps forward passes (logits) and
then --steps training steps, and prints the median milliseconds and the minor page faults
of each. The parent runs --rounds rounds of (kept, huge pages, plain), in turns so that
load on the machine falls on all alike, and prints one JSON line: the medians of each
setting over the rounds and the speedups of the first two (plain ms / their ms). Only
Linux with glibc 2.35 or later has the hugetlb tunable; elsewhere the line says so.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

if __package__ in (None, ""):  # run as a file, python bench/allocator.py: the repository's packages first
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import emit
from dsjax.cpu.allocator import KEEP_OPT_OUT, OPT_OUT, hugepage_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(preset: str, batch: int, seq_len: int, steps: int) -> dict:
    import jax

    from bench.profile_step import mtp_off_step
    from dsjax.cpu.allocator import keep_buffers

    keep_buffers()  # does nothing under DSJAX_KEEP_BUFFERS=0
    train, variables, data = mtp_off_step(preset, batch, seq_len)
    model, step = train.model, train.step
    forward = jax.jit(lambda v, t: model.apply(v, t).logits)

    def timed(fn):
        jax.block_until_ready(fn())  # compile and warm up
        jax.block_until_ready(fn())
        times, faults = [], resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(steps):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times.append(time.perf_counter() - start)
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps
        return statistics.median(times) * 1e3, faults

    def train_once():
        nonlocal state
        state, metrics = step(state, data)
        return metrics["loss"]

    forward_ms, forward_faults = timed(lambda: forward(variables, data["inputs"]))  # before the step donates them
    state = train.start(variables)
    train_ms, train_faults = timed(train_once)
    return {"train_ms": round(train_ms, 1), "forward_ms": round(forward_ms, 1),
            "train_faults": round(train_faults), "forward_faults": round(forward_faults)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=6, help="timed steps (and forward passes) per child")
    p.add_argument("--rounds", type=int, default=2, help="rounds of (kept, huge pages, plain) children")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        emit(child(args.preset, args.batch, args.seq_len, args.steps))
        return 0
    plain = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES" or "hugetlb" not in v}
    plain[OPT_OUT] = "0"
    plain[KEEP_OPT_OUT] = "0"
    kept = {k: v for k, v in plain.items() if k != KEEP_OPT_OUT}
    huge = hugepage_env({k: v for k, v in plain.items() if k != OPT_OUT})
    head = {"name": "allocator", "preset": args.preset, "batch": args.batch, "seq_len": args.seq_len}
    if huge is None:
        emit({**head, "skipped": "no glibc 2.35+ on Linux: the hugetlb tunable does not exist here"})
        return 0
    runs = {"kept": [], "hugepages": [], "plain": []}
    command = [sys.executable, "-m", "bench.allocator", "--child", "--preset", args.preset, "--batch",
               str(args.batch), "--seq-len", str(args.seq_len), "--steps", str(args.steps)]
    for r in range(args.rounds):
        for setting, env in (("kept", kept), ("hugepages", huge), ("plain", plain)):
            out = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
            if out.returncode:
                print(out.stderr[-2000:], file=sys.stderr)
                return 1
            runs[setting].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"[allocator] round {r + 1} {setting}: {runs[setting][-1]}", file=sys.stderr, flush=True)

    line = dict(head, rounds=args.rounds, steps=args.steps, tunable=huge["GLIBC_TUNABLES"])
    for key in ("train_ms", "forward_ms", "train_faults", "forward_faults"):
        for setting, results in runs.items():
            line[f"{setting}_{key}"] = statistics.median(r[key] for r in results)
    for setting in ("kept", "hugepages"):
        for key in ("train", "forward"):
            line[f"{setting}_{key}_speedup"] = round(line[f"plain_{key}_ms"] / line[f"{setting}_{key}_ms"], 3)
    emit(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
