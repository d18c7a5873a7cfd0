"""FP8 vs BF16 training quality: the same `python -m train` run (same seed, same data) in
BF16 and with DeepSeek-V3's FP8 recipe, then one JSON line with the final validation
losses, their relative difference (DeepSeek-V3 reports < 0.25%) and the step-time ratio.

    python bench/fp8_quality.py [--steps 300] [--workdir bench_fp8] [--set key=value ...]
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(workdir, precision, steps, extra):
    sets = [f"model.precision={precision}", "model.dtype=bfloat16", f"train.steps={steps}",
            f"train.eval_every={steps}", f"train.checkpoint_every={steps}", "train.sample_tokens=0",
            "train.log_every=10", *extra]
    cmd = [sys.executable, "-m", "train", "--workdir", workdir]
    for s in sets:
        cmd += ["--set", s]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        sys.exit(done.stderr[-3000:])
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    val = [r["val_loss"] for r in records if "val_loss" in r][-1]
    train = [r["ce"] for r in records if "ce" in r]
    speeds = [r["tokens_per_s"] for r in records if r.get("tokens_per_s")]
    return val, sum(train[-5:]) / len(train[-5:]), sum(speeds) / len(speeds)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--workdir", default="bench_fp8")
    p.add_argument("--set", dest="extra", action="append", default=[])
    args = p.parse_args()
    out = {}
    for precision in ("default", "fp8"):
        workdir = os.path.join(args.workdir, precision)
        if os.path.exists(workdir):
            sys.exit(f"error: {workdir} exists; remove it or pick another --workdir")
        out[precision] = run(workdir, precision, args.steps, args.extra)
    (bf16_val, bf16_train, bf16_speed), (fp8_val, fp8_train, fp8_speed) = out["default"], out["fp8"]
    print(json.dumps({
        "steps": args.steps, "bf16_loss": round(bf16_val, 5), "fp8_loss": round(fp8_val, 5),
        "rel_loss_error": round(abs(fp8_val - bf16_val) / bf16_val, 5),
        "bf16_train_loss_last_50": round(bf16_train, 5), "fp8_train_loss_last_50": round(fp8_train, 5),
        "step_time_ratio": round(bf16_speed / fp8_speed, 3),
    }))


if __name__ == "__main__":
    main()
