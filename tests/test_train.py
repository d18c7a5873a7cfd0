"""python -m train: config and CLI, data pipeline, the train step, outputs, exact resume."""

import json
import os
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsjax
from dsjax.tokenizer import ByteTokenizer, HFTokenizer
from eval.__main__ import main as eval_main
from eval.loss import checkpoint_loss
from dsjax import data as data_lib
from train.__main__ import main
from train.config import RunConfig, build_config
from train.stages import all_stages
from train.optim import decay_mask, make_optimizer
from dsjax.losses import cross_entropy, mtp_cross_entropy
from train.steps import TrainState, make_train_step, max_violation
from tests.conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A model small enough that a subprocess compiles and runs it in seconds.
SMALL = ["model.num_hidden_layers=2", "model.hidden_size=64", "model.intermediate_size=128",
         "model.num_attention_heads=2", "model.q_lora_rank=32", "model.kv_lora_rank=32",
         "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8", "model.v_head_dim=16",
         "model.n_routed_experts=8", "model.num_experts_per_tok=2", "model.moe_intermediate_size=32",
         "model.vocab_size=260", "train.batch_size=4", "train.seq_len=32", "train.log_every=1",
         "train.eval_every=50", "train.eval_batches=2", "train.warmup_steps=5", "data.max_bytes=300000"]


# ----------------------------------------------------------------------------- config / CLI
def test_default_config_is_the_tiny_preset_on_stdlib():
    cfg = build_config("pretrain", [])
    assert cfg.model.hidden_size == dsjax.load_model_config("tiny").hidden_size
    assert cfg.data.source == "stdlib" and cfg.data.tokenizer == "bytes"
    assert RunConfig().train.steps > 0  # every default lives in the dataclasses


def test_every_run_config_loads():
    names = [f[:-5] for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".yaml")]
    assert "pretrain" in names
    for name in names:
        build_config(name, [], all_stages())


def test_overrides_apply_with_types():
    cfg = build_config("pretrain", ["train.steps=7", "train.lr=1e-3", "model.num_hidden_layers=3",
                                    "mesh.data=1", "model.preset=small", "data.source=x.txt"])
    assert cfg.train.steps == 7 and cfg.train.lr == 1e-3 and cfg.model.num_hidden_layers == 3
    assert cfg.model.hidden_size == dsjax.load_model_config("small").hidden_size
    assert cfg.data.source == "x.txt"


@pytest.mark.parametrize("overrides, message", [
    (["train.stepz=3"], "unknown config key train.stepz"),
    (["train.steps=abc"], "train.steps='abc' is not a valid int"),
    (["train.steps=-1"], "train.steps must be positive"),
    (["model.n_group=3"], "n_routed_experts=16 is not divisible by n_group=3"),
    (["optim.lr=1"], "unknown config section 'optim'"),
    (["train.schedule=linear"], "train.schedule='linear' is not one of"),
    (["model.preset=nope"], "unknown model preset 'nope'"),
])
def test_bad_settings_exit_2_with_one_line(capsys, overrides, message):
    argv = ["--workdir", "/nonexistent/never-created"]
    for o in overrides:
        argv += ["--set", o]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for key in ("train.steps", "train.bias_update_speed", "data.tokenizer", "mesh.fsdp", "model.kv_lora_rank"):
        assert key in out


# ----------------------------------------------------------------------------- data
def _corpus(tmp_path, n_docs=40):
    d = tmp_path / "docs"
    d.mkdir()
    for i in range(n_docs):
        (d / f"doc{i}.txt").write_text(f"document {i} " + "lorem ipsum dolor sit amet " * (5 + i % 7))
    return str(d)


def test_cpu_peak_for_mfu_is_the_measured_matmul_throughput():
    from train.loop import matmul_tflops, peak_tflops

    peak = peak_tflops(jax.devices("cpu")[0])  # each of the process's CPU devices gets its share
    assert peak * jax.local_device_count(backend="cpu") == pytest.approx(matmul_tflops()), "measured once per process"
    assert 1e-3 < matmul_tflops() < 100, matmul_tflops()


def test_packing_shuffle_and_host_shards(tmp_path):
    cfg = data_lib.DataConfig(source=_corpus(tmp_path), file_pattern="*.txt", val_fraction=0.2)
    corpus = data_lib.load_corpus(cfg, ByteTokenizer())
    batch = next(data_lib.train_iterator(corpus.train, 16, 4, seed=0))
    assert batch["inputs"].shape == (4, 16) and batch["inputs"].dtype == np.int32
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    take = lambda it, n: np.stack([next(it)["inputs"] for _ in range(n)])
    a, b = data_lib.train_iterator(corpus.train, 16, 4, 0), data_lib.train_iterator(corpus.train, 16, 4, 0)
    np.testing.assert_array_equal(take(a, 3), take(b, 3))
    c = data_lib.train_iterator(corpus.train, 16, 4, 1)
    assert not np.array_equal(take(c, 3), take(data_lib.train_iterator(corpus.train, 16, 4, 0), 3))
    # Each host reads its own rows of every global batch: together, the one-host batch.
    stream = np.arange(5000, dtype=np.int32)  # every window distinct
    hosts = [data_lib.train_iterator(stream, 16, 2, 0, i, 2) for i in range(2)]
    single = data_lib.train_iterator(stream, 16, 4, 0)
    for _ in range(3):
        parts = [next(h)["inputs"] for h in hosts]
        assert not {tuple(r) for r in parts[0]} & {tuple(r) for r in parts[1]}
        assert sorted(map(tuple, np.concatenate(parts))) == sorted(map(tuple, next(single)["inputs"]))
    # The iterator position restores exactly.
    it = data_lib.train_iterator(corpus.train, 16, 4, 0)
    take(it, 2)
    state = it.get_state()
    expected = take(it, 2)
    again = data_lib.train_iterator(corpus.train, 16, 4, 0)
    again.set_state(state)
    np.testing.assert_array_equal(take(again, 2), expected)
    assert corpus.unigram_baseline() > 0


def test_jsonl_source_and_hf_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    path = tmp_path / "data.jsonl"
    rows = [{"text": f"the quick brown fox {i} jumps over the lazy dog"} for i in range(60)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([r["text"] for r in rows],
                            trainers.BpeTrainer(vocab_size=80, special_tokens=["[UNK]", "<s>", "</s>"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    hf = HFTokenizer(str(tmp_path))
    assert hf.bos_id == 1 and hf.eos_id == 2
    assert hf.decode(hf.encode("the lazy dog")) == "the lazy dog"
    corpus = data_lib.load_corpus(data_lib.DataConfig(source=str(path), val_fraction=0.2), hf)
    assert corpus.train.max() < hf.vocab_size and (corpus.train == hf.eos_id).sum() >= 1
    # The split follows each record's text: the same records elsewhere, in another order,
    # split the same way (keyed on path:line, a moved corpus changed its pretraining).
    moved = tmp_path / "elsewhere" / "moved.jsonl"
    moved.parent.mkdir()
    moved.write_text("\n".join(json.dumps(r) for r in reversed(rows)))
    again = data_lib.load_corpus(data_lib.DataConfig(source=str(moved), val_fraction=0.2), hf)
    assert 0 < len(corpus.val) < len(corpus.train)
    def held_out(c):
        docs = np.split(c.val, np.flatnonzero(c.val == hf.eos_id) + 1)
        return sorted(hf.decode(d.tolist()) for d in docs if len(d) > 1)

    assert held_out(again) == held_out(corpus)
    path.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(KeyError, match=r"data.jsonl:1: record has no field 'text'"):
        data_lib.load_corpus(data_lib.DataConfig(source=str(path)), hf)


# ----------------------------------------------------------------------------- the step
@pytest.fixture(scope="module")
def step_setup():
    cfg = build_config("pretrain", SMALL + ["train.steps=100", "train.bias_update_speed=0.01"])
    model = dsjax.Transformer(cfg.model)
    tokens = jax.random.randint(jax.random.key(0), (4, 33), 2, 200)
    boxed = model.init(jax.random.key(1), tokens[:, :-1])
    variables = dsjax.unbox(boxed)
    tx, schedule = make_optimizer(cfg.train, boxed["params"])
    state = TrainState.start(variables, tx)
    step = jax.jit(make_train_step(model, tx, cfg.train, schedule))
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    return cfg, model, boxed, state, step, batch


def test_bias_moves_by_gamma_sign_and_is_not_trained(step_setup):
    cfg, model, _, state, step, batch = step_setup
    new, metrics = step(state, batch)
    out = model.apply({"params": state.params, "moe_bias": state.moe_bias}, batch["inputs"])
    loads = out.expert_loads  # [L_moe, E] over the whole batch
    expected = state.moe_bias["moe_layers"]["ffn"]["gate"]["bias"] + 0.01 * jnp.sign(
        loads.mean(-1, keepdims=True) - loads)
    np.testing.assert_allclose(new.moe_bias["moe_layers"]["ffn"]["gate"]["bias"], expected, atol=1e-7)
    mtp_loads = out.mtp_expert_loads[0]
    np.testing.assert_allclose(new.moe_bias["mtp_0"]["block"]["ffn"]["gate"]["bias"],
                               0.01 * jnp.sign(mtp_loads.mean() - mtp_loads), atol=1e-7)
    # The optimizer state holds nothing for the bias, and the gradient tree has no bias.
    assert "moe_bias" not in jax.tree_util.keystr(jax.tree_util.tree_flatten_with_path(new.opt_state)[0])
    np.testing.assert_allclose(metrics["max_vio"], max_violation(loads), rtol=1e-6)
    assert float(metrics["loss"]) > float(metrics["ce"])


def test_bias_update_stops_late_in_training(step_setup):
    cfg, model, _, state, step, batch = step_setup
    late = state.replace(step=jnp.asarray(int(0.96 * cfg.train.steps), jnp.int32))
    new, _ = step(late, batch)
    chex.assert_trees_all_close(new.moe_bias, state.moe_bias, atol=0, rtol=0)


def test_weight_decay_skips_norms_even_when_stacked(step_setup):
    _, _, boxed, _, _, _ = step_setup
    mask = decay_mask(boxed["params"])
    assert mask["moe_layers"]["attn"]["wkv_b"] and mask["embed"]
    assert not mask["moe_layers"]["attn_norm"]["weight"] and not mask["norm"]["weight"]
    assert not mask["moe_layers"]["attn"]["kv_norm"]["weight"]


def test_mtp_loss_targets_t_plus_2():
    V = 7
    targets = jnp.asarray([[1, 2, 3, 4, 5]])
    # Logits that put all mass on token t+2 (= targets[t+1]) score ~0 loss.
    logits = jnp.full((1, 1, 5, V), -30.0)
    for t in range(4):
        logits = logits.at[0, 0, t, targets[0, t + 1]].set(30.0)
    assert float(mtp_cross_entropy(logits, targets)) < 1e-6
    assert float(cross_entropy(logits[0], targets)) > 10  # the same logits are wrong for t+1


# ----------------------------------------------------------------------------- real runs
def _train_cmd(workdir, *extra):
    cmd = [sys.executable, "-m", "train", "--workdir", str(workdir)]
    for o in SMALL + list(extra):
        cmd += ["--set", o]
    return cmd


def _env():
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1))


def _losses(workdir):
    recs = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def test_run_outputs_eval_loss_and_exact_resume_after_sigkill(tmp_path, capsys):
    extra = ["train.steps=150", "train.checkpoint_every=10", "train.sample_tokens=0"]
    full = tmp_path / "full"
    done = subprocess.run(_train_cmd(full, *extra, "train.sample_tokens=16"), cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "sample:" in done.stdout and "validation loss" in done.stdout
    records = [json.loads(line) for line in open(full / "metrics.jsonl")]
    for key in ("step", "loss", "ce", "mtp_loss", "balance_loss", "lr", "grad_norm", "tokens_per_s", "mfu",
                "max_vio"):
        assert key in records[0], key
    # MFU against the CPU's measured matmul peak: a fraction, not the 0.71 a nominal 0.1 TFLOP/s gave.
    assert all(0 < r["mfu"] < 1 for r in records if "mfu" in r and r["tokens_per_s"] > 0)
    assert any("val_loss" in r for r in records)
    assert (full / "plots" / "loss.png").stat().st_size > 10_000
    assert (full / "config.yaml").exists() and os.listdir(full / "checkpoints")
    # The implementation choices the run compiled with, resolved for its devices (a CPU's).
    written = dsjax.checkpoint.read_run_config(str(full))["model"]
    assert all(written[k] != "auto" for k in ("attn_kernel", "moe_impl", "layer_loop")), written

    # python -m eval loss: the logged validation loss again, and the same weights under FP8.
    logged = [r["val_loss"] for r in records if "val_loss" in r][-1]
    got = checkpoint_loss(str(full))
    assert got["step"] == 150 and got["batches"] == 2 and got["tokens"] == 2 * 4 * 32
    assert abs(got["val_loss"] - logged) < 1e-5, (got, logged)
    fp8 = checkpoint_loss(str(full), overrides=["model.precision=fp8"])
    assert 1e-6 < abs(fp8["val_loss"] - logged) < 0.01 * logged, (fp8, logged)
    assert eval_main(["loss", "--checkpoint", str(full), "--set", "model.hidden_size=32"]) == 2
    assert eval_main(["loss", "--checkpoint", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("error: --set model.hidden_size: changes the trained model"), err
    assert err[1] == f"error: {tmp_path / 'nope'} is not a training workdir (no config.yaml)", err

    # One workdir through every way a run stops, each start resuming the one before:
    # SIGKILL between checkpoints, SIGTERM (preemption), SIGKILL while an async checkpoint
    # is being written. The finished run has the uninterrupted run's losses bit for bit.
    run = tmp_path / "run"
    cmd = _train_cmd(run, *extra)
    proc = _start_until(cmd, lambda: _checkpoints(run) and max(_checkpoints(run)) >= 20 and
                        max(_losses(run), default=0) >= max(_checkpoints(run)) + 3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    restart, killed_at = max(_checkpoints(run)), max(_losses(run))  # steps after restart: run again

    # Preemption: SIGTERM mid-run saves the current step (not a multiple of checkpoint_every)
    # and exits 0 promptly. Only the restarted run logs steps past killed_at: its signal
    # handlers are in place by then.
    proc = _start_until(cmd, lambda: max(_losses(run), default=0) >= killed_at + 10, stdout=subprocess.PIPE,
                        text=True)
    proc.send_signal(signal.SIGTERM)
    sent = time.time()
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and time.time() - sent < 30, (proc.returncode, out[-2000:])
    assert f"at step {restart}\n" in out  # resumed from the last complete checkpoint
    saved = max(_checkpoints(run))
    assert saved == max(_losses(run)) >= killed_at + 10, saved  # the step it stopped at, between checkpoints
    assert f"SIGTERM: saved step {saved}" in out

    # SIGKILL while an async checkpoint is being written (a checkpoint every step): the
    # partial one is never used; the next start resumes from the last complete one.
    torn = _train_cmd(run, *extra, "train.checkpoint_every=1")
    for attempt in range(5):
        past, stale = max(_losses(run)), _partials(run)
        proc = _start_until(torn, lambda: _partials(run) - stale and max(_losses(run), default=0) >= past + 3)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if _partials(run) - stale:
            break  # killed mid-write: a partial checkpoint is on disk
    else:
        pytest.fail("never caught an async checkpoint write in progress")
    complete = max(_checkpoints(run))
    resumed = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"at step {complete}\n" in resumed.stdout  # not the partial one
    a, b = _losses(full), _losses(run)
    assert sorted(a) == sorted(b) == list(range(1, 151))
    assert a == b  # bit for bit
    again = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "already trained to step 150" in again.stdout


def _checkpoints(workdir):
    d = workdir / "checkpoints"
    return [int(n) for n in os.listdir(d) if n.isdigit()] if d.exists() else []


def _partials(workdir):
    """Checkpoint folders being written (orbax's temporary names)."""
    d = workdir / "checkpoints"
    return {n for n in os.listdir(d) if not n.isdigit()} if d.exists() else set()


def _start_until(cmd, ready, **output):
    """Starts a training subprocess and returns it, still running, once ready() holds."""
    output = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, **output}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), **output)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before the signal"
    return proc


@pytest.mark.parametrize("dtype, remat", [("bfloat16", "dots"), ("float32", "full")])
def test_bf16_compute_and_remat_policies_train(step_setup, dtype, remat):
    cfg, _, boxed, state, step, batch = step_setup
    variant = dsjax.Transformer(cfg.model.replace(dtype=dtype, remat_policy=remat))
    tx, schedule = make_optimizer(cfg.train, boxed["params"])
    new, metrics = jax.jit(make_train_step(variant, tx, cfg.train, schedule))(state, batch)
    _, ref = step(state, batch)
    assert jax.tree.leaves(new.params)[0].dtype == jnp.float32  # float32 master weights
    tol = 0.02 if dtype == "bfloat16" else 1e-5
    np.testing.assert_allclose(metrics["ce"], ref["ce"], rtol=tol)
