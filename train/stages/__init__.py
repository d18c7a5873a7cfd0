"""The training stages, one module each; every module here ends with
`STAGE = train.loop.StageSpec(...)` and is found by `all_stages()` (no list to keep).
Adding a stage is one module here plus its run config, configs/<default_config>.yaml."""

from __future__ import annotations

import importlib
import pkgutil

from train.loop import StageSpec


def all_stages() -> dict[str, StageSpec]:
    """{name: StageSpec} of every module of this package, pretraining first, then by name.
    Raises TypeError for a module that declares no StageSpec, ValueError for two stages of
    one name or one section."""
    specs: list[StageSpec] = []
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        spec = getattr(module, "STAGE", None)
        if not isinstance(spec, StageSpec):
            raise TypeError(f"{module.__name__} declares no STAGE = StageSpec(...)")
        specs.append(spec)
    specs.sort(key=lambda s: (s.name != "pretrain", s.name))
    out: dict[str, StageSpec] = {}
    sections: set[str] = set()
    for spec in specs:
        if spec.name in out or (spec.section is not None and spec.section in sections):
            raise ValueError(f"two stages declare the name {spec.name!r} or the section {spec.section!r}")
        out[spec.name] = spec
        if spec.section is not None:
            sections.add(spec.section)
    return out
