"""The pretraining loop: set-up, resume, steps, logging, evaluation, checkpoints, sample."""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from dsjax.checkpoint import Checkpointer
from dsjax.config import ConfigError
from dsjax.generate import generate
from dsjax.model import Transformer, unbox
from dsjax.tokenizer import load_tokenizer
from sharding.mesh import initialize_distributed, make_mesh
from sharding.rules import activation_rules
from train import data as data_lib
from train.optim import make_optimizer
from train.report import MetricsLog, plot_curves
from train.steps import TrainState, flops_per_token, make_eval_step, make_train_step, state_shardings


_PEAK_TFLOPS = (("v6", 918.0), ("v5p", 459.0), ("v5 lite", 197.0), ("v5e", 197.0), ("v4", 275.0),
                ("h200", 989.0), ("h100", 989.0), ("a100", 312.0), ("cpu", 0.1))


def peak_tflops(device) -> float:
    """Dense bf16 peak of one device (TFLOP/s); CPUs get a nominal 0.1."""
    kind = f"{device.platform} {getattr(device, 'device_kind', '')}".lower()
    for key, value in _PEAK_TFLOPS:
        if key in kind:
            return value
    return 0.1


def run_pretraining(cfg, args) -> int:
    try:
        initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    tcfg = cfg.train
    workdir = os.path.abspath(args.workdir)
    lead = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    if lead:
        with open(os.path.join(workdir, "config.yaml"), "w") as f:
            yaml.safe_dump(dataclasses.asdict(cfg), f, sort_keys=False)

    try:
        tokenizer = load_tokenizer(cfg.data.tokenizer)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"data.tokenizer: {e}") from None
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer.vocab_size} tokens")
    try:
        mesh = make_mesh(cfg.mesh)
    except ValueError as e:
        raise ConfigError(f"mesh: {e}") from None
    n_proc, proc = jax.process_count(), jax.process_index()
    if tcfg.batch_size % n_proc:
        raise ConfigError(f"train.batch_size={tcfg.batch_size} does not divide over {n_proc} processes")
    local_batch = tcfg.batch_size // n_proc
    t0 = time.time()
    try:
        corpus = data_lib.load_corpus(cfg.data, tokenizer)
    except (ValueError, KeyError, FileNotFoundError, UnicodeDecodeError) as e:
        raise ConfigError(e.args[0] if e.args else str(e)) from None
    baseline = corpus.unigram_baseline()
    if lead:
        print(f"data: {cfg.data.source} -> {len(corpus.train):,} train / {len(corpus.val):,} validation tokens "
              f"from {corpus.num_files} files ({time.time() - t0:.1f}s); unigram baseline {baseline:.3f} nats/token")

    if cfg.model.param_dtype != "float32":
        if lead:
            print(f"training keeps float32 master weights (model.param_dtype={cfg.model.param_dtype} "
                  "is used for checkpoints exported to Hugging Face)")
        cfg = dataclasses.replace(cfg, model=cfg.model.replace(param_dtype="float32"))
    model = Transformer(cfg.model)
    preset = cfg.mesh.rules
    rules = activation_rules(preset)
    boxed = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, tcfg.seq_len), jnp.int32))
    tx, lr_schedule = make_optimizer(tcfg, boxed["params"])
    try:
        state_sh = state_shardings(boxed, tx, mesh, preset)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    batch_sh = NamedSharding(mesh, P(("data", "fsdp", "expert")))

    def init_state(rng):
        variables = unbox(model.init(rng, jnp.zeros((1, tcfg.seq_len), jnp.int32)))
        return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                          opt_state=tx.init(variables["params"]), moe_bias=variables.get("moe_bias", {}))

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=tcfg.keep_checkpoints)
    train_it = data_lib.train_iterator(corpus.train, tcfg.seq_len, local_batch, tcfg.seed, proc, n_proc)
    start = ckpt.latest_step()
    with jax.set_mesh(mesh):
        abstract_state = jax.eval_shape(init_state, jax.random.key(tcfg.seed))
        abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                      abstract_state, state_sh)
        if start is not None:
            state, extra = ckpt.restore(start, abstract_state)
            train_it.set_state(extra["data"])
            if lead:
                print(f"resumed from {ckpt.directory} at step {start}")
        else:
            state = jax.jit(init_state, out_shardings=state_sh)(jax.random.key(tcfg.seed))
            start = 0
        metrics_log = MetricsLog(workdir, start if start else None) if lead else None
        if start >= tcfg.steps:
            if lead:
                print(f"already trained to step {start} (train.steps={tcfg.steps}); nothing to do")
            ckpt.close()
            return 0

        train_step = jax.jit(make_train_step(model, tx, tcfg, lr_schedule, rules),
                             in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None),
                             donate_argnums=(0,))
        eval_step = jax.jit(make_eval_step(model, rules),
                            in_shardings=(state_sh.params, state_sh.moe_bias, batch_sh))
        val = data_lib.eval_batches(corpus.val, tcfg.seq_len, local_batch, max(tcfg.eval_batches, 1), proc, n_proc)

        def to_global(batch):
            return {k: jax.make_array_from_process_local_data(batch_sh, v) for k, v in batch.items()}

        def evaluate(state):
            losses = [eval_step(state.params, state.moe_bias, to_global(b)) for b in val]
            return float(np.mean(jax.device_get(losses)))

        fpt = flops_per_token(cfg.model, tcfg.seq_len)
        peak = (tcfg.peak_tflops or peak_tflops(jax.devices()[0])) * 1e12 * jax.device_count()
        tokens_per_step = tcfg.batch_size * tcfg.seq_len
        bar = tqdm(total=tcfg.steps, initial=start, disable=not lead, dynamic_ncols=True, mininterval=1.0,
                   desc="pretrain")
        last_time, last_step, val_loss = None, start, None
        for step in range(start, tcfg.steps):
            state, metrics = train_step(state, to_global(next(train_it)))
            done = step + 1
            if last_time is None:  # the first step includes compilation: time from its end
                jax.block_until_ready(metrics)
                last_time, last_step = time.time(), done
            record = None
            if done % tcfg.log_every == 0 or done == tcfg.steps:
                metrics = jax.device_get(metrics)
                now = time.time()
                tps = tokens_per_step * (done - last_step) / max(now - last_time, 1e-9) if done > last_step else 0.0
                last_time, last_step = now, done
                record = {"step": done, **{k: float(v) for k, v in metrics.items()},
                          "tokens_per_s": tps, "mfu": tps * fpt / peak}
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{tps:,.0f}", refresh=False)
            if tcfg.eval_batches and (done % tcfg.eval_every == 0 or done == tcfg.steps):
                val_loss = evaluate(state)
                record = record or {"step": done}
                record["val_loss"] = val_loss
                if lead:
                    bar.write(f"step {done}: validation loss {val_loss:.4f} (unigram baseline {baseline:.4f})")
            if record is not None and lead:
                metrics_log.write(record)
            if done % tcfg.checkpoint_every == 0 or done == tcfg.steps:
                ckpt.save(done, state, {"data": train_it.get_state(), "step": done})
            bar.update(1)
        bar.close()
        ckpt.close()
        if lead:
            plot = plot_curves(workdir, baseline)
            summary = f"done: {tcfg.steps} steps; plot {plot}"
            if val_loss is not None:
                summary += f"; validation loss {val_loss:.4f} vs unigram baseline {baseline:.4f} nats/token"
            print(summary)
        if tcfg.sample_tokens:
            _print_sample(model, state, tokenizer, tcfg, lead)
    return 0


def _print_sample(model, state, tokenizer, tcfg, lead: bool) -> None:
    """Generates from the trained model (every process joins the gather; process 0 prints)."""
    prompt = tokenizer.encode(tcfg.sample_prompt)
    if len(prompt) == 0:
        return
    variables = {"params": state.params}
    if state.moe_bias:
        variables["moe_bias"] = state.moe_bias
    if jax.process_count() > 1:
        variables = multihost_utils.process_allgather(variables, tiled=True)
    variables = jax.device_get(variables)
    out = generate(model, variables, prompt[None], [len(prompt)], tcfg.sample_tokens, temperature=0.8,
                   rng=jax.random.key(tcfg.seed), top_k=40)
    if not lead:
        return
    text = tokenizer.decode(np.asarray(out.tokens[0, :int(out.lengths[0])]))
    print("sample:\n" + tcfg.sample_prompt + text)
