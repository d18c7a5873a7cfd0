"""docs/config.md is generated (python -m train.docs) and covers every config key."""

import dataclasses
import os
import typing

from dsjax.config import RopeScaling
from train import docs
from train.config import BASE_SECTIONS, build_config, section_classes
from train.stages import all_stages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATH = os.path.join(ROOT, "docs", "config.md")


def test_docs_config_md_is_current():
    with open(PATH) as f:
        assert f.read() == docs.render(), "docs/config.md is stale: run python -m train.docs"
    assert docs.main(["--check", PATH]) == 0


def test_every_field_has_a_documented_row():
    text = open(PATH).read()
    rows = {line.split("|")[1].strip().strip("`"): line for line in text.splitlines() if line.startswith("| `")}
    sections = section_classes(all_stages())
    assert set(sections) == set(build_config(None, [], all_stages()).sections()) == \
        set(BASE_SECTIONS) | {s.section for s in all_stages().values() if s.section}
    for section, cls in sections.items():
        for f in dataclasses.fields(cls):
            assert f"{section}.{f.name}" in rows, f"{section}.{f.name} missing from docs/config.md"
    for f in dataclasses.fields(RopeScaling):
        assert f"model.rope_scaling.{f.name}" in rows
    for key, line in rows.items():
        assert line.rstrip().split("|")[-2].strip(), f"{key} has no description (its dataclass docstring's Attributes)"
    # The default run's values where they differ from the dataclass defaults (configs/pretrain.yaml).
    assert rows["train.steps"].split("|")[3:5] == [" `500` ", " `800` "]
    assert rows["train.batch_size"].split("|")[4].strip() == ""
    assert rows["model.hidden_size"].split("|")[3:5] == [" `7168` ", " `128` "]


def test_nested_and_tuple_dataclass_fields_are_listed():
    @dataclasses.dataclass(frozen=True)
    class Source:
        """Attributes:
          name: what it is.
          weight: how much it counts.
        """

        name: str
        weight: float = 1.0

    @dataclasses.dataclass(frozen=True)
    class Section:
        """A section.

        Attributes:
          sources: the sources; first: the first one (optional).
          n / m: two sizes, each
            on two lines.
          k: more than `limit` of them.
        """

        sources: tuple[Source, ...] = ()
        first: Source | None = None
        n: int = 1
        m: int | None = 2
        k: int = 3
        limit: int = 4

    run = Section(sources=(Source("a"),), first=Source("b", 2.0), n=5)
    keys = {k.name: k for k in docs.section_keys("s", Section, run)}
    assert list(keys) == ["s.sources", "s.sources[].name", "s.sources[].weight", "s.first", "s.first.name",
                          "s.first.weight", "s.n", "s.m", "s.k", "s.limit"]
    assert keys["s.sources"].type == "tuple[Source, ...]" and keys["s.m"].type == "int | None"
    assert keys["s.sources[].name"].default == "required" and keys["s.sources[].name"].run is None
    assert keys["s.first.weight"].run == "`2.0`" and keys["s.n"].run == "`5`" and keys["s.m"].run is None
    assert keys["s.sources"].doc == "the sources" and keys["s.first"].doc == "the first one (optional)."
    assert keys["s.n"].doc == keys["s.m"].doc == "two sizes, each on two lines."
    assert keys["s.limit"].doc.startswith("see `k`")
    assert keys["s.sources[].weight"].doc == "how much it counts."
    assert typing.get_type_hints(Section)  # resolvable, as the generator needs
