"""Where the training step's time goes: an XLA profile of `python -m train`'s jitted step,
summed per part of the model.

    python bench/profile_step.py [--preset small] [--batch 8] [--seq-len 256] [--steps 3] [--top 12]

Builds the step `vs_hf` times (MTP off, AdamW, the dispatch and attention kernel `auto`
picks), runs `--steps` steps under `jax.profiler.trace`, reads the trace back with
`jax.profiler.ProfileData` (no TensorBoard needed) and attributes each executed XLA op to
the JAX scope in its HLO metadata: routed experts, the rest of the MoE layer, attention
(MLA), the dense MLP, the output head and loss, norms, embedding, and the optimizer with
the non-finite guard. Prints one JSON line: the step's wall time, milliseconds per step
of each part, and the `--top` ops by time. Op times are summed over XLA's worker
threads, and ops that contain others (a loop and its body) count only their own
leaves, so the parts add up to the busy time of all threads, which can exceed the wall.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

# Scope fragments of the HLO op_name metadata -> part of the model, first match wins.
PARTS = (("routed_experts", "routed experts"), ("/moe/", "MoE router, shared expert, combine"),
         ("attention", "attention (MLA)"), ("/mlp/", "dense MLP"), ("logits_from_hidden", "output head"),
         ("cross_entropy", "loss"), ("log_softmax", "loss"), ("norm", "norms"), ("embed", "embedding"))
# Ops with other ops inside them in the trace: only their leaves are counted.
CONTAINERS = re.compile(r"^(while|cond|call|conditional)(\.\d+)?$")


def op_scopes(hlo: str) -> dict[str, str]:
    """{HLO instruction name: op_name metadata} of compiled HLO text."""
    out = {}
    for line in hlo.splitlines():
        m = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{[^}]*op_name="([^"]*)"', line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def part_of(scope: str) -> str:
    if not scope:
        return "other"
    for fragment, part in PARTS:
        if fragment in scope:
            return part
    if "transpose(jvp" not in scope and "jvp(" not in scope:
        return "optimizer and guard"  # outside the model's forward and backward passes
    return "other model ops"


def op_times(trace_dir: str, steps: int) -> collections.Counter:
    """Milliseconds per step of each XLA op name, over the XLA worker threads."""
    path = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)[0]
    data = jax.profiler.ProfileData.from_file(path)
    times = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if line.name == "python":
                continue
            for event in line.events:
                name = event.name
                if name.startswith(("end:", "Threadpool", "ThunkExecutor", "SlinkyThreadPool")) or CONTAINERS.match(name):
                    continue
                times[name] += event.duration_ns / 1e6 / steps
    return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args()

    import dsjax
    from train.config import build_config
    from train.optim import make_optimizer
    from train.steps import TrainState, make_train_step

    run = build_config("pretrain", [f"model.preset={args.preset}", "model.num_nextn_predict_layers=0",
                                    f"train.batch_size={args.batch}", f"train.seq_len={args.seq_len}"])
    cfg, tcfg = run.model, run.train
    model = dsjax.Transformer(cfg)
    variables = dsjax.unbox(model.init(jax.random.key(0), jnp.zeros((1, args.seq_len), jnp.int32)))
    tx, schedule = make_optimizer(tcfg, variables["params"])
    state = TrainState.start(variables, tx)
    step = jax.jit(make_train_step(model, tx, tcfg, schedule), donate_argnums=(0,))
    tokens = np.random.default_rng(0).integers(2, cfg.vocab_size, (args.batch, args.seq_len + 1))
    batch = {"inputs": jnp.asarray(tokens[:, :-1], jnp.int32), "targets": jnp.asarray(tokens[:, 1:], jnp.int32)}
    scopes = op_scopes(step.lower(state, batch).compile().as_text())
    for _ in range(3):  # compile and warm up
        state, _ = step(state, batch)
        jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(args.steps):
        state, _ = step(state, batch)
        jax.block_until_ready(state)
    wall = (time.perf_counter() - start) / args.steps
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(args.steps):
                state, _ = step(state, batch)
                jax.block_until_ready(state)
        times = op_times(trace_dir, args.steps)
    parts = collections.Counter()
    for name, ms in times.items():
        parts[part_of(scopes.get(name, ""))] += ms
    top = [{"op": name, "ms": round(ms, 1), "scope": scopes.get(name, "")[-120:]}
           for name, ms in times.most_common(args.top)]
    print(json.dumps({"name": "profile_step", "preset": args.preset, "batch": args.batch, "seq_len": args.seq_len,
                      "moe_dispatch": cfg.moe_dispatch(), "attn_kernel": cfg.attention_kernel(args.seq_len),
                      "layers_unrolled": cfg.unroll_layers(), "step_ms": round(wall * 1e3, 1),
                      "busy_ms": round(sum(times.values()), 1),
                      "parts_ms": {k: round(v, 1) for k, v in parts.most_common()}, "top_ops": top}))
    width = max(map(len, parts))
    print(f"step {wall * 1e3:.0f} ms wall; ms per step summed over XLA's threads:", file=sys.stderr)
    for part, ms in parts.most_common():
        print(f"  {part:<{width}} {ms:8.1f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
