"""The GPU check of the FP8 recipe: FP8 vs BF16 train steps on this machine's first device.

Builds one model, compiles the full train step (bench.common.train_step: forward,
backward, AdamW, bias update) in BF16 and with `precision=fp8`, times `--steps` steps of each after a warm-up, and
prints one JSON line: backend and device, compile seconds, seconds per step, tokens/s,
the FP8 speed-up over BF16, both final losses (finite), each program's temporary memory,
and the GEMMs of the FP8 program that take E4M3 operands (`fp8_dots`: dot_general for the
linear layers, ragged_dot for the experts on GPUs/TPUs; CPUs lower ragged_dot to
dot_general). `--fp8-gemm auto` is native off the CPU (dsjax.fp8), so on a GPU
`fp8_lowered_to_f8_dots` must be true.

    python -m bench gpu_check [-- --preset small --batch 8 --seq 512 --moe-impl ragged --steps 10]
    python -m bench.gpu_check --preset tiny --batch 2 --seq 64 --steps 2   # on a CPU
"""

import argparse
import math
import os
import re
import sys
import time

if __package__ in (None, ""):  # run as a file, python bench/gpu_check.py: the repository's packages first
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax

from bench.common import emit, random_batch, run_config, train_step
from dsjax.fp8 import native_gemm

_FP8_GEMM = re.compile(r"(stablehlo\.dot_general|chlo\.ragged_dot).* : "
                       r"\(tensor<[^>]*xf8E4M3FN>, tensor<[^>]*xf8E4M3FN>")


def fp8_dots(text: str) -> dict:
    """GEMM ops with two E4M3 operands in StableHLO text, by kind."""
    found = [m.group(1).split(".")[1] for m in map(_FP8_GEMM.search, text.splitlines()) if m]
    return {kind: found.count(kind) for kind in ("dot_general", "ragged_dot")}


def time_steps(cfg, tcfg, batch, steps):
    """Compiles and times the train step of `cfg`: a dict of figures."""
    train = train_step(cfg, tcfg)
    state = train.start(train.init_variables())
    start = time.perf_counter()
    lowered = train.step.lower(state, batch)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    state, metrics = compiled(state, batch)  # warm-up
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    memory = compiled.memory_analysis()
    return {"compile_s": compile_s, "step_s": (time.perf_counter() - start) / steps, "loss": float(metrics["loss"]),
            "temp_mb": None if memory is None else memory.temp_size_in_bytes / 2**20,
            "fp8_dots": fp8_dots(lowered.as_text())}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--moe-impl", default="ragged", choices=("dense", "ragged"))
    p.add_argument("--fp8-gemm", default="auto", choices=("auto", "native", "emulated"))
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    run = run_config(args.preset, args.batch, args.seq, f"model.moe_impl={args.moe_impl}", "model.dtype=bfloat16",
                     f"model.fp8_gemm={args.fp8_gemm}", "train.steps=1000")
    cfg, tcfg = run.model, run.train
    batch = random_batch(cfg.vocab_size, args.batch, args.seq, 1)
    out = {"name": "gpu_check", "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
           "preset": args.preset, "batch": args.batch, "seq": args.seq, "moe_impl": args.moe_impl,
           "fp8_gemm": "native" if native_gemm(args.fp8_gemm) else "emulated", "steps": args.steps}
    runs = {}
    for name, precision in (("bf16", "default"), ("fp8", "fp8")):
        print(f"[gpu_check] {name}: compiling and timing {args.steps} steps", file=sys.stderr, flush=True)
        runs[name] = r = time_steps(cfg.replace(precision=precision), tcfg, batch, args.steps)
        out.update({f"{name}_compile_s": round(r["compile_s"], 2), f"{name}_step_s": round(r["step_s"], 5),
                    f"{name}_tokens_per_s": round(args.batch * args.seq / r["step_s"]),
                    f"{name}_loss": round(r["loss"], 4),
                    f"{name}_temp_mb": None if r["temp_mb"] is None else round(r["temp_mb"], 1)})
    out["fp8_speedup"] = round(runs["bf16"]["step_s"] / runs["fp8"]["step_s"], 3)
    out["losses_finite"] = all(math.isfinite(r["loss"]) for r in runs.values())
    dots = out["fp8_dots"] = runs["fp8"]["fp8_dots"]
    # Linear layers and experts both on E4M3 operands (a CPU lowers ragged_dot to dot_general).
    out["fp8_lowered_to_f8_dots"] = dots["dot_general"] > 0 and (
        dots["ragged_dot"] > 0 or args.moe_impl == "dense" or out["backend"] == "cpu")
    emit(out)


if __name__ == "__main__":
    main()
