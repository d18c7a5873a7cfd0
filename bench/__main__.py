"""Runs the benchmarks under bench/ and prints their JSON lines, then a table.

    python -m bench                       # every benchmark not marked slow (minutes on 2 cores)
    python -m bench vs_hf decode          # the ones named (slow ones included)
    python -m bench --all                 # everything, the slow ones too (hours on a CPU)
    python -m bench --list                # names, marks and first docstring lines
    python -m bench vs_hf -- --presets tiny --reps 3   # arguments after -- go to each named one

Each benchmark is the module bench/NAME.py, run as `python -m bench.NAME` in its own
process from the repository root (so that it imports dsjax, train, ... from there).
Its JSON lines (stdout lines that parse as a JSON object) are printed as they come, with
`name` added where the benchmark leaves it out; its other stdout goes to stderr. A
benchmark that cannot run here (no GPU, no trained model, a required argument) is skipped
with its reason. The exit status is 1 when a benchmark failed.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# Opt-in benchmarks: run only when named or with --all (why: roughly how long on 2 cores).
SLOW = {
    "allocator": "4 child processes compiling the small step, about 7 minutes",
    "decode": "about 5 minutes",
    "fp8_ablation": "800 training steps",
    "fp8_quality": "nine 800-step training runs",
    "r1": "about 12 minutes",
    "scale": "compiles the small step in 4 layouts, about 3 minutes",
    "tpu_compile": "compiles 4 layouts with libtpu, V3 671B on a v5p:8x8x8 included, 15 minutes or more",
}
GPU_ONLY = {"gpu_check"}
# Modules of bench/ that are not benchmarks.
HELPERS = {"common"}
# The table's figures per benchmark (others: their first few scalar fields).
KEY_FIGURES = {
    "vs_hf": ("preset", "measure", "dsjax_per_s", "hf_per_s", "speedup", "mfu", "fraction_of_bound",
              "tokens_agree", "target_met"),
    "attention_memory": ("preset", "seq_len", "dense_temp_mib", "blockwise_temp_mib", "reduction"),
    "gpu_check": ("device_kind", "fp8_speedup", "losses_finite", "fp8_lowered_to_f8_dots"),
    "scale": ("preset", "batch", "seq_len", "moe_impl", "targets_met"),
    "tpu_compile": ("preset", "topology", "plan_gib", "compiled_gib", "hbm_gib", "fits", "compile_s"),
    "allocator": ("preset", "kept_train_ms", "hugepages_train_ms", "plain_train_ms", "kept_train_speedup",
                  "kept_forward_speedup"),
}
MAX_FIGURES = 6


def discover() -> dict[str, str]:
    """{name: first docstring line} of every benchmark module bench/*.py (not the
    runner's files, not the helpers)."""
    out = {}
    for fname in sorted(os.listdir(HERE)):
        if fname.endswith(".py") and not fname.startswith("_") and fname[:-3] not in HELPERS:
            with open(os.path.join(HERE, fname), encoding="utf-8") as f:
                doc = ast.get_docstring(ast.parse(f.read())) or ""
            out[fname[:-3]] = " ".join(doc.split("\n\n")[0].split())
    return out


def skip_reason(name: str, extra: list[str]) -> str | None:
    """Why `name` cannot run on this machine with these arguments, or None."""
    if name in GPU_ONLY:
        import jax

        if jax.default_backend() not in ("gpu", "cuda", "rocm"):
            return f"needs a GPU (JAX backend here: {jax.default_backend()})"
    if name == "tpu_compile":
        import importlib.util

        if importlib.util.find_spec("libtpu") is None:
            return 'needs libtpu (pip install "dsjax[tpu]")'
    if name == "fp8_ablation" and not extra:
        return "needs a VARIANT: python -m bench fp8_ablation -- forward_only"
    return None


def parse_output(text: str, name: str) -> tuple[list[dict], list[str]]:
    """(JSON records, other lines) of a benchmark's stdout; records get `name` if absent."""
    records, other = [], []
    for line in text.splitlines():
        s = line.strip()
        record = None
        if s.startswith("{"):
            try:
                record = json.loads(s)
            except json.JSONDecodeError:
                record = None
        if isinstance(record, dict):
            records.append({"name": name, **record} if "name" not in record else record)
        elif s:
            other.append(line)
    return records, other


def _scalar(v) -> bool:
    return isinstance(v, (bool, int, float)) or (isinstance(v, str) and len(v) <= 24)


def key_figures(record: dict) -> list[tuple[str, object]]:
    """The (key, value) pairs of a record the table shows."""
    if record.get("name") == "decode" and isinstance(record.get("runs"), list):
        return [(f"{r['impl']}@{r['context']}", r["decode_tokens_per_s"]) for r in record["runs"]
                if isinstance(r, dict) and {"impl", "context", "decode_tokens_per_s"} <= set(r)]
    keys = KEY_FIGURES.get(record.get("name"))
    if keys is None:
        keys = [k for k, v in record.items() if k != "name" and _scalar(v)][:MAX_FIGURES]
    return [(k, record[k]) for k in keys if k in record]


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def format_table(results: list[dict]) -> str:
    """A text table: one row per record (or per skipped/failed benchmark).

    results: [{'name', 'status' ('ok', 'skipped', 'failed'), 'wall_s', 'records', 'reason'}].
    """
    rows = [("benchmark", "status", "wall s", "figures")]
    for r in results:
        wall = "" if r.get("wall_s") is None else f"{r['wall_s']:.0f}"
        records = r.get("records") or []
        if r["status"] != "ok" or not records:
            rows.append((r["name"], r["status"], wall, r.get("reason") or ""))
        for i, rec in enumerate(records):
            figures = "  ".join(f"{k}={_fmt(v)}" for k, v in key_figures(rec))
            rows.append((r["name"] if i == 0 else "", r["status"] if i == 0 else "", wall if i == 0 else "", figures))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:>{widths[2]}}  {row[3]}".rstrip() for row in rows]
    lines.insert(1, "-" * max(len(line) for line in lines))
    return "\n".join(lines)


def run_one(name: str, extra: list[str]) -> dict:
    """Runs `python -m bench.NAME` from the repository root, echoing its JSON lines (with
    `name`) as they come."""
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch's spinning OpenMP threads stall on a shared CPU
    print(f"[bench] {name}: python -m bench.{name} {' '.join(extra)}".rstrip(), file=sys.stderr, flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", f"bench.{name}", *extra], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, text=True)
    records = []
    for line in proc.stdout:
        recs, other = parse_output(line, name)
        for rec in recs:
            print(json.dumps(rec), flush=True)
        records += recs
        for o in other:
            print(o, file=sys.stderr, flush=True)
    rc = proc.wait()
    wall = time.perf_counter() - start
    if rc != 0:
        return {"name": name, "status": "failed", "wall_s": wall, "records": records, "reason": f"exit status {rc}"}
    if not records:
        return {"name": name, "status": "failed", "wall_s": wall, "records": [], "reason": "printed no JSON line"}
    return {"name": name, "status": "ok", "wall_s": wall, "records": records}


def select(names: list[str], available: dict[str, str], run_all: bool) -> list[str]:
    """The benchmarks to run: those named (in order), else all (with run_all) or the fast ones."""
    unknown = [n for n in names if n not in available]
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(available)}")
    if names:
        return names
    return [n for n in available if run_all or n not in SLOW]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", help="benchmarks to run (default: every one not marked slow)")
    p.add_argument("--all", action="store_true", help="run the slow benchmarks too")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = p.parse_args(argv)
    available = discover()
    if args.list:
        for name, doc in available.items():
            mark = f"slow ({SLOW[name]})" if name in SLOW else "gpu" if name in GPU_ONLY else "fast"
            print(f"{name:<18} {mark:<38} {doc if len(doc) <= 100 else doc[:97] + '...'}")
        return 0
    if extra and not args.names:
        raise SystemExit("arguments after -- need the benchmarks they are for named")
    results = []
    for name in select(args.names, available, args.all):
        reason = skip_reason(name, extra)
        if reason:
            print(f"[bench] {name}: skipped, {reason}", file=sys.stderr, flush=True)
            results.append({"name": name, "status": "skipped", "wall_s": None, "records": [], "reason": reason})
            continue
        results.append(run_one(name, extra))
    print(format_table(results))
    return int(any(r["status"] == "failed" for r in results))


if __name__ == "__main__":
    sys.exit(main())
