"""`python -m train [STAGE] [--config NAME_OR_PATH] [--workdir DIR] [--set key=value ...]`

With no arguments: pretrains the tiny preset on the Python standard library's source
(byte-level tokens), with a progress bar, validation, checkpoints, metrics.jsonl, a loss
plot and a generated sample. Running again on the same workdir resumes exactly.
"""

from __future__ import annotations

import argparse
import sys

STAGES = ("pretrain",)


def _parser() -> argparse.ArgumentParser:
    from train.config import describe_options

    p = argparse.ArgumentParser(
        prog="python -m train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train DeepSeek-style models with dsjax.",
        epilog="options for --set (section.key = default):\n" + describe_options())
    p.add_argument("stage", nargs="?", default="pretrain", choices=STAGES, help="what to run (default: pretrain)")
    p.add_argument("--config", default="pretrain", help="run config: a name under configs/ or a YAML path")
    p.add_argument("--workdir", default="workdir", help="outputs and checkpoints (resumed if present)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.steps=50 (repeatable)")
    p.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 for multi-process runs")
    p.add_argument("--num-processes", type=int, default=None, help="processes in a multi-process run")
    p.add_argument("--process-id", type=int, default=None, help="this process's index")
    return p


def main(argv: list[str] | None = None) -> int:
    from dsjax.config import ConfigError

    args = _parser().parse_args(argv)
    try:
        from train.config import build_config

        cfg = build_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        from train.loop import run_pretraining

        return run_pretraining(cfg, args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
