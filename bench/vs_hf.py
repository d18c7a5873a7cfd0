"""dsjax vs Hugging Face transformers (PyTorch, CPU, float32), side by side in one process
on the same random DeepSeek-V3 checkpoint of each preset (`tiny`, `small`): training step,
prefill and greedy decoding at batch 1 and 8.

    python -m bench vs_hf [-- --presets tiny,small --batch 8 --seq 256 --reps 5]
    python -m bench.vs_hf --presets tiny --batch 2 --seq 32 --reps 2    # a smoke run

The checkpoint: transformers builds a DeepseekV3ForCausalLM from `cfg.to_hf()` with random
weights (normal(0, 2/sqrt(hidden_size)), norms normal(1, 0.1), router bias normal(0, 0.1):
peaked logits, so greedy decoding is not decided by rounding), saves it with
`save_pretrained`, and dsjax loads it with `dsjax.from_pretrained` (MTP off: transformers
has no MTP). Every timing alternates the two libraries, repetition by repetition, after
warm-up (dsjax's compilation is reported apart); figures are medians.

One JSON line per preset and measure, each with `dsjax_per_s`, `hf_per_s`, `speedup`
(dsjax / transformers), `mfu`, the targets (`targets`) and `target_met`:

  train       tokens/s of a step (forward, backward, AdamW with global-norm clipping):
              dsjax runs `python -m train`'s step (bench.common.train_step: train/steps.py
              and train/optim.py, jitted with the state donated) with the implementation
              choices the trainer resolves for a CPU; transformers runs a plain loop with
              torch.optim.AdamW.
              The first step's losses of both are reported (same weights, same batch).
  prefill     tokens/s of a forward pass over a batch of prompts, no gradient, no cache.
  decode_b1,  new tokens/s of greedy decoding (dsjax.generate with absorbed MLA, no
  decode_b8   speculation; model.generate(do_sample=False), no stop token), from the
              difference of a run of N new tokens and a run of 1 (the prefill cancels);
              `*_e2e_per_s` counts the whole N-token call. `tokens_agree`: the greedy
              tokens of the two are identical.

`mfu` = model FLOPs per token x tokens/s / the float32 matmul throughput measured in the
same run (a 2048^3 jnp.dot after warm-up, the larger of two timings just before and after
the measure); the FLOP formula is in each line. Decode lines
add `fraction_of_bound`: tokens/s over batch x copy bandwidth (numpy copy of 512 MiB,
read + written bytes per second; the median of copies timed beside each of the measure's
repetitions, `copy_bytes_per_s` and its range in the line) / the bytes one decode step
must read (see `decode_bytes`: the assumption is in each line).
"""

import argparse
import os
import sys
import tempfile
import time

# PyTorch's OpenMP threads spin while they wait by default, which stalls them on a CPU
# shared with other work (or with XLA's own threads; docs/benchmarks.md). Passive
# waiting, set before torch loads, is the fair setting for both; the line reports it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

if __package__ in (None, ""):  # run as a file, python bench/vs_hf.py: the repository's packages first
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from bench.common import emit, interleaved, median, random_batch, run_config, train_step  # noqa: E402
from dsjax import impl  # noqa: E402
from dsjax.config import ModelConfig, load_model_config, param_counts  # noqa: E402

# The targets: speedup over transformers, MFU of the small preset's training step, and
# decode speed as a fraction of the bandwidth bound.
TARGET_SPEEDUP = {("tiny", "train"): 1.5, ("small", "train"): 1.0, "prefill": 1.0, "decode": 1.5}
TARGET_MFU = {("small", "train"): 0.5}
TARGET_FRACTION_OF_BOUND = 0.6
BYTES = 4  # float32

TRAIN_FLOPS = "6*N_active + 3*L*H*(K+R+V)*T (causal attention: 3 passes x 2 FLOPs x H*(K+R+V) x T/2 keys)"
PREFILL_FLOPS = "2*N_active + L*H*(K+R+V)*T (causal attention: 2 FLOPs x H*(K+R+V) x T/2 keys)"
DECODE_FLOPS = "2*N_active + 2*L*H*(K+R+V)*S (S: mean context of a decode step; naive-MLA attention FLOPs)"


# ----------------------------------------------------------------------------- arithmetic
def active_params(cfg: ModelConfig) -> int:
    """N_active: what one token multiplies with (no embedding lookup, no MTP, the output head
    and the k routed experts it is sent to included)."""
    return param_counts(cfg)["activated"]


def attention_flops(cfg: ModelConfig, keys: float) -> float:
    """Forward FLOPs of softmax(q k^T) v for one query over `keys` keys, all layers."""
    return 2 * cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * keys


def train_flops_per_token(cfg: ModelConfig, seq: int) -> float:
    """6 N_active + 3 x forward attention over T/2 keys (the train step's own count,
    train.steps.flops_per_token, with MTP off)."""
    return 6 * active_params(cfg) + 3 * attention_flops(cfg, seq / 2)


def prefill_flops_per_token(cfg: ModelConfig, seq: int) -> float:
    return 2 * active_params(cfg) + attention_flops(cfg, seq / 2)


def decode_flops_per_token(cfg: ModelConfig, context: float) -> float:
    return 2 * active_params(cfg) + attention_flops(cfg, context)


def decode_bytes(cfg: ModelConfig, batch: int, context: float) -> dict:
    """Bytes one greedy decode step of `batch` rows must read from memory, float32.

    Weights: every activated parameter except the routed experts (attention, dense MLPs,
    shared experts, routers, norms, output head), `batch` embedding rows, and per MoE layer
    the experts the batch is routed to, assumed distinct: min(E, batch x k) experts of
    3 x D x F. Cache: the absorbed MLA latent cache, (C + R) values per token per layer,
    over `context` tokens per row.
    """
    routed_one = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    k, e = cfg.num_experts_per_tok, cfg.n_routed_experts
    experts = min(e, batch * k)
    non_routed = active_params(cfg) - cfg.num_moe_layers * k * routed_one
    weights = BYTES * (non_routed + cfg.num_moe_layers * experts * routed_one + batch * cfg.hidden_size)
    cache = BYTES * batch * cfg.num_hidden_layers * context * cfg.cache_values_per_token
    return {"weight_bytes": int(weights), "cache_bytes": int(cache), "bytes": int(weights + cache),
            "experts_read_per_moe_layer": experts,
            "assumption": f"non-routed activated weights + {batch} embedding rows + min(E, {batch} x k) = "
                          f"{experts} distinct routed experts per MoE layer + the latent cache (C+R per token "
                          f"per layer) over the mean context; float32"}


def decode_bound(cfg: ModelConfig, batch: int, context: float, bandwidth: float) -> float:
    """Tokens/s at which decoding reads `decode_bytes` at `bandwidth` bytes/s."""
    return batch * bandwidth / decode_bytes(cfg, batch, context)["bytes"]


def targets(preset: str, measure: str) -> dict:
    kind = "decode" if measure.startswith("decode") else measure
    out = {"target_speedup": TARGET_SPEEDUP.get((preset, kind), TARGET_SPEEDUP.get(kind))}
    if (preset, kind) in TARGET_MFU:
        out["target_mfu"] = TARGET_MFU[preset, kind]
    if kind == "decode":
        out["target_fraction_of_bound"] = TARGET_FRACTION_OF_BOUND
    return {k: v for k, v in out.items() if v is not None}


def target_met(line: dict) -> bool:
    """Every target on the line is met (speedup, mfu and fraction_of_bound where given)."""
    ok = True
    if "target_speedup" in line:
        ok &= line["speedup"] >= line["target_speedup"]
    if "target_mfu" in line:
        ok &= line["mfu"] >= line["target_mfu"]
    if "target_fraction_of_bound" in line:
        ok &= line["fraction_of_bound"] >= line["target_fraction_of_bound"]
    return bool(ok)


# ----------------------------------------------------------------------------- machine
def matmul_flops_per_s(n: int = 2048, reps: int = 5) -> dict:
    """float32 matmul throughput of jnp.dot (and torch.matmul, for reference), n^3 after warm-up."""
    import jax
    import jax.numpy as jnp
    import torch

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    ta, tb = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(ta, tb)
    t = interleaved({"jax": lambda: dot(a, b), "torch": lambda: torch.matmul(ta, tb)}, reps)
    flops = 2 * n ** 3
    return {"matmul_flops_per_s": flops / median(t["jax"]), "torch_matmul_flops_per_s": flops / median(t["torch"])}


class CopyProbe:
    """Copy bandwidth of the machine: bytes/s moved (read + written) by a numpy copy of
    `nbytes`. The two arrays are made once, when the probe is (before `keep_buffers`, so
    on the pages numpy gets by default), and kept, so that the bandwidth can be measured
    again beside each timed repetition of a measure: on a shared machine it moves over
    minutes."""

    def __init__(self, nbytes: int = 512 * 2 ** 20):
        self.nbytes = nbytes
        self.src = np.ones(nbytes // 4, np.float32)
        self.dst = np.empty_like(self.src)
        np.copyto(self.dst, self.src)  # warm-up: the pages are touched

    def measure(self, reps: int = 1) -> list[float]:
        """Bytes/s of `reps` copies, each timed on its own."""
        out = []
        for _ in range(reps):
            start = time.perf_counter()
            np.copyto(self.dst, self.src)
            out.append(2 * self.nbytes / (time.perf_counter() - start))
        return out


# ----------------------------------------------------------------------------- models
def build_pair(preset: str, directory: str, seed: int = 0):
    """(dsjax model, variables, HF model) with the same random weights, MTP off."""
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    import dsjax

    cfg = load_model_config(preset).replace(num_nextn_predict_layers=0)
    torch.manual_seed(seed)
    hf_cfg = DeepseekV3Config(**{k: v for k, v in cfg.to_hf().items() if k != "architectures"})
    hf = DeepseekV3ForCausalLM(hf_cfg)
    std = 2.0 / cfg.hidden_size ** 0.5
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(1.0, 0.1) if "norm" in name else p.normal_(0.0, std)
        for mod in hf.modules():
            if hasattr(mod, "e_score_correction_bias"):
                mod.e_score_correction_bias.normal_(0.0, 0.1)
    hf.save_pretrained(directory)
    model, variables = dsjax.from_pretrained(directory, mtp="off")
    return model, variables, hf.eval()


def _rate(x: float) -> float:
    return round(x, 1)


def bench_train(preset, model, variables, hf, batch, seq, reps, warmup, rng):
    import jax
    import torch

    cfg = model.cfg
    tcfg = run_config(preset, batch, seq, "model.num_nextn_predict_layers=0").train
    train = train_step(cfg, tcfg)
    state = train.start(variables)
    step = train.step
    jbatch = random_batch(cfg.vocab_size, batch, seq, rng)

    hf.train()
    opt = torch.optim.AdamW(hf.parameters(), lr=tcfg.lr, betas=(tcfg.b1, tcfg.b2), eps=tcfg.eps,
                            weight_decay=tcfg.weight_decay)
    inputs, targets = (torch.from_numpy(np.array(jbatch[k])).long() for k in ("inputs", "targets"))

    def hf_step():
        logits = hf(input_ids=inputs, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), tcfg.grad_clip)
        opt.step()
        return float(loss.detach())

    start = time.perf_counter()
    state, metrics = step(state, jbatch)
    jax.block_until_ready(state)
    compile_s = time.perf_counter() - start
    first_loss = float(metrics["ce"])
    hf_first_loss = hf_step()
    def our_step():
        nonlocal state
        state, _ = step(state, jbatch)
        jax.block_until_ready(state)

    interleaved({"dsjax": our_step, "hf": hf_step}, warmup - 1)
    t = interleaved({"dsjax": our_step, "hf": hf_step}, reps)
    ours, theirs = t["dsjax"], t["hf"]
    hf.eval()
    tokens_per_step = batch * seq
    return {"measure": "train", "batch": batch, "seq": seq, "moe_dispatch": impl.moe_dispatch(cfg, batch * seq),
            "dsjax_per_s": tokens_per_step / median(ours), "hf_per_s": tokens_per_step / median(theirs),
            "dsjax_step_s": round(median(ours), 4), "hf_step_s": round(median(theirs), 4),
            "dsjax_compile_s": round(compile_s, 2), "first_loss_dsjax": round(first_loss, 5),
            "first_loss_hf": round(hf_first_loss, 5), "reps": reps,
            "flops_per_token": train_flops_per_token(cfg, seq), "flops_formula": TRAIN_FLOPS}


def bench_prefill(model, variables, hf, batch, seq, reps, warmup, rng):
    import jax
    import torch

    cfg = model.cfg
    tokens = rng.integers(2, cfg.vocab_size, (batch, seq))
    forward = jax.jit(lambda v, t: model.apply(v, t).logits)
    ids = torch.from_numpy(tokens).long()
    jt = jax.numpy.asarray(tokens, jax.numpy.int32)

    def hf_forward():
        with torch.inference_mode():
            return hf(input_ids=ids, use_cache=False).logits

    start = time.perf_counter()
    ours_logits = np.asarray(forward(variables, jt))
    compile_s = time.perf_counter() - start
    theirs_logits = hf_forward().numpy()
    our_forward = lambda: forward(variables, jt).block_until_ready()  # noqa: E731
    interleaved({"dsjax": our_forward, "hf": hf_forward}, warmup - 1)
    t = interleaved({"dsjax": our_forward, "hf": hf_forward}, reps)
    ours, theirs = t["dsjax"], t["hf"]
    n = batch * seq
    return {"measure": "prefill", "batch": batch, "seq": seq, "moe_dispatch": impl.moe_dispatch(cfg, batch * seq),
            "dsjax_per_s": n / median(ours), "hf_per_s": n / median(theirs),
            "dsjax_compile_s": round(compile_s, 2), "reps": reps,
            "max_abs_logit_diff": float(np.abs(ours_logits - theirs_logits).max()),
            "flops_per_token": prefill_flops_per_token(cfg, seq), "flops_formula": PREFILL_FLOPS}


def bench_decode(model, variables, hf, batch, prompt_len, new_tokens, reps, probe, rng):
    import jax
    import torch

    import dsjax

    absorbed = dsjax.Transformer(model.cfg.replace(attn_impl="absorb"))
    cfg = absorbed.cfg
    prompts = rng.integers(2, cfg.vocab_size, (batch, prompt_len))
    lengths = np.full((batch,), prompt_len)
    ids = torch.from_numpy(prompts).long()
    hf.generation_config.eos_token_id = None  # no stop token on either side
    hf.generation_config.pad_token_id = 0
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False)

    def ours(n):
        out = dsjax.generate(absorbed, variables, prompts, lengths, max_new_tokens=n)
        return np.asarray(jax.block_until_ready(out.tokens))

    def theirs(n):
        with torch.inference_mode():
            return hf.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)[:, prompt_len:].numpy()

    start = time.perf_counter()
    ours(1)
    ours_tokens = ours(new_tokens)
    compile_s = time.perf_counter() - start
    theirs(1)
    theirs_tokens = theirs(new_tokens)
    times = {("dsjax", 1): [], ("dsjax", new_tokens): [], ("hf", 1): [], ("hf", new_tokens): []}
    copies = []  # the bound's bandwidth, measured beside each repetition
    for _ in range(reps):
        copies += probe.measure(1)
        for n in (1, new_tokens):
            start = time.perf_counter()
            ours(n)
            times["dsjax", n].append(time.perf_counter() - start)
            start = time.perf_counter()
            theirs(n)
            times["hf", n].append(time.perf_counter() - start)
    copies += probe.measure(1)
    bandwidth = float(np.median(copies))
    med = {k: median(v) for k, v in times.items()}
    steps = batch * (new_tokens - 1)
    context = prompt_len + new_tokens / 2
    nbytes = decode_bytes(cfg, batch, context)
    bound = decode_bound(cfg, batch, context, bandwidth)
    ours_rate = steps / max(med["dsjax", new_tokens] - med["dsjax", 1], 1e-9)
    theirs_rate = steps / max(med["hf", new_tokens] - med["hf", 1], 1e-9)
    return {"measure": f"decode_b{batch}", "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "attn_impl": cfg.attn_impl, "moe_dispatch": impl.moe_dispatch(cfg, batch),  # a step's
            "dsjax_per_s": ours_rate, "hf_per_s": theirs_rate,
            "dsjax_e2e_per_s": _rate(batch * new_tokens / med["dsjax", new_tokens]),
            "hf_e2e_per_s": _rate(batch * new_tokens / med["hf", new_tokens]),
            "dsjax_compile_s": round(compile_s, 2), "reps": reps,
            "tokens_agree": bool(np.array_equal(ours_tokens, theirs_tokens)),
            "matching_token_fraction": round(float((ours_tokens == theirs_tokens).mean()), 3),
            "bound_per_s": _rate(bound), "fraction_of_bound": round(ours_rate / bound, 3),
            "hf_fraction_of_bound": round(theirs_rate / bound, 3),
            "bytes_per_step": nbytes["bytes"], "bytes_assumption": nbytes["assumption"],
            "copy_bytes_per_s": round(bandwidth), "copy_bytes_per_s_range": [round(min(copies)), round(max(copies))],
            "flops_per_token": decode_flops_per_token(cfg, context), "flops_formula": DECODE_FLOPS}


def finish(line: dict, preset: str, peak: float) -> dict:
    """Adds name, preset, speedup, MFU, targets and target_met; rounds the rates."""
    flops = line["flops_per_token"]
    out = {"name": "vs_hf", "preset": preset, **line,
           "dsjax_per_s": _rate(line["dsjax_per_s"]), "hf_per_s": _rate(line["hf_per_s"]),
           "speedup": round(line["dsjax_per_s"] / line["hf_per_s"], 3),
           "flops_per_token": int(flops), "mfu": round(flops * line["dsjax_per_s"] / peak, 4),
           "hf_mfu": round(flops * line["hf_per_s"] / peak, 4)}
    out.update(targets(preset, line["measure"]))
    out["target_met"] = target_met(out)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="tiny,small")
    p.add_argument("--measures", default="train,prefill,decode", help="comma-separated subset of train,prefill,decode")
    p.add_argument("--batch", type=int, default=8, help="train and prefill batch")
    p.add_argument("--seq", type=int, default=256, help="train and prefill sequence length")
    p.add_argument("--decode-batches", default="1,8")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=5, help="timed repetitions of each side (medians)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each side, the first compiles")
    args = p.parse_args()
    import torch

    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(threads)
    from dsjax.cpu.allocator import keep_buffers

    # The copy probe's arrays first: with keep_buffers' heap settings numpy's 512 MB arrays
    # would come from the heap on small pages instead of mmap (transparent huge pages) and
    # copy several times slower, understating the bound (docs/benchmarks.md). The probe
    # keeps its arrays and times them again beside each decode repetition.
    probe = CopyProbe()
    bandwidth = float(np.median(probe.measure(5)))
    # What `python -m train` sets for itself: XLA's buffers stay mapped between calls. It is
    # process-wide, so transformers' large tensors are served from the same untrimmed heap.
    kept = keep_buffers()
    machine = matmul_flops_per_s()
    machine["copy_bytes_per_s"] = bandwidth
    print(f"[vs_hf] matmul {machine['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s (torch "
          f"{machine['torch_matmul_flops_per_s'] / 1e9:.1f}), copy {machine['copy_bytes_per_s'] / 1e9:.1f} GB/s, "
          f"{threads} threads", file=sys.stderr, flush=True)
    measures = args.measures.split(",")
    rng = np.random.default_rng(0)
    for preset in args.presets.split(","):
        with tempfile.TemporaryDirectory() as d:
            model, variables, hf = build_pair(preset, d)
        jobs = []
        if "prefill" in measures:
            jobs.append(lambda: bench_prefill(model, variables, hf, args.batch, args.seq, args.reps, args.warmup, rng))
        if "decode" in measures:
            for b in map(int, args.decode_batches.split(",")):
                jobs.append(lambda b=b: bench_decode(model, variables, hf, b, args.prompt_len, args.new_tokens,
                                                     args.reps, probe, rng))
        if "train" in measures:  # last: it donates (and so consumes) the loaded parameters
            jobs.append(lambda: bench_train(preset, model, variables, hf, args.batch, args.seq, args.reps,
                                            args.warmup, rng))
        for job in jobs:
            # The machine is shared: the matmul peak is measured again next to each measure.
            machine.update(matmul_flops_per_s())
            line = job()
            after = matmul_flops_per_s()
            peak = max(machine["matmul_flops_per_s"], after["matmul_flops_per_s"])
            out = finish(line, preset, peak)
            out.update(n_active=active_params(model.cfg), threads=threads, keep_buffers=kept,
                       omp_wait_policy=os.environ["OMP_WAIT_POLICY"], hf_attn_impl=hf.config._attn_implementation,
                       hf_experts_impl=getattr(hf.config, "_experts_implementation", None),
                       matmul_flops_per_s=round(peak),
                       torch_matmul_flops_per_s=round(max(machine["torch_matmul_flops_per_s"],
                                                          after["torch_matmul_flops_per_s"])),
                       copy_bytes_per_s=out.get("copy_bytes_per_s", round(machine["copy_bytes_per_s"])))
            emit(out)


if __name__ == "__main__":
    main()
