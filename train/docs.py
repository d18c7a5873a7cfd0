"""`python -m train.docs [--check] [OUT]` writes docs/config.md: every key of every run config
section with its type, its dataclass default, the value the default run (`python -m train`,
configs/pretrain.yaml) gives it where that differs, and its description from the
dataclass docstring's `Attributes:` section.

Generic over the dataclasses: nested dataclass fields (`model.rope_scaling`) and tuples of
dataclasses (`tuple[X, ...]`) list their own keys below them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import types
import typing
from typing import Any

from train.config import build_config, section_classes
from train.stages import all_stages

DEFAULT_RUN = "pretrain"
_ENTRY = re.compile(r"^(\s*)([A-Za-z_][\w ./]*?):\s+(.*)$")


@dataclasses.dataclass(frozen=True)
class Key:
    """One row of the reference: a dotted key and what documents it."""

    name: str          # e.g. 'train.steps', 'model.rope_scaling.factor', 'grpo.sources[].name'
    type: str
    default: str       # the dataclass default, rendered
    run: str | None    # the default run's value where it differs from `default`, rendered
    doc: str


def docstring_attributes(cls: type) -> tuple[str, dict[str, str]]:
    """(summary, {field: description}) from a Google-style docstring.

    An entry may name several fields (`lr / warmup_steps: ...`) or hold a second one after a
    semicolon (`dtype: ...; param_dtype: ...`). A field without an entry of its own takes the
    description of the entry that mentions it (`step_decay_every` in `lr`'s)."""
    text = (cls.__doc__ or "").expandtabs()
    head, _, attrs = text.partition("Attributes:")
    summary = " ".join(head.split())
    names = {f.name for f in dataclasses.fields(cls)}
    entries: list[tuple[list[str], str]] = []
    indent = None
    for line in attrs.splitlines():
        m = _ENTRY.match(line)
        if m and (indent is None or len(m.group(1)) <= indent) and \
                all(n.strip() in names for n in m.group(2).split("/")):
            indent = len(m.group(1))
            entries.append(([n.strip() for n in m.group(2).split("/")], m.group(3).strip()))
        elif entries and line.strip():
            keys, doc = entries[-1]
            entries[-1] = (keys, f"{doc} {line.strip()}")
    docs: dict[str, str] = {}
    for keys, doc in entries:
        parts = re.split(r";\s+([a-z_]\w*):\s+", doc)
        own = parts[0]
        for name, extra in zip(parts[1::2], parts[2::2]):
            if name in names:
                docs.setdefault(name, extra.strip())
            else:
                own = f"{own}; {name}: {extra}"
        for k in keys:
            docs.setdefault(k, own.strip())
    for name in names - set(docs):
        for keys, doc in entries:
            if re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", doc):
                docs[name] = f"see `{keys[0]}`: {doc}"
                break
    return summary, docs


def type_name(tp: Any) -> str:
    """`int`, `str | None`, `tuple[PromptSource, ...]`, ..."""
    if tp is type(None):
        return "None"
    if tp is Ellipsis:
        return "..."
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(a) for a in typing.get_args(tp))}]"
    return getattr(tp, "__name__", str(tp))


def nested_dataclass(tp: Any) -> tuple[type | None, str]:
    """The dataclass a field holds (itself, optional, or a tuple of them) and the key suffix
    its own keys take ('' or '[]'); (None, '') for a plain field."""
    if dataclasses.is_dataclass(tp):
        return tp, ""
    args = [a for a in typing.get_args(tp) if a is not type(None) and a is not Ellipsis]
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return nested_dataclass(args[0])
    if origin in (tuple, list) and len(args) == 1 and dataclasses.is_dataclass(args[0]):
        return args[0], "[]"
    return None, ""


def render_value(value: Any) -> str:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    return f"`{value!r}`"


def field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def section_keys(prefix: str, cls: type, run: Any = dataclasses.MISSING) -> list[Key]:
    """Every key of dataclass `cls` under `prefix`, recursing into nested dataclasses;
    `run` is the default run's instance (MISSING inside a tuple's items: no run column)."""
    hints = typing.get_type_hints(cls)
    _, docs = docstring_attributes(cls)
    keys = []
    for f in dataclasses.fields(cls):
        default = field_default(f)
        shown = "required" if default is dataclasses.MISSING else render_value(default)
        value = getattr(run, f.name) if run is not dataclasses.MISSING else dataclasses.MISSING
        differs = value is not dataclasses.MISSING and (default is dataclasses.MISSING or value != default)
        keys.append(Key(f"{prefix}.{f.name}", type_name(hints[f.name]), shown,
                        render_value(value) if differs else None, docs.get(f.name, "")))
        inner, suffix = nested_dataclass(hints[f.name])
        if inner is not None:
            inner_run = value if suffix == "" and value is not dataclasses.MISSING and value is not None \
                else dataclasses.MISSING
            keys += section_keys(f"{prefix}.{f.name}{suffix}", inner, inner_run)
    return keys


def all_keys() -> dict[str, tuple[type, list[Key]]]:
    """{section: (its dataclass, its keys)}: the base sections, then each stage's (as
    train.stages.all_stages declares them)."""
    stages = all_stages()
    run = build_config(DEFAULT_RUN, [], stages)
    return {s: (cls, section_keys(s, cls, getattr(run, s))) for s, cls in section_classes(stages).items()}


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def render() -> str:
    """docs/config.md."""
    lines = [
        "# Run configuration keys",
        "",
        "<!-- Generated by `python -m train.docs` from the config dataclasses; do not edit by hand. -->",
        "",
        "`python -m train` reads a run config (`configs/<stage>.yaml`, or `--config NAME_OR_PATH`)",
        "over the dataclass defaults below, then `--set section.key=value` overrides. In a YAML",
        "file a key is `section: {key: value}`; nested keys (`model.rope_scaling.factor`) are",
        "mappings inside it, and `key[].sub` names a field of each item of a list. `python -m train",
        "STAGE --help` lists the values a stage's run uses; `--show-config` prints the whole",
        "resolved config.",
        "",
        f"The *`python -m train`* column gives the value of the default run (`configs/{DEFAULT_RUN}.yaml`)",
        "where it differs from the dataclass default. The model section's defaults are DeepSeek-V3's",
        "(`ModelConfig`); `model.preset` (one of `configs/models/`, default run: `tiny`) starts",
        "from a preset instead, which the other model keys then change.",
        "",
    ]
    for section, (cls, keys) in all_keys().items():
        summary, _ = docstring_attributes(cls)
        lines += [f"## `{section}`: `{cls.__name__}` ({cls.__module__})", ""]
        if summary:
            lines += [_cell(summary), ""]
        lines += [f"| key | type | default | `python -m train` | description |",
                  "| --- | --- | --- | --- | --- |"]
        for k in keys:
            lines.append(f"| `{k.name}` | `{_cell(k.type)}` | {_cell(k.default)} | {_cell(k.run or '')} | {_cell(k.doc)} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.docs", description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?", default=os.path.join("docs", "config.md"),
                   help="where to write it (default: docs/config.md)")
    p.add_argument("--check", action="store_true", help="exit 1 if OUT differs from what would be written")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        current = open(args.out).read() if os.path.exists(args.out) else ""
        if current != text:
            print(f"{args.out} is stale: run python -m train.docs", file=sys.stderr)
            return 1
        return 0
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
