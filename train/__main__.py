"""`python -m train [STAGE] [--config NAME_OR_PATH] [--workdir DIR] [--init WORKDIR] [--set key=value ...]`

With no arguments: pretrains the tiny preset on the Python standard library's source
(byte-level tokens), with a progress bar, validation, checkpoints, metrics.jsonl, a loss
plot and a generated sample. Running again on the same workdir resumes exactly.

Stages (train/stages/, each declaring itself): `pretrain`, `sft` (prompt/response JSONL,
the loss on responses), `grpo` (rollouts + rule-based rewards on a generated task),
`distill` (SFT of a student on a teacher's rejection-sampled generations) and `rm` (a
reward model on preference-pair JSONL, Bradley-Terry). Each reads its own run config,
`configs/<stage>.yaml`, unless `--config` names another.

`--dry-run` prints the per-device memory plan (train/plan.py); with `--topology NAME` it
compiles the run's programs for that TPU slice with libtpu (train/aot.py), from any host.

On a CPU (dsjax.cpu.allocator.runs_on_cpu: JAX_PLATFORMS, else no accelerator plugin
installed nor a TPU attached) the process starts again once with huge pages for XLA's
buffers and keeps those buffers mapped between steps; on a GPU or TPU it touches no
allocator setting.
"""

from __future__ import annotations

import argparse
import sys


def _parser(stages: dict, config: str | None = None) -> argparse.ArgumentParser:
    """The command line; its --help lists every --set key with the value the run config
    `config` gives it (None: no list, for a parse that shows no help)."""
    from train.config import describe_options

    p = argparse.ArgumentParser(
        prog="python -m train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train DeepSeek-style models with dsjax. `python -m train STAGE --help` lists the "
                    "values that stage's run uses; --show-config prints its whole resolved config.",
        epilog=describe_options(config, stages) if config else None, add_help=config is not None)
    p.add_argument("stage", nargs="?", default="pretrain", choices=list(stages),
                   help="what to run (default: pretrain)")
    p.add_argument("--config", default=None,
                   help="run config: a name under configs/ or a YAML path (default: the stage's own)")
    p.add_argument("--workdir", default="workdir", help="outputs and checkpoints (resumed if present)")
    p.add_argument("--init", default=None, metavar="WORKDIR",
                   help="start from this run's parameters (the same as --set init.workdir=WORKDIR)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.steps=50 (repeatable)")
    p.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 for multi-process runs")
    p.add_argument("--num-processes", type=int, default=None, help="processes in a multi-process run")
    p.add_argument("--process-id", type=int, default=None, help="this process's index")
    p.add_argument("--show-config", action="store_true",
                   help="print the resolved config (the run config and --set overrides, as the "
                        "workdir's config.yaml will hold it) and exit")
    p.add_argument("--dry-run", action="store_true",
                   help="print the per-device memory plan of the layout and exit (allocates nothing)")
    p.add_argument("--topology", default=None, metavar="NAME",
                   help="with --dry-run: compile the run's programs for this TPU slice with libtpu (no TPU "
                        "needed; NAME as libtpu spells it: v5p:8x8x8, v5e:4x4, v6e:2x2, v4:2x2x1, ...) and print "
                        "the plan beside XLA's per-chip figures, ending with one JSON line")
    p.add_argument("--devices", type=int, default=None, help="devices for --dry-run (default: those present)")
    p.add_argument("--device-memory-gib", type=float, default=None,
                   help="memory per device for --dry-run (default: 80; with --topology, the chip's HBM)")
    p.add_argument("--backend", choices=("cpu", "gpu", "tpu"), default=None,
                   help="platform --dry-run plans for, which picks model.moe_impl=auto's dispatch "
                        "(default: the one present)")
    return p


def dry_run(cfg, args, stage) -> int:
    """Prints the memory plan (with --topology: beside the compiled programs' figures);
    status 2 when the layout does not fit."""
    if args.topology:
        return topology_dry_run(cfg, args, stage)
    import jax

    from dsjax.config import param_counts
    from train.plan import memory_plan

    devices = args.devices or jax.device_count()
    memory = 80.0 if args.device_memory_gib is None else args.device_memory_gib
    try:
        plan = memory_plan(cfg, devices, memory, args.backend)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = param_counts(cfg.model)
    print(f"model: {counts['total'] / 1e9:.2f}B parameters ({counts['activated'] / 1e9:.2f}B activated) "
          f"+ {counts['mtp'] / 1e9:.2f}B MTP; batch {cfg.train.batch_size} x {cfg.train.seq_len} tokens; "
          f"{devices} devices, rules {cfg.mesh.rules!r}, MoE dispatch {plan.dispatch!r}")
    print(plan.table())
    if not plan.fits:
        print(f"error: the layout needs {plan.total / 2**30:.1f} GiB per device but a device has "
              f"{memory:g} GiB; try more fsdp/expert sharding, model.remat_policy=full "
              f"or a smaller train.batch_size", file=sys.stderr)
        return 2
    print("fits")
    return 0


def topology_dry_run(cfg, args, stage) -> int:
    """--dry-run --topology NAME: the run's programs compiled for a TPU slice
    (train/aot.py); prints the plan, each program's per-chip figures, and one JSON line.
    Status 2 without libtpu, for a topology or layout that cannot be, or when the
    compiled programs do not fit a chip."""
    import json

    from dsjax.config import ConfigError
    from sharding.topology import TopologyUnavailable, have_libtpu

    if not have_libtpu():
        print('error: --topology compiles with libtpu, which is not installed: pip install "dsjax[tpu]"',
              file=sys.stderr)
        return 2
    from train.aot import compile_for_topology

    try:
        result = compile_for_topology(cfg, stage, args.topology, args.device_memory_gib)
    except (TopologyUnavailable, ValueError, ConfigError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    GiB = 2**30
    print(f"{args.topology}: {result.chips} chips of {result.device_kind!r}, {result.hbm_gib:g} GiB HBM each; "
          f"stage {result.stage}; model resolved for 'tpu': attn_kernel={result.cfg.model.attn_kernel!r}, "
          f"moe_impl={result.cfg.model.moe_impl!r}, layer_loop={result.cfg.model.layer_loop!r}")
    print("plan (train/plan.py):")
    print(result.plan.table())
    print("compiled by XLA:TPU, per chip (GiB):")
    for p in result.programs:
        if p.refused:
            print(f"  {p.name}: refused by XLA:TPU: {p.refused}")
            continue
        print(f"  {p.name}: argument {p.argument / GiB:.2f}, output {p.output / GiB:.2f}, temp {p.temp / GiB:.2f}, "
              f"alias {p.alias / GiB:.2f}" + (f", resident state {p.resident / GiB:.2f}" if p.resident else "")
              + f", generated code {p.generated_code / 2**20:.1f} MiB -> peak {p.peak / GiB:.2f}; "
              f"compiled in {p.seconds:.1f} s")
        print(f"    collectives: {', '.join(f'{k} {v}' for k, v in p.collectives.items()) or 'none'}")
        print(f"    custom calls: {', '.join(f'{k} {v}' for k, v in p.custom_calls.items()) or 'none'}")
    line = result.summary()
    print(json.dumps(line))
    if not result.fits:
        print(f"error: the run's programs need {line['compiled_gib']:.1f} GiB per chip (arguments + temporaries"
              f"{', as XLA:TPU refused it' if any(p.refused for p in result.programs) else ''}) but a chip has "
              f"{result.hbm_gib:g} GiB; try more fsdp/expert sharding, model.remat_policy=full or a smaller "
              f"train.batch_size", file=sys.stderr)
        return 2
    return 0


def os_error_message(e: OSError) -> str:
    """One line for an OSError: the file(s) it names and the system's reason ('workdir:
    Permission denied'), never a bare errno ('2')."""
    import os

    reason = e.strerror
    if not reason and len(e.args) == 1 and isinstance(e.args[0], int):
        reason = os.strerror(e.args[0])
    if not reason:
        return (str(e).strip().splitlines() or [type(e).__name__])[0]
    names = [n for n in (e.filename, e.filename2) if n is not None]
    return ": ".join([" -> ".join(str(n) for n in names), reason] if names else [reason])


# Words of the errors a process sees when a peer of its run has died (gloo's transport,
# the coordination service), whatever exception type carries them.
_PEER_GONE = ("Gloo", "Connection reset by peer", "Connection closed by peer", "heartbeat", "UNAVAILABLE")


def main(argv: list[str] | None = None, keep_buffers: bool = False) -> int:
    """`python -m train`. `keep_buffers`: keep XLA:CPU's buffers mapped between steps
    (dsjax.cpu.allocator.keep_buffers, process-wide: the command line sets it on a CPU)."""
    from dsjax.config import ConfigError
    from train.stages import all_stages

    stages = all_stages()
    argv = sys.argv[1:] if argv is None else list(argv)
    # --help shows the values of the run this command line would start: parse it once
    # without help to learn the stage and --config.
    known, _ = _parser(stages).parse_known_args([a for a in argv if a not in ("-h", "--help")])
    spec = stages[known.stage]
    args = _parser(stages, known.config or spec.default_config).parse_args(argv)
    try:
        from train.config import build_config

        overrides = list(args.overrides) + ([f"init.workdir={args.init}"] if args.init else [])
        cfg = build_config(args.config or spec.default_config, overrides, stages)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a --config that cannot be read
        print(f"error: {os_error_message(e)}", file=sys.stderr)
        return 2
    if args.show_config:
        from train.workdir import config_yaml

        print(config_yaml(cfg, args.stage), end="")
        return 0
    if args.topology and not args.dry_run:
        print("error: --topology goes with --dry-run", file=sys.stderr)
        return 2
    if args.dry_run:
        return dry_run(cfg, args, spec)
    from sharding.mesh import initialize_distributed
    from train.loop import RunStopped, run_stage

    try:
        try:
            initialize_distributed(args.coordinator, args.num_processes, args.process_id)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if keep_buffers:  # after jax.distributed starts, before the first computation
            from dsjax.cpu.allocator import keep_buffers as keep

            keep()
        return run_stage(cfg, args.workdir, spec.stage)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunStopped as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001
        import jax

        if jax.process_count() < 2:
            if isinstance(e, OSError):  # a file the run reads or writes: its name and the reason
                print(f"error: {os_error_message(e)}", file=sys.stderr)
                return 1
            raise
        # Several processes: leave at once either way, since jax.distributed's shutdown
        # barrier at exit would wait for a peer that has died (or will never get there).
        import os

        text = str(e).strip()
        first = text.splitlines()[0] if text else type(e).__name__
        if isinstance(e, OSError):
            print(f"error: process {jax.process_index()}: {os_error_message(e)}", file=sys.stderr)
        elif isinstance(e, jax.errors.JaxRuntimeError) or any(s in text for s in _PEER_GONE):
            # A collective or the coordination service failed: another process died.
            print(f"error: process {jax.process_index()}: another process of this run stopped ({first[:200]}); "
                  f"exiting. Start every process again to resume from the last checkpoint", file=sys.stderr)
        else:
            import traceback

            traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


if __name__ == "__main__":
    from dsjax.cpu.allocator import reexec, runs_on_cpu

    on_cpu = runs_on_cpu()
    if on_cpu:
        reexec()  # huge pages for XLA's buffers, before JAX starts
    sys.exit(main(keep_buffers=on_cpu))
