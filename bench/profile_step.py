"""Where the training step's time goes: an XLA profile of `python -m train`'s jitted step,
summed per part of the model. With --decode B, the same for one step of greedy decoding.

    python -m bench.profile_step [--preset small] [--batch 8] [--seq-len 256] [--steps 3] [--top 12]
    python -m bench.profile_step --decode 8 [--preset small] [--new-tokens 33]

Builds the step `vs_hf` times (bench.common.train_step: MTP off, AdamW, the
implementation choices resolved for the CPU), runs `--steps` steps under `jax.profiler.trace`, reads the trace back with
`jax.profiler.ProfileData` (no TensorBoard needed) and attributes each executed XLA op to
the JAX scope in its HLO metadata: routed experts, the rest of the MoE layer, attention
(MLA), the dense MLP, the output head and loss, norms, embedding, and the optimizer with
the non-finite guard. Prints one JSON line: the step's wall time, milliseconds per step
of each part, and the `--top` ops by time. Op times are summed over XLA's worker
threads, and ops that contain others (a loop and its body) count only their own
leaves, so the parts add up to the busy time of all threads, which can exceed the wall.

--decode B profiles `dsjax.generate` (greedy, absorbed MLA, MTP off, 32-token prompts) at
batch B: the ops of its decoding loop (found in the compiled HLO), per step, without the
prefill and the per-call weight copy; the wall time per step is the difference of a call
with --new-tokens and one with a single new token. Ops outside the model (choosing
tokens, the loop) count as "sampling and loop". An op whose scope XLA dropped (at batch 1,
the matrix-vector products) is charged to the scope of its user (`op_scopes`); "other"
is what is left without one.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a file, python bench/profile_step.py: the repository's packages first
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import emit, random_batch, run_config, train_step
from dsjax import impl

# Scope fragments of the HLO op_name metadata -> part of the model, first match wins.
PARTS = (("routed_experts", "routed experts"), ("/moe/", "MoE router, shared expert, combine"),
         ("attention", "attention (MLA)"), ("/mlp/", "dense MLP"), ("logits_from_hidden", "output head"),
         ("cross_entropy", "loss"), ("log_softmax", "loss"), ("norm", "norms"), ("embed", "embedding"))
# Ops with other ops inside them in the trace: only their leaves are counted.
CONTAINERS = re.compile(r"^(while|cond|call|conditional)(\.\d+)*(\.clone(\.\d+)*)?$")


def op_scopes(hlo: str) -> dict[str, str]:
    """{HLO instruction name: op_name metadata} of compiled HLO text. An instruction whose
    metadata XLA dropped (a dot it rewrote into a matrix-vector product, say) takes the
    scope of the first instruction that uses its result and has one."""
    out, users = {}, {}
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = [^(]*?\w\((.*)", line)
        if not m:
            continue
        name = m.group(1)
        scope = re.search(r'metadata=\{[^}]*op_name="([^"]*)"', line)
        if scope:
            out[name] = scope.group(1)
        for operand in re.findall(r"%([\w.\-]+)", m.group(2).split("), ")[0]):
            users.setdefault(operand, []).append(name)

    def inherit(name, depth=0):
        if name in out or depth > 8:
            return out.get(name)
        for user in users.get(name, ()):
            found = inherit(user, depth + 1)
            if found:
                return found
        return None

    for name in list(users):
        found = None if name in out else inherit(name)
        if found:
            out[name] = found
    return out


def _scope_depth(line: str) -> int:
    """Levels of an HLO instruction's JAX scope (its op_name metadata; 0 without one)."""
    m = re.search(r'op_name="([^"]*)"', line)
    return m.group(1).count("/") if m else 0


def loop_ops(hlo: str) -> set[str]:
    """Names of the instructions that run inside the decoding loop and the computations
    it calls: of the ENTRY computation's `while`s, the one(s) with the shortest JAX scope
    (`jit(run)/while`; a `while` inside the model, such as the prefill's loop over expert
    blocks, is scoped under `Transformer/...`)."""
    comps, current, entry = {}, None, None
    for line in hlo.splitlines():
        m = re.match(r"(ENTRY )?%?([\w.\-]+) \(.*\) -> .*\{$", line)
        if m:
            current = m.group(2)
            comps[current] = []
            entry = current if m.group(1) else entry
        elif current and line.strip() and line.strip() != "}":
            comps[current].append(line)
    called = lambda line: re.findall(r"(?:body|condition|calls|to_apply|branch_computations)=\{?%?([\w.\-]+)", line)
    whiles = [line for line in comps.get(entry, []) if re.search(r"= .* while\(", line)]
    outermost = min(map(_scope_depth, whiles), default=0)
    loops = [c for line in whiles if _scope_depth(line) == outermost for c in called(line)]
    seen, names = set(), set()
    while loops:
        comp = loops.pop()
        if comp in seen or comp not in comps:
            continue
        seen.add(comp)
        for line in comps[comp]:
            m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = ", line)
            if m:
                names.add(m.group(1))
            loops.extend(called(line))
    return names


def part_of(scope: str, decode: bool = False) -> str:
    if not scope:
        return "other"
    if decode and "Transformer" not in scope:
        return "sampling and loop"
    for fragment, part in PARTS:
        if fragment in scope:
            return part
    if not decode and "transpose(jvp" not in scope and "jvp(" not in scope:
        return "optimizer and guard"  # outside the model's forward and backward passes
    return "other model ops"


def report(name: str, header: dict, wall_ms: float, times: collections.Counter, scopes: dict, top: int,
           decode: bool = False) -> None:
    """Prints the JSON line (and a table on stderr) of per-op `times` (ms) by model part."""
    parts = collections.Counter()
    for op, ms in times.items():
        parts[part_of(scopes.get(op, ""), decode)] += ms
    top_ops = [{"op": op, "ms": round(ms, 2), "scope": scopes.get(op, "")[-120:]} for op, ms in times.most_common(top)]
    emit({"name": name, **header, "step_ms": round(wall_ms, 2), "busy_ms": round(sum(times.values()), 2),
          "parts_ms": {k: round(v, 2) for k, v in parts.most_common()}, "top_ops": top_ops})
    width = max(map(len, parts))
    print(f"step {wall_ms:.1f} ms wall; ms per step summed over XLA's threads:", file=sys.stderr)
    for part, ms in parts.most_common():
        print(f"  {part:<{width}} {ms:8.2f}", file=sys.stderr)


def profile_decode(preset: str, batch: int, new_tokens: int, top: int) -> int:
    """The per-step profile of greedy `dsjax.generate` (see the module docstring)."""
    import dsjax
    from dsjax.decoding import _generate_plain

    # Resolved for this device as `generate` resolves it, so the HLO lowered below is its call's.
    cfg = impl.resolve(dsjax.load_model_config(preset).replace(num_nextn_predict_layers=0, attn_impl="absorb"),
                       impl.platform_of())
    model = dsjax.Transformer(cfg)
    variables = dsjax.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    prompts = np.random.default_rng(0).integers(2, cfg.vocab_size, (batch, 32))
    lengths = np.full((batch,), 32)

    def run(n):
        return jax.block_until_ready(dsjax.generate(model, variables, prompts, lengths, max_new_tokens=n).tokens)

    # The HLO of the call `generate` makes (its scopes name the ops in the trace): the
    # prompts padded to generate's default 64-token bucket, greedy.
    padded = jnp.zeros((batch, -(-prompts.shape[1] // 64) * 64), jnp.int32)
    hlo = _generate_plain.lower(model, variables, padded, jnp.asarray(lengths, jnp.int32), jax.random.key(0),
                                jnp.float32(1e-6), max_new_tokens=new_tokens, greedy=True, top_k=0, top_p=1.0,
                                stop_tokens=(), rules=()).compile().as_text()
    scopes = op_scopes(hlo)
    walls = {1: [], new_tokens: []}
    for n in (1, new_tokens):
        run(n)
    for _ in range(3):
        for n in (1, new_tokens):
            start = time.perf_counter()
            run(n)
            walls[n].append(time.perf_counter() - start)
    in_loop = loop_ops(hlo)
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            run(new_tokens)
        # the loop runs new_tokens times (each choosing a token, then a forward pass)
        times = collections.Counter({op: ms for op, ms in op_times(trace_dir, new_tokens).items() if op in in_loop})
    wall = (np.median(walls[new_tokens]) - np.median(walls[1])) / (new_tokens - 1)
    report("profile_step", {"preset": preset, "decode_batch": batch, "new_tokens": new_tokens,
                            "moe_dispatch": impl.moe_dispatch(cfg, batch), "layers_unrolled": impl.unroll_layers(cfg)},
           wall * 1e3, times, scopes, top, decode=True)
    return 0


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


def mtp_off_step(preset: str, batch: int, seq_len: int):
    """`python -m train`'s step for `preset` with MTP off (bench.common.train_step), fresh
    variables and a random batch x seq_len batch: (TrainStep, variables, batch). Starting
    the state from the variables hands their parameters to the donating step, so use
    `variables` on their own before that."""
    run = run_config(preset, batch, seq_len, "model.num_nextn_predict_layers=0")
    train = train_step(run.model, run.train)
    return train, train.init_variables(), random_batch(run.model.vocab_size, batch, seq_len)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--decode", type=int, default=0, metavar="B",
                   help="profile a step of greedy decoding at batch B instead of the training step")
    p.add_argument("--new-tokens", type=int, default=33, help="with --decode: tokens per profiled call")
    args = p.parse_args()
    from dsjax.cpu.allocator import keep_buffers

    keep_buffers()  # as python -m train and vs_hf do: XLA's buffers stay mapped between steps
    if args.decode:
        return profile_decode(args.preset, args.decode, args.new_tokens, args.top)

    train, variables, batch = mtp_off_step(args.preset, args.batch, args.seq_len)
    cfg, step, state = train.model.cfg, train.step, train.start(variables)
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
    report("profile_step", {"preset": args.preset, "batch": args.batch, "seq_len": args.seq_len,
                            "moe_dispatch": impl.moe_dispatch(cfg), "attn_kernel": impl.attention_kernel(cfg, args.seq_len),
                            "layers_unrolled": impl.unroll_layers(cfg)}, wall * 1e3, times, scopes, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
