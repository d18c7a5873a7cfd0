"""dsjax/impl.py: implementation choices resolved for the platform a program is compiled
for, the CPU wing kept apart from the core (no core module imports it; a TPU or GPU
program holds none of its kernels or barriers), and the core's reference forms giving the
wing's logits where its kernels cannot build."""

import ast
import dataclasses
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

import dsjax
from dsjax import decoding, impl
from dsjax.config import config_from_dict
from dsjax.cpu import kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AUTO_FIELDS = ("attn_kernel", "moe_impl", "layer_loop", "matmul_impl", "fp8_gemm")


def _modules(package: str):
    for folder, _, files in os.walk(os.path.join(ROOT, package)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                yield os.path.relpath(path, ROOT), ast.parse(open(path).read())


def _imports(tree) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_no_core_module_imports_the_cpu_wing():
    offenders = []
    for path, tree in _modules("dsjax"):
        if path.startswith(os.path.join("dsjax", "cpu")) or path == os.path.join("dsjax", "__init__.py"):
            continue
        if any(name == "dsjax.cpu" or name.startswith("dsjax.cpu.") for name in _imports(tree)):
            offenders.append(path)
    assert offenders == []
    init = dict(_modules("dsjax"))[os.path.join("dsjax", "__init__.py")]
    assert "dsjax.cpu" in _imports(init)  # the one place that registers it


def test_the_host_backend_decides_nothing():
    for path, tree in _modules("dsjax"):
        calls = [node for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr == "default_backend"]
        assert not calls, f"{path} reads jax.default_backend()"


@pytest.mark.parametrize("preset", ["tiny", "deepseek-v3-671b"])
def test_resolve_leaves_no_auto_and_round_trips_through_yaml(preset):
    cfg = dsjax.load_model_config(preset)
    assert {getattr(cfg, name) for name in AUTO_FIELDS} == {"auto"}
    for platform in impl.PLATFORMS:
        resolved = impl.resolve(cfg, platform)
        assert "auto" not in {getattr(resolved, f.name) for f in dataclasses.fields(resolved)}
        assert impl.resolve(resolved, platform) == resolved
        text = yaml.safe_dump({f.name: getattr(resolved, f.name) for f in dataclasses.fields(resolved)
                               if f.name in impl.IMPL_FIELDS})
        assert config_from_dict({**{k: v for k, v in dataclasses.asdict(cfg).items() if k not in impl.IMPL_FIELDS},
                                 **yaml.safe_load(text)}) == resolved
    cpu, tpu = impl.resolve(cfg, "cpu"), impl.resolve(cfg, "tpu")
    assert (cpu.attn_kernel, cpu.moe_impl, cpu.matmul_impl, cpu.fp8_gemm) == ("cpu", "cpu", "cpu", "emulated")
    assert (tpu.attn_kernel, tpu.moe_impl, tpu.matmul_impl, tpu.layer_loop, tpu.fp8_gemm) == (
        "splash", "ragged", "xla", "scan", "native")
    with pytest.raises(ValueError, match="platform"):
        impl.resolve(cfg, "metal")


def test_a_run_directory_is_read_with_its_platform_choices_made_again(tmp_path):
    """A run's config.yaml holds the choices made for the devices that trained it; a reader
    on other devices gets them back on 'auto' (dsjax.impl.unresolved), the rest kept."""
    from dsjax.checkpoint import run_model_config

    trained = impl.resolve(dsjax.load_model_config("tiny").replace(attn_impl="absorb", remat_policy="full"), "cpu")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"stage": "pretrain", "model": dataclasses.asdict(trained)}))
    read = run_model_config(str(tmp_path))
    assert {getattr(read, name) for name in AUTO_FIELDS} == {"auto"}
    assert (read.attn_impl, read.remat_policy) == ("absorb", "full")
    tpu = impl.resolve(read, "tpu")
    assert (tpu.attn_kernel, tpu.moe_impl, tpu.matmul_impl) == ("splash", "ragged", "xla")


def test_older_value_names_still_load():
    cfg = dsjax.load_model_config("tiny")
    for field, values in (("attn_kernel", ("auto", "dense", "blockwise", "cudnn", "splash")),
                          ("moe_impl", ("auto", "dense", "ragged", "blocked", "gather")),
                          ("layer_loop", ("auto", "scan", "unroll")), ("attn_impl", ("naive", "absorb"))):
        for value in values:
            assert impl.resolve(cfg.replace(**{field: value}), "cpu") is not None


def test_platform_of_reads_the_devices():
    assert impl.platform_of() == "cpu"
    assert impl.platform_of(jax.devices()) == "cpu"
    assert impl.platform_of(jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])) == "cpu"


def _tiny():
    cfg = dsjax.load_model_config("tiny")
    tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, cfg.vocab_size)
    variables = dsjax.Transformer(cfg).init(jax.random.key(0), tokens)
    return cfg, tokens, variables


def test_a_program_resolved_for_a_tpu_holds_nothing_of_the_cpu_wing():
    # Lowered on this CPU host, a TPU-resolved config's training gradient and decoding loop
    # select no wing implementation: no native kernel call and no CPU-only barrier.
    cfg, tokens, variables = _tiny()
    for platform in ("tpu", "gpu"):
        model = dsjax.Transformer(impl.resolve(cfg.replace(attn_impl="absorb"), platform))
        loss = lambda p: model.apply({**variables, "params": p}, tokens).logits.mean()  # noqa: E731
        text = jax.jit(jax.grad(loss)).lower(variables["params"]).as_text()
        assert "dsjax_" not in text and "optimization_barrier" not in text
        plain = lambda v: decoding._plain(model, v, tokens[:, :8], jnp.asarray([8, 5]),  # noqa: E731
                                          jax.random.key(0), jnp.float32(1.0), max_new_tokens=3, greedy=True,
                                          top_k=0, top_p=1.0, stop_tokens=())
        text = jax.jit(plain).lower(variables).as_text()
        assert "dsjax_" not in text
    # the same on the CPU holds the wing's kernels, where they build
    if kernels.available():
        model = dsjax.Transformer(impl.resolve(cfg, "cpu"))
        loss = lambda p: model.apply({**variables, "params": p}, tokens).logits.mean()  # noqa: E731
        assert "dsjax_" in jax.jit(jax.grad(loss)).lower(variables["params"]).as_text()


@pytest.fixture
def no_compiler(tmp_path, monkeypatch):
    """The CPU wing as it runs where no C++ compiler exists: its kernels unavailable."""
    saved = dict(kernels._state)
    kernels._state.clear()
    monkeypatch.setenv("DSJAX_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler-dsjax")
    jax.clear_caches()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield
    kernels._state.clear()
    kernels._state.update(saved)
    jax.clear_caches()


def _logits_and_tokens(cfg, tokens, variables):
    model = dsjax.Transformer(cfg)
    gen = dsjax.generate(model.clone(cfg=cfg.replace(attn_impl="absorb")), variables, tokens[:, :8], [8, 5],
                         max_new_tokens=4)
    return np.asarray(model.apply(variables, tokens).logits), np.asarray(gen.tokens), np.asarray(gen.logprobs)


@pytest.mark.parametrize("built", [False, True], ids=["no_compiler", "kernels_built"])
def test_the_model_gives_the_reference_logits_with_or_without_the_kernels(built, request):
    """The CPU wing's forms (native kernels where they build, the wing's XLA forms where no
    compiler exists) give the reference forms' logits, greedy tokens and logprobs."""
    if not built:
        request.getfixturevalue("no_compiler")
        assert not kernels.available()
    elif not kernels.available():
        pytest.skip(reason="no C++ compiler: the CPU wing's native kernels cannot build here")
    cfg, tokens, variables = _tiny()
    logits, gen, logprobs = _logits_and_tokens(cfg, tokens, variables)
    reference = cfg.replace(attn_kernel="dense", moe_impl="dense", matmul_impl="xla", layer_loop="scan")
    ref_logits, ref_gen, ref_logprobs = _logits_and_tokens(reference, tokens, variables)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5)
    np.testing.assert_array_equal(gen, ref_gen)
    np.testing.assert_allclose(logprobs, ref_logprobs, atol=1e-5)
