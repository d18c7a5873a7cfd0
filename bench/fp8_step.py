"""FP8 vs BF16 train-step time on this machine's first device (the GPU check of the FP8
recipe): builds one model, compiles the full train step (forward, FP8 backward, AdamW,
bias update) in BF16 and with `precision=fp8`, times `--steps` steps of each after a
warm-up, and prints one JSON line with the device, compile seconds, milliseconds per
step, tokens/s, the FP8/BF16 step-time ratio and both final losses (finite, and close).

    python bench/fp8_step.py [--preset small] [--batch 8] [--seq 512] [--moe-impl ragged] [--steps 10]
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import dsjax  # noqa: E402
from train.config import TrainConfig  # noqa: E402
from train.optim import make_optimizer  # noqa: E402
from train.steps import TrainState, make_train_step  # noqa: E402


def time_steps(cfg, tcfg, batch, steps):
    model = dsjax.Transformer(cfg)
    boxed = jax.jit(model.init)(jax.random.key(0), batch["inputs"][:1])
    v = dsjax.unbox(boxed)
    tx, schedule = make_optimizer(tcfg, boxed["params"])
    state = TrainState(jnp.zeros((), jnp.int32), v["params"], tx.init(v["params"]), v.get("moe_bias", {}))
    step = jax.jit(make_train_step(model, tx, tcfg, schedule), donate_argnums=0)
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    state, metrics = compiled(state, batch)  # warm-up
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    return compile_s, (time.perf_counter() - start) / steps, float(metrics["loss"])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--moe-impl", default="ragged", choices=("dense", "ragged"))
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    cfg = dsjax.load_model_config(args.preset).replace(moe_impl=args.moe_impl, dtype="bfloat16")
    tcfg = TrainConfig(steps=1000, batch_size=args.batch, seq_len=args.seq)
    tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq + 1), 2, cfg.vocab_size)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    out = {"preset": args.preset, "device": jax.devices()[0].device_kind, "batch": args.batch,
           "seq": args.seq, "moe_impl": args.moe_impl}
    for precision in ("default", "fp8"):
        name = "bf16" if precision == "default" else "fp8"
        print(f"[fp8_step] {name}: compiling and timing {args.steps} steps", file=sys.stderr)
        compile_s, step_s, loss = time_steps(cfg.replace(precision=precision), tcfg, batch, args.steps)
        out.update({f"{name}_compile_s": round(compile_s, 1), f"{name}_step_ms": round(step_s * 1e3, 1),
                    f"{name}_tokens_per_s": round(args.batch * args.seq / step_s), f"{name}_loss": round(loss, 4)})
    out["step_time_ratio"] = round(out["fp8_step_ms"] / out["bf16_step_ms"], 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
