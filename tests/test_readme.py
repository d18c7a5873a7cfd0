"""README.md: its first commands are the two the project promises, `.ci/run` runs the
second, every Python snippet runs as written (in order, in a fresh directory), and its
`python -m train --dry-run` and `--help` commands run as written."""

import os
import re
import shlex
import subprocess
import sys

import pytest

from tests.conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md")).read()


def _blocks(language):
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.S | re.M)


def test_the_first_commands_install_and_run_the_main_job_then_the_tests():
    first = _blocks("bash")[0].strip().splitlines()
    assert first == ["pip install -r requirements.txt && python -m train",
                     "pip install -q -r requirements-test.txt && python -m pytest -q tests"]
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert first[1] in ci


def test_every_python_snippet_runs_as_written(tmp_path):
    snippets = _blocks("python")
    assert len(snippets) >= 2
    script = "\n".join(f"# --- README snippet {i + 1}\n{code}" for i, code in enumerate(snippets))
    (tmp_path / "readme_snippets.py").write_text(script)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(2),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "readme_snippets.py"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "tiny_hf" / "config.json").exists()


def _train_commands(flag):
    """The README's `python -m train` command lines (continuations joined) holding `flag`."""
    lines = []
    for block in _blocks("bash"):
        for line in re.sub(r"\\\n\s*", "", block).splitlines():
            line = line.split("#")[0].strip()
            if line.startswith("python -m train") and flag in shlex.split(line):
                lines.append(line)
    return lines


def _run_train(argv, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(2),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    assert argv[0] == "python"
    return subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_memory_plan_commands_run_as_written(tmp_path):
    """Each `--dry-run` plan in the README fits as the README says it does (exit 0, 'fits').
    A `--topology` line compiles for a TPU slice for minutes (test_tpu_compile.py compiles
    the tiny run that way): here its flags and keys are checked with --show-config."""
    commands = _train_commands("--dry-run")
    assert any("--topology" not in c for c in commands) and any("--topology" in c for c in commands)
    for command in commands:
        argv = shlex.split(command)
        if "--topology" in argv:
            i = argv.index("--topology")
            argv = [a for a in argv[:i] + argv[i + 2:] if a != "--dry-run"] + ["--show-config"]
        done = _run_train(argv, tmp_path)
        assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        if "--show-config" not in argv:
            assert done.stdout.strip().splitlines()[-1] == "fits", done.stdout


@pytest.mark.parametrize("command", _train_commands("--help"))
def test_the_help_commands_run_as_written(command, tmp_path):
    done = _run_train(shlex.split(command), tmp_path)
    assert done.returncode == 0 and "train.steps" in done.stdout, done.stderr[-2000:]
