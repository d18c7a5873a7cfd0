"""FP8 ablations (docs/fp8.md's table): one run of `bench/fp8_quality.py`'s FP8 training (same
settings, seed and data) with part of the recipe swapped out, then one JSON line with its
final validation loss, the mean training CE over the last `--tail` steps and the
first-step loss. Compare with the BF16 and FP8 runs of the same seed from fp8_quality.

Variants (each linear layer's and expert's product, forward and backward):
  forward_only       the FP8 product's value with the BF16 product's gradient
                     (first-step loss within 1e-3 of FP8's: BF16 rounding)
  backward_only      the BF16 product's value with the FP8 recipe's gradients
                     (first-step loss within 1e-4 of BF16's)
  no_quantization    the FP8 code path with the E4M3 cast replaced by float32: BF16's
                     arithmetic through FP8's code (first-step loss within 1e-4 of BF16's)
  mantissa3_forward  forward operands rounded to E4M3's 3 mantissa bits, with float32's
                     exponent range and no scales; BF16 gradients

    python -m bench fp8_ablation -- VARIANT [--seed 0] [--steps 800] [--tail N] [--workdir DIR] [--set key=value ...]
"""

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a file, python bench/fp8_ablation.py: the repository's packages first
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp

import dsjax.fp8
import dsjax.layers
import dsjax.moe.dispatch
from bench.common import emit
from bench.fp8_quality import read_run, train_sets

VARIANTS = ("forward_only", "backward_only", "no_quantization", "mantissa3_forward")


def _value_of(a, b):
    """a's value with b's gradient."""
    return b + jax.lax.stop_gradient(a - b)


def _round_mantissa3(a):
    r = jax.lax.reduce_precision(a.astype(jnp.float32), exponent_bits=8, mantissa_bits=3).astype(a.dtype)
    return _value_of(r, a)


def apply(variant: str) -> None:
    """Swaps the FP8 products the model calls (dense and grouped) for the variant's."""
    fp8_mm, fp8_grouped = dsjax.fp8.fp8_matmul, dsjax.fp8.fp8_ragged_dot
    bf16_mm = lambda x, w: (x @ w).astype(x.dtype)
    bf16_grouped = lambda x, w, g: jax.lax.ragged_dot(x, w, g).astype(x.dtype)
    if variant == "no_quantization":
        dsjax.fp8.E4M3 = jnp.float32
        return
    if variant == "forward_only":  # **kw: the FP8 recipe's gemm and pow2
        mm = lambda x, w, **kw: _value_of(fp8_mm(x, w, **kw), bf16_mm(x, w))
        grouped = lambda x, w, g, **kw: _value_of(fp8_grouped(x, w, g, **kw), bf16_grouped(x, w, g))
    elif variant == "backward_only":
        mm = lambda x, w, **kw: _value_of(bf16_mm(x, w), fp8_mm(x, w, **kw))
        grouped = lambda x, w, g, **kw: _value_of(bf16_grouped(x, w, g), fp8_grouped(x, w, g, **kw))
    else:  # no FP8 GEMM, so no recipe to follow
        mm = lambda x, w, **kw: bf16_mm(_round_mantissa3(x), _round_mantissa3(w))
        grouped = lambda x, w, g, **kw: bf16_grouped(_round_mantissa3(x), _round_mantissa3(w), g)
    dsjax.layers.fp8_matmul = dsjax.moe.dispatch.fp8_matmul = mm
    dsjax.moe.dispatch.fp8_ragged_dot = grouped


def main():
    p = argparse.ArgumentParser()
    p.add_argument("variant", choices=VARIANTS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--eval-batches", type=int, default=32)
    p.add_argument("--tail", type=int, default=None, help="default: the last quarter of --steps")
    p.add_argument("--workdir", default=None, help="default: bench_fp8_ablation/VARIANT_seedS")
    p.add_argument("--set", dest="extra", action="append", default=[], help="key=value for the run")
    args = p.parse_args()
    if args.tail is None:
        args.tail = max(args.steps // 4, 1)
    if not 0 < args.tail <= args.steps:
        sys.exit(f"error: --tail must be in 1..--steps ({args.steps}), got {args.tail}")
    workdir = args.workdir or os.path.join("bench_fp8_ablation", f"{args.variant}_seed{args.seed}")
    if os.path.exists(workdir):
        sys.exit(f"error: {workdir} exists; remove it or pick another --workdir")
    apply(args.variant)
    from train.__main__ import main as train_main

    argv = ["--workdir", workdir]
    for s in train_sets("fp8", args.seed, args):
        argv += ["--set", s]
    if train_main(argv):
        sys.exit(f"error: the {args.variant} run failed")
    val, _, ce, first = read_run(workdir, args)
    emit({"variant": args.variant, "seed": args.seed, "steps": args.steps, "val_loss": round(val, 5),
          "tail_steps": args.tail, "train_ce": round(ce, 5), "first_step_loss": round(first, 6),
          **({"set": args.extra} if args.extra else {})})


if __name__ == "__main__":
    main()
