"""FP8 vs BF16 training quality: the same `python -m train` run (same seed, same data) in
BF16 and with DeepSeek-V3's FP8 recipe, then one JSON line with the final validation
losses, their relative difference (DeepSeek-V3 reports < 0.25%) and the step-time ratio
(FP8 time / BF16 time per step).

Each seed also gets a float32 run: `f32_vs_bf16` (the same comparison for float32
instead of FP8) is the benchmark's noise floor, the yardstick for `rel_loss_error`. In
short runs of a small MoE the final loss moves under *any* change of its arithmetic
(routing is discrete and load balancing has not settled), which is why the default is
the 800 steps of the default run (figures in docs/fp8.md).
With several `--seeds`, losses are averaged over the seeds and `bf16_seed_spread` is the
largest relative difference between two BF16 seeds.

A second measure with less noise: every run sees the same training batches in the same
order, each batch once, so the mean training cross-entropy over the last `--tail` steps
(`*_train_ce`) compares the runs on tail x batch x seq_len tokens they had not seen
before. Both measures also come as per-seed signed differences (FP8 - BF16) / BF16, with
their mean and standard error over the seeds.

The runs' losses differ for two reasons: FP8's arithmetic, and the different path
training takes from the first step on. To tell them apart, every BF16- and FP8-trained
checkpoint is also scored under the other forward pass (`python -m eval loss --set
model.precision=...`): `fp8_forward_rel_error` is the mean |FP8 - BF16| / BF16 over these
same-weights pairs, the loss error of the arithmetic alone (`fp8_forward_signed_mean`: its
bias), and `fp8_trained_in_bf16` pairs the FP8-trained weights, scored in BF16, with the
BF16 run (did FP8 training find other weights, or only compute differently?).

    python -m bench fp8_quality [-- --steps 800 --seeds 0,1,2 --tail N --workdir bench_fp8 --set key=value ...]
"""

import argparse
import json
import os
import subprocess
import sys
import time

if __package__ in (None, ""):  # run as a file, python bench/fp8_quality.py: the repository's packages first
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import emit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_sets(precision, seed, args):
    """The `--set`s of one benchmark run: `precision` is 'default' (BF16), 'fp8' or 'float32'."""
    dtype = "float32" if precision == "float32" else "bfloat16"
    precision = "default" if precision == "float32" else precision
    return [f"model.precision={precision}", f"model.dtype={dtype}", f"train.steps={args.steps}",
            f"train.seed={seed}", f"train.eval_every={args.steps}", f"train.eval_batches={args.eval_batches}",
            f"train.checkpoint_every={args.steps}", "train.sample_tokens=0", "train.log_every=1", *args.extra]


def read_run(workdir, args):
    """(final val_loss, mean tokens/s, mean training CE over the last args.tail steps, first-step loss)."""
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    val = [r["val_loss"] for r in records if "val_loss" in r][-1]
    speeds = [r["tokens_per_s"] for r in records if r.get("tokens_per_s")]
    tail = [r["ce"] for r in records if "ce" in r and r["step"] > args.steps - args.tail]
    if len(tail) < args.tail:
        sys.exit(f"error: {workdir}: {len(tail)} logged steps in the last {args.tail}; log every step")
    first = [r["loss"] for r in records if r["step"] == 1][0]
    return val, sum(speeds) / len(speeds), sum(tail) / len(tail), first


def run(workdir, precision, seed, args):
    cmd = [sys.executable, "-m", "train", "--workdir", workdir]
    for s in train_sets(precision, seed, args):
        cmd += ["--set", s]
    start = time.perf_counter()
    print(f"[fp8_quality] {workdir}: {args.steps} steps", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        sys.exit(done.stderr[-3000:])
    val, speed, ce, _ = read_run(workdir, args)
    print(f"[fp8_quality] {workdir}: val_loss {val:.5f}, train ce (last {args.tail}) {ce:.5f} "
          f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    return val, speed, ce


def paired(a, b):
    """Per-seed (a - b) / b, their mean and (with 2+ seeds) standard error of the mean."""
    d = [(x - y) / y for x, y in zip(a, b)]
    mean = sum(d) / len(d)
    out = {"per_seed": [round(x, 5) for x in d], "mean": round(mean, 5)}
    if len(d) > 1:
        var = sum((x - mean) ** 2 for x in d) / (len(d) - 1)
        out["stderr"] = round((var / len(d)) ** 0.5, 5)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, one BF16, FP8 and float32 run each")
    p.add_argument("--eval-batches", type=int, default=32, help="validation batches behind each final loss")
    p.add_argument("--tail", type=int, default=None,
                   help="training steps behind *_train_ce (default: the last quarter of --steps)")
    p.add_argument("--workdir", default="bench_fp8")
    p.add_argument("--set", dest="extra", action="append", default=[], help="key=value for both runs")
    args = p.parse_args()
    args.workdir = os.path.abspath(args.workdir)  # the runs start in the repository root
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        sys.exit(f"error: --seeds must be comma-separated integers, got {args.seeds!r}")
    if args.tail is None:
        args.tail = max(args.steps // 4, 1)
    if not 0 < args.tail <= args.steps:
        sys.exit(f"error: --tail must be in 1..--steps ({args.steps}), got {args.tail}")
    runs = {}
    for seed in seeds:
        for precision in ("default", "fp8", "float32"):
            workdir = os.path.join(args.workdir, f"{precision}_seed{seed}")
            if os.path.exists(workdir):
                sys.exit(f"error: {workdir} exists; remove it or pick another --workdir")
            runs[precision, seed] = run(workdir, precision, seed, args)
    mean = lambda xs: sum(xs) / len(xs)
    bf16 = [runs["default", s][0] for s in seeds]
    fp8 = [runs["fp8", s][0] for s in seeds]
    f32 = [runs["float32", s][0] for s in seeds]
    bf16_loss, fp8_loss, f32_loss = mean(bf16), mean(fp8), mean(f32)
    out = {"steps": args.steps, "seeds": seeds, "bf16_loss": round(bf16_loss, 5), "fp8_loss": round(fp8_loss, 5),
           "rel_loss_error": round(abs(fp8_loss - bf16_loss) / bf16_loss, 5),
           "f32_loss": round(f32_loss, 5), "f32_vs_bf16": round(abs(f32_loss - bf16_loss) / bf16_loss, 5),
           "step_time_ratio": round(mean([runs["default", s][1] for s in seeds]) /
                                    mean([runs["fp8", s][1] for s in seeds]), 3)}
    # Same weights, other forward pass: the BF16 runs scored in FP8 and the FP8 runs in BF16.
    from eval.loss import checkpoint_loss

    other = {}
    for (precision, seed) in [(p, s) for s in seeds for p in ("default", "fp8")]:
        flip = "fp8" if precision == "default" else "default"
        workdir = os.path.join(args.workdir, f"{precision}_seed{seed}")
        other[precision, seed] = checkpoint_loss(workdir, args.eval_batches, [f"model.precision={flip}"])["val_loss"]
        print(f"[fp8_quality] {workdir}: val_loss {other[precision, seed]:.5f} with model.precision={flip}",
              file=sys.stderr, flush=True)
    pairs = [(other["default", s], runs["default", s][0]) for s in seeds] + \
            [(runs["fp8", s][0], other["fp8", s]) for s in seeds]  # (FP8 forward, BF16 forward)
    fp8_in_bf16 = [other["fp8", s] for s in seeds]
    ce = {p: [runs[p, s][2] for s in seeds] for p in ("default", "fp8", "float32")}
    out.update({"tail_steps": args.tail, "bf16_train_ce": round(mean(ce["default"]), 5),
                "fp8_train_ce": round(mean(ce["fp8"]), 5), "f32_train_ce": round(mean(ce["float32"]), 5),
                "fp8_vs_bf16_val": paired(fp8, bf16), "fp8_vs_bf16_train_ce": paired(ce["fp8"], ce["default"]),
                "f32_vs_bf16_train_ce": paired(ce["float32"], ce["default"]),
                "fp8_forward_rel_error": round(mean([abs(a - b) / b for a, b in pairs]), 6),
                "fp8_forward_signed_mean": round(mean([(a - b) / b for a, b in pairs]), 6),
                "fp8_trained_in_bf16": paired(fp8_in_bf16, bf16)})
    if len(seeds) > 1:
        out["bf16_per_seed"] = [round(v, 5) for v in bf16]
        out["fp8_per_seed"] = [round(v, 5) for v in fp8]
        out["f32_per_seed"] = [round(v, 5) for v in f32]
        out["bf16_seed_spread"] = round((max(bf16) - min(bf16)) / bf16_loss, 5)
    if args.extra:
        out["set"] = args.extra
    emit(out)


if __name__ == "__main__":
    main()
