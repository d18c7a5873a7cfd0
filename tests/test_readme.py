"""README.md: its first commands are the two the project promises, `.ci/run` runs the
second, and every Python snippet runs as written (in order, in a fresh directory)."""

import os
import re
import subprocess
import sys

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
