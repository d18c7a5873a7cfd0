"""pyproject.toml: every package and every configs/ YAML file is installed, the extras match
requirements-test.txt, and the configs are found from any working directory. Nothing is
built or installed here (that needs the network); the checks read pyproject.toml."""

import fnmatch
import glob
import os
import subprocess
import sys
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setuptools() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _package_dir(package: str, package_dirs: dict[str, str]) -> str:
    """Where setuptools reads `package` from (its longest package-dir prefix, else the root)."""
    parts = package.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in package_dirs:
            return os.path.join(package_dirs[prefix], *parts[n:])
    return os.path.join(*parts)


def test_every_package_directory_is_installed():
    tool = _setuptools()["tool"]["setuptools"]
    packages, package_dirs = tool["packages"], tool.get("package-dir", {})
    where = {_package_dir(p, package_dirs) for p in packages}
    code = set()
    for init in glob.glob(os.path.join(ROOT, "*", "**", "*.py"), recursive=True):
        rel = os.path.relpath(os.path.dirname(init), ROOT)
        if rel.split(os.sep)[0] not in ("tests", "bench", "build", "examples", "docs"):
            code.add(rel)
    assert code, "no package directories found"
    assert code <= where, f"directories with Python modules that pyproject.toml does not install: {code - where}"
    for top in ("dsjax", "sharding", "train", "eval"):
        assert os.path.isfile(os.path.join(ROOT, top, "__init__.py")), top
        assert top in packages


def test_every_config_yaml_is_package_data():
    tool = _setuptools()["tool"]["setuptools"]
    package_dirs, data = tool.get("package-dir", {}), tool.get("package-data", {})
    shipped = set()
    for package in tool["packages"]:
        d = _package_dir(package, package_dirs)
        for pattern in data.get(package, []):
            shipped |= {os.path.relpath(f, ROOT) for f in glob.glob(os.path.join(ROOT, d, pattern))}
    yamls = {os.path.relpath(f, ROOT) for f in glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True)}
    assert yamls and yamls <= shipped, f"configs/ files that pyproject.toml does not ship: {yamls - shipped}"
    # They land in dsjax/configs/, where dsjax.config looks once installed.
    assert _package_dir("dsjax.configs", package_dirs) == "configs"
    assert all(fnmatch.fnmatch("x.yaml", p) for p in data["dsjax.configs"])


def test_the_kernel_source_is_package_data():
    # dsjax/cpu/kernels.py compiles dsjax/cpu/csrc/*.cc where it runs: an install must carry it.
    from dsjax.cpu import kernels

    data = _setuptools()["tool"]["setuptools"]["package-data"]["dsjax.cpu"]
    rel = os.path.relpath(kernels.SOURCE, os.path.join(ROOT, "dsjax", "cpu"))
    assert os.path.isfile(kernels.SOURCE)
    assert any(fnmatch.fnmatch(rel, p) for p in data)


def test_dependencies_and_extras_follow_the_requirements_files():
    project = _setuptools()
    assert "dependencies" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["dependencies"] == {"file": ["requirements.txt"]}
    lines = [line.strip() for line in open(os.path.join(ROOT, "requirements-test.txt"))]
    added = [line for line in lines if line and not line.startswith(("#", "-r"))]
    extras = project["project"]["optional-dependencies"]
    assert extras["test"] == added
    assert set(extras["hf"]) <= set(extras["test"])
    assert {r.split("=")[0].split(">")[0] for r in extras["hf"]} == {"torch", "transformers", "accelerate"}


def test_configs_are_found_where_pip_install_puts_them(tmp_path):
    """A non-editable install puts configs/ at dsjax/configs/; dsjax.config looks there first."""
    from dsjax.config import _CONFIG_DIR, _config_dir

    pkg = tmp_path / "site-packages" / "dsjax"
    (pkg / "configs" / "models").mkdir(parents=True)
    assert _config_dir(str(pkg)) == str(pkg / "configs")
    assert _config_dir(str(tmp_path / "checkout" / "dsjax")) == str(tmp_path / "checkout" / "configs")
    # This checkout: configs/ beside the package.
    assert _CONFIG_DIR == os.path.join(ROOT, "configs")


def test_python_m_train_runs_from_another_directory(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, "-m", "train", "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "train.steps" in done.stdout
    # --dry-run reads configs/pretrain.yaml and the tiny preset: found from here too.
    done = subprocess.run([sys.executable, "-m", "train", "--dry-run", "--devices", "1"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "fits" in done.stdout
    assert not os.listdir(tmp_path)  # a dry run writes nothing
