"""Per-device work and memory of the training step on 1 and on 8 devices, from XLA's own
analysis of the compiled step (fake CPU devices: nothing runs, everything is compiled).

    python -m bench.scale [--preset small] [--batch 16] [--seq-len 256] [--moe-impl ragged]

For each layout (one device, fsdp=8, expert=8, fsdp=2+expert=4) it compiles
`python -m train`'s step (bench.common.train_step: MTP on as the preset says, AdamW, the
bias update, the layer scan in every layout as meshes run it) and
reports per device: FLOPs (`cost_analysis`), temp bytes (`memory_analysis`), the bytes
its collectives produce (summed over the compiled HLO, ops inside loops counted per
iteration where XLA knows the trip count, the expert exchange's rounds counted once),
the rows its grouped GEMMs see (from the step's jaxpr, inside shard_map: the per-device
shapes), and whether any collective carries the global token-copy index. Prints one
JSON line with the targets checked, then a table.
"""

import argparse
import os
import re
import sys
import time

# Before JAX starts: 8 fake CPU devices (the layouts compile for them; nothing runs).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

if __package__ in (None, ""):  # run as a file, python bench/scale.py: the repository's packages first
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench.common import emit, run_config, train_step  # noqa: E402
from sharding.mesh import MeshConfig, make_mesh  # noqa: E402

LAYOUTS = {"1 device": dict(fsdp=1), "fsdp=8": dict(fsdp=8), "expert=8": dict(fsdp=1, expert=8),
           "fsdp=2+expert=4": dict(fsdp=2, expert=4)}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "ragged-all-to-all",
               "collective-permute")
_BYTES = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s8": 1, "u8": 1, "pred": 1, "f64": 8, "s64": 8,
          "u64": 8, "f8e4m3fn": 1, "f8e5m2": 1}


def _shape_bytes(text: str) -> int:
    """Bytes of every array shape (e.g. f32[16,256]{1,0}) in an HLO result type."""
    total = 0
    for dtype, dims in re.findall(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]", text):
        if dtype in _BYTES:
            n = 1
            for d in filter(None, dims.split(",")):
                n *= int(d)
            total += n * _BYTES[dtype]
    return total


def collective_bytes(hlo: str, index_shape: str) -> tuple[dict[str, int], bool]:
    """Result bytes of each kind of collective in compiled HLO text, weighted by the trip
    counts XLA knows for the loops around them; and whether any carries `index_shape`."""
    comps, current = {}, None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head and not line.startswith(" "):
            current = head.group(1)
            comps[current] = []
        elif current and line.strip() and line.strip() != "}":
            comps[current].append(line)
    weight = {}

    def visit(name, w):
        weight[name] = weight.get(name, 0) + w
        for line in comps.get(name, ()):
            trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
            for key, callee in re.findall(r"\b(body|condition|calls|to_apply|branch_computations)=\{?%?([\w.\-]+)", line):
                visit(callee, w * (int(trips.group(1)) if trips and key in ("body", "condition") else 1))

    entry = next(n for n in comps if re.search(rf"^ENTRY %?{re.escape(n)}\b", hlo, re.M))
    visit(entry, 1)
    out, carries_index = {k: 0 for k in COLLECTIVES}, False
    for name, lines in comps.items():
        for line in lines:
            op = re.search(r"= (.*?) (" + "|".join(COLLECTIVES) + r")(-start)?\(", line)
            if not op or "-done(" in line:
                continue
            out[op.group(2)] += _shape_bytes(op.group(1)) * weight.get(name, 0)
            carries_index |= index_shape in op.group(1)
    return out, carries_index


def grouped_gemm_rows(jaxpr) -> list[int]:
    """Rows of the left operand of every grouped GEMM (ragged_dot) in a jaxpr, nested
    jaxprs included (shard_map bodies hold per-device shapes)."""
    rows = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name.startswith("ragged_dot"):
            rows.append(int(eqn.invars[0].aval.shape[0]))
        for value in eqn.params.values():
            for sub in (value if isinstance(value, (list, tuple)) else [value]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    rows += grouped_gemm_rows(inner)
    return rows


def analyse(cfg, sizes: dict, n_devices: int) -> dict:
    """Compiles the train step of the run config `cfg` on the first `n_devices` devices
    under the mesh `sizes` (MeshConfig fields) with the `fsdp` rules; XLA's figures."""
    mesh = make_mesh(MeshConfig(**sizes), devices=jax.devices()[:n_devices])
    tcfg = cfg.train
    train = train_step(cfg.model, tcfg, mesh, rules="fsdp")
    tokens = jax.ShapeDtypeStruct((tcfg.batch_size, tcfg.seq_len), jnp.int32, sharding=train.batch_sharding)
    batch = {"inputs": tokens, "targets": tokens}
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        traced = train.step.trace(train.abstract_state(), batch)
        compiled = traced.lower().compile()
    seconds = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    memory = compiled.memory_analysis()
    copies = tcfg.batch_size * tcfg.seq_len * cfg.model.num_experts_per_tok
    moved, carries_index = collective_bytes(compiled.as_text(), f"s32[{copies}]")
    return {"devices": n_devices, "compile_s": round(seconds, 1), "flops": float(cost.get("flops", 0.0)),
            "temp_bytes": int(memory.temp_size_in_bytes), "argument_bytes": int(memory.argument_size_in_bytes),
            "collective_bytes": sum(moved.values()), "collectives": {k: v for k, v in moved.items() if v},
            "gemm_rows_max": max(grouped_gemm_rows(traced.jaxpr.jaxpr), default=0),
            "gathers_token_index": carries_index}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--moe-impl", default="ragged")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated subset of: " + ", ".join(LAYOUTS))
    args = p.parse_args()
    # The layer scan in every layout, as a mesh runs it: on one CPU device `layer_loop=auto`
    # unrolls the layers, a different program (16 GB of temp for `small`), not a baseline.
    cfg = run_config(args.preset, args.batch, args.seq_len, f"model.moe_impl={args.moe_impl}",
                     "model.layer_loop=scan")
    names = args.layouts.split(",")
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown:
        p.error(f"unknown layouts {unknown}; known: {list(LAYOUTS)}")
    results = {}
    for name in names:
        results[name] = analyse(cfg, LAYOUTS[name], 1 if name == "1 device" else 8)
        print(f"compiled {name} in {results[name]['compile_s']} s", file=sys.stderr)
    copies = args.batch * args.seq_len * cfg.model.num_experts_per_tok
    line = {"name": "scale", "preset": args.preset, "batch": args.batch, "seq_len": args.seq_len,
            "moe_impl": args.moe_impl, "token_copies": copies, "layouts": results}
    one = results.get("1 device")
    if one:
        checks = {}
        for name, r in results.items():
            if r["devices"] > 1:
                checks[name] = {"temp_vs_ideal": round(r["temp_bytes"] / (one["temp_bytes"] / r["devices"]), 2),
                                "gemm_rows_vs_mean": round(r["gemm_rows_max"] / (copies / r["devices"]), 2),
                                "flops_vs_ideal": round(r["flops"] / (one["flops"] / r["devices"]), 2)}
        line["checks"] = checks
        line["targets_met"] = all(c["temp_vs_ideal"] <= 1.5 and c["gemm_rows_vs_mean"] <= 1.5
                                  for c in checks.values()) and not any(r["gathers_token_index"]
                                                                         for r in results.values())
    emit(line)
    print(f"{'layout':<18}{'GFLOPs':>10}{'temp MiB':>10}{'coll. MiB':>11}{'GEMM rows':>11}{'idx gather':>11}",
          file=sys.stderr)
    for name, r in results.items():
        print(f"{name:<18}{r['flops'] / 1e9:>10.1f}{r['temp_bytes'] / 2**20:>10.0f}"
              f"{r['collective_bytes'] / 2**20:>11.1f}{r['gemm_rows_max']:>11}{str(r['gathers_token_index']):>11}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
