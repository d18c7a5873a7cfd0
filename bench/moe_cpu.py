"""The MoE dispatch on a CPU: dense (every expert on every token) against the blocked and
gather dispatches of the CPU wing (dsjax/cpu/moe.py) that `moe_impl=auto` resolves to there.

    python -m bench.moe_cpu [--preset small] [--batch 8] [--seq-len 256] [--reps 3]
                            [--decode-batches 1 8] [--new-tokens 32] [--no-profile]
                            [--kernel-only]

Reports, each alternative timed in the same process, interleaved, medians over --reps:
- kernel: the blocked dispatch's experts on their own blocks (batch x seq-len tokens),
  the native kernel (dsjax/cpu/csrc/cpu_kernels.cc) against XLA's loops, forward and forward
  + backward, ms and GFLOP/s (only where the kernel applies: float32 on a CPU with it
  built); --kernel-only reports this alone;
- profile: one MoE layer's routed experts forward+backward on batch x seq-len tokens
  (dense, ragged, blocked), one MoE layer (gate, routed and shared experts, the auto
  dispatch) and one MLA attention layer forward+backward, in ms;
- train: tokens/s of the full training step (bench.common.train_step, MTP off) with
  moe_impl=dense and moe_impl=auto;
- decode: greedy dsjax.generate tokens/s (new tokens over the wall time of the call,
  prefill included) with attn_impl=absorb at each decode batch, dense and auto.
Prints one JSON line.
"""

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before JAX starts: the CPU is what this measures

if __package__ in (None, ""):  # run as a file, python bench/moe_cpu.py: the repository's packages first
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import dsjax  # noqa: E402
from bench.common import emit, interleaved, median, random_batch, run_config, train_step  # noqa: E402
from dsjax import impl  # noqa: E402
from dsjax.cpu import moe as cpu_moe  # noqa: E402
from dsjax.mla import MLA  # noqa: E402
from dsjax.model import attention_mask  # noqa: E402
from dsjax.moe import MoE, experts_dense, experts_ragged  # noqa: E402
from dsjax.rope import rope_tables  # noqa: E402

DISPATCHES = {"dense": experts_dense, "ragged": experts_ragged, "blocked": cpu_moe.experts_blocked}


def medians(fns: dict, reps: int) -> dict:
    """Median seconds of each no-argument callable (already compiled), run in turns."""
    return {name: median(t) for name, t in interleaved(fns, reps).items()}


def warm(fn):
    jax.block_until_ready(fn())
    return fn


def expert_inputs(cfg, tokens: int):
    """Random routed-expert inputs for `tokens` tokens: x, routing weights and indices
    (top-k of random logits), w1, w3, w2."""
    D, F, E, k = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts, cfg.num_experts_per_tok
    keys = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(keys[0], (tokens, D))
    weights, indices = jax.lax.top_k(jax.random.normal(keys[1], (tokens, E)), k)
    w1, w3 = (0.02 * jax.random.normal(key, (E, D, F)) for key in keys[2:4])
    w2 = 0.02 * jax.random.normal(keys[4], (E, F, D))
    return x, weights, indices, w1, w3, w2


def profile(cfg, tokens: int, batch: int, reps: int) -> dict:
    """ms of fwd+bwd: the routed experts alone per dispatch, one MoE layer, one MLA layer."""
    D = cfg.hidden_size
    x, weights, indices, w1, w3, w2 = expert_inputs(cfg, tokens)
    fns = {}
    for name, dispatch in DISPATCHES.items():
        grad = jax.jit(jax.grad(lambda x, w1, w3, w2, f=dispatch: jnp.sum(
            f(x, weights, indices, w1, w3, w2) ** 2), argnums=(0, 1, 2, 3)))
        fns[f"routed_{name}"] = warm(lambda g=grad: g(x, w1, w3, w2))
    h = x.reshape(batch, tokens // batch, D)
    for name, module in (("moe_layer_auto", MoE(cfg)), ("moe_layer_dense", MoE(cfg.replace(moe_impl="dense")))):
        params = module.init(jax.random.key(1), h)
        grad = jax.jit(jax.grad(lambda p, h, m=module: jnp.sum(m.apply(p, h)[0] ** 2), argnums=(0, 1)))
        fns[name] = warm(lambda g=grad, p=params: g(p, h))
    T = tokens // batch
    cos, sin = rope_tables(cfg, jnp.broadcast_to(jnp.arange(T), (batch, T)))
    mask = attention_mask(batch, T)
    mla = MLA(cfg)
    params = mla.init(jax.random.key(2), h, cos, sin, mask)
    grad = jax.jit(jax.grad(lambda p, h: jnp.sum(mla.apply(p, h, cos, sin, mask) ** 2), argnums=(0, 1)))
    fns["mla_layer"] = warm(lambda: grad(params, h))
    return {name: round(1e3 * s, 1) for name, s in medians(fns, reps).items()}


def blocked_kernel(cfg, tokens: int, reps: int) -> dict:
    """The blocked dispatch's experts on their blocks (`_blocked_swiglu`), the native
    kernel against XLA's loops: ms and GFLOP/s of the forward and of forward + backward
    (GFLOPs: 2 x rows x D x F x 3 matrices, three times that with the backward, rows
    counting the blocks' padding). {} where the kernel does not apply here."""
    D, F, E = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts
    x, _, indices, w1, w3, w2 = expert_inputs(cfg, tokens)
    xs, _, _, first, count = cpu_moe.blocked_rows(x, indices, E)
    block = xs.shape[1]
    if not cpu_moe.blocked_kernel_applies(xs, w1, w3, w2):
        return {}
    fns = {}
    for name, kernel in (("kernel", True), ("xla", False)):
        run = lambda xs, w1, w3, w2, kernel=kernel: cpu_moe._blocked_swiglu(  # noqa: E731
            xs, first, count, w1, w3, w2, kernel)
        fwd = jax.jit(run)
        grad = jax.jit(jax.grad(lambda *a, run=run: jnp.sum(run(*a) ** 2), argnums=(0, 1, 2, 3)))
        fns[f"{name}_fwd"] = warm(lambda f=fwd: f(xs, w1, w3, w2))
        fns[f"{name}_fwd_bwd"] = warm(lambda g=grad: g(xs, w1, w3, w2))
    rows = int(count.sum()) * block
    flops = 2 * rows * D * F * 3
    out = {"rows": rows, "block": block}
    for name, s in medians(fns, reps).items():
        done = flops if name.endswith("_fwd") else 3 * flops
        out[name] = {"ms": round(1e3 * s, 1), "gflop_per_s": round(done / s / 1e9, 1)}
    return out


def train_steps(preset: str, batch: int, seq_len: int, impls, reps: int) -> dict:
    """tokens/s of the training step per moe_impl."""
    fns = {}
    for name in impls:
        run = run_config(preset, batch, seq_len, "model.num_nextn_predict_layers=0", f"model.moe_impl={name}")
        train = train_step(run.model, run.train, donate=False)  # each call steps from the same state
        state = train.start(train.init_variables(1))
        data = random_batch(run.model.vocab_size, batch, seq_len)
        fns[name] = warm(lambda step=train.step, state=state, data=data: step(state, data))
    return {name: round(batch * seq_len / s, 1) for name, s in medians(fns, reps).items()}


def decode(preset: str, batches, new_tokens: int, prompt_len: int, impls, reps: int) -> dict:
    """Greedy dsjax.generate tokens/s per (decode batch, moe_impl), attn_impl=absorb."""
    base = dsjax.load_model_config(preset).replace(attn_impl="absorb")
    prompts = jax.random.randint(jax.random.key(0), (max(batches), prompt_len), 2, base.vocab_size)
    variables = dsjax.Transformer(base).init(jax.random.key(1), prompts[:1])
    out = {}
    for B in batches:
        fns = {}
        for name in impls:
            model = dsjax.Transformer(base.replace(moe_impl=name))
            lengths = jnp.full((B,), prompt_len, jnp.int32)
            fns[name] = warm(lambda m=model, B=B, lengths=lengths: dsjax.generate(
                m, variables, prompts[:B], lengths, max_new_tokens=new_tokens, temperature=0.0).tokens)
        seconds = medians(fns, reps)
        out[f"batch{B}"] = {name: round(B * new_tokens / s, 1) for name, s in seconds.items()}
        out[f"batch{B}"]["auto_is"] = impl.moe_dispatch(base, B)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--kernel-only", action="store_true", help="only the blocked experts' kernel against XLA")
    args = parser.parse_args()
    cfg = dsjax.load_model_config(args.preset)
    result = {"name": "moe_cpu", "backend": jax.default_backend(), "preset": args.preset,
              "batch": args.batch, "seq_len": args.seq_len, "reps": args.reps,
              "auto_train_dispatch": impl.moe_dispatch(cfg, args.batch * args.seq_len)}
    result["blocked_kernel"] = blocked_kernel(cfg, args.batch * args.seq_len, args.reps)
    if args.kernel_only:
        emit(result)
        return
    if not args.no_profile:
        result["profile_fwd_bwd_ms"] = profile(cfg, args.batch * args.seq_len, args.batch, args.reps)
    result["train_tokens_per_s"] = train_steps(args.preset, args.batch, args.seq_len, ("dense", "auto"), args.reps)
    result["train_speedup"] = round(result["train_tokens_per_s"]["auto"] / result["train_tokens_per_s"]["dense"], 2)
    result["decode_tokens_per_s"] = decode(args.preset, args.decode_batches, args.new_tokens, args.prompt_len,
                                           ("dense", "auto"), max(args.reps, 3))
    emit(result)


if __name__ == "__main__":
    main()
