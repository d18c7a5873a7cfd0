"""Batched generation on the KV cache, with MTP speculative decoding.

`generate` pads the prompts to a length bucket, prefills the cache with one forward pass
and decodes under one jit (compiled once per shape bucket). Prompts of different lengths
are right-padded: every row writes its tokens at its own positions, and each query sees
only the cache slots at or before its position, so padding and rolled-back slots are
never read.

Speculative decoding (DeepSeek-V3 §5.4.3): the first MTP module drafts the token after
next from the main model's hidden state; the main model checks the pending token and the
draft in one forward pass. A draft is kept when it agrees (greedy) or by the standard
accept/reject rule (sampling: accept with probability min(1, p/q), else resample from
max(0, p - q)), so the output distribution is the main model's; a rejected draft's cache
slot is simply overwritten later.

Under a mesh (the `mesh` argument, or the one set with `jax.set_mesh`) generation runs
where the parameters are: they keep their shardings (nothing is gathered onto one
device or the host), the prompts are split over the `batch` mesh axes of the
logical-axis rules where the batch divides them (replicated over the others), the cache
is created sharded by its logical axes, and the model's own sharding constraints and its
expert-parallel MoE apply as in training. The outputs are replicated, small [B, N]
arrays every process can read; with `gather=False` they stay split over the batch axes as
the prompts are (each process reads the rows its devices hold: GRPO's rollouts on many
hosts).
"""

from __future__ import annotations

import contextlib
import functools

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from dsjax import impl
from dsjax.model import Transformer, init_cache, to_layout


@flax.struct.dataclass
class GenerateOutput:
    """tokens int32 [B, N] (0 after a stop token), logprobs float32 [B, N] (the model's
    log-probabilities of those tokens at temperature 1; 0 after a stop), lengths int32 [B]
    (tokens up to and including the stop token), and counters: main-model decode
    forward passes, drafts proposed and drafts accepted (speculative only)."""

    tokens: jnp.ndarray
    logprobs: jnp.ndarray
    lengths: jnp.ndarray
    forwards: jnp.ndarray
    drafted: jnp.ndarray
    accepted: jnp.ndarray

    @property
    def acceptance_rate(self) -> float:
        return float(self.accepted) / max(float(self.drafted), 1.0)

    @property
    def tokens_per_forward(self) -> float:
        return float(jnp.sum(self.lengths)) / max(float(self.forwards) * self.tokens.shape[0], 1.0)


def sampling_logprobs(logits: jnp.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0) -> jnp.ndarray:
    """Log-probabilities of the sampling distribution: temperature, then top-k, then top-p.

    logits: [..., V] -> float32 [..., V] (-inf outside the kept set).
    """
    logits = logits.astype(jnp.float32) / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logp = jnp.take_along_axis(jax.nn.log_softmax(logits), order, axis=-1)
        before = jnp.cumsum(jnp.exp(sorted_logp), axis=-1) - jnp.exp(sorted_logp)  # mass ahead of each
        keep_sorted = before < top_p  # always keeps the first
        keep = jnp.zeros_like(keep_sorted).at[
            tuple(jnp.indices(order.shape)[:-1]) + (order,)].set(keep_sorted)
        logits = jnp.where(keep, logits, -jnp.inf)
    return jax.nn.log_softmax(logits)


def _choose(rng, logits, greedy: bool, temperature, top_k: int, top_p: float):
    """(token [B], sampling log-probs [B, V] or None)."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), None
    logp = sampling_logprobs(logits, temperature, top_k, top_p)
    return jax.random.categorical(rng, logp, axis=-1).astype(jnp.int32), logp


def speculative_accept(rng, p_logp: jnp.ndarray, q_logp: jnp.ndarray, draft: jnp.ndarray):
    """The speculative-sampling rule for one draft per row.

    Args:
      p_logp: target log-probs [B, V]; q_logp: draft log-probs [B, V]; draft: [B], drawn from q.
    Returns:
      (token [B], accepted bool [B]): the draft with probability min(1, p/q), otherwise a
      sample of max(0, p - q) normalized. The token is distributed exactly as p.
    """
    u_key, r_key = jax.random.split(rng)
    rows = jnp.arange(draft.shape[0])
    log_ratio = p_logp[rows, draft] - q_logp[rows, draft]
    accepted = jnp.log(jax.random.uniform(u_key, draft.shape)) < log_ratio
    residual = jnp.maximum(jnp.exp(p_logp) - jnp.exp(q_logp), 0.0)
    residual = jnp.where(residual.sum(-1, keepdims=True) > 0, residual, jnp.exp(p_logp))
    resampled = jax.random.categorical(r_key, jnp.log(residual), axis=-1).astype(jnp.int32)
    return jnp.where(accepted, draft, resampled), accepted


def _stop_mask(tokens, stop_tokens: tuple[int, ...]):
    if not stop_tokens:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.asarray(stop_tokens, jnp.int32))


def _emit(buffers, idx, active, token, logp):
    """Writes token/logp at column idx of the active rows."""
    tokens, logprobs = buffers
    N = tokens.shape[1]
    rows = jnp.arange(tokens.shape[0])
    col = jnp.where(active, idx, N)  # N is out of range: dropped
    return (tokens.at[rows, col].set(token, mode="drop"), logprobs.at[rows, col].set(logp, mode="drop"))


def _batch_rules(rules, mesh, rows: int):
    """`rules` with `batch` mapped only to the mesh axes (in order) that split `rows` rows
    evenly, and the PartitionSpec of a [rows, ...] array under them. A batch that does not
    divide an axis is replicated over it (e.g. one prompt: replicated everywhere)."""
    batch = next((axes for name, axes in rules if name == "batch"), None)
    kept, split = [], 1
    for a in (batch,) if isinstance(batch, str) else tuple(batch or ()):
        size = mesh.shape.get(a, 1)
        if size > 1 and rows % (split * size) == 0:
            kept.append(a)
            split *= size
    adapted = tuple((name, tuple(kept) or None) if name == "batch" else
                    (name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)
    return adapted, PartitionSpec(tuple(kept) or None)


def _on_mesh(tree, mesh):
    """Arrays already on `mesh`'s devices keep their shardings; arrays committed elsewhere
    (e.g. loaded onto one device) are replicated onto the mesh, so one jit takes them all."""
    devices = set(mesh.devices.flat)
    replicated = NamedSharding(mesh, PartitionSpec())

    def place(x):
        if isinstance(x, jax.Array) and x.committed and x.sharding.device_set != devices:
            return jax.device_put(x, replicated)
        return x

    return jax.tree.map(place, tree)


def _put(x: np.ndarray, sharding):
    """A host array onto `sharding` (every process passes the same value)."""
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def _placement(mesh, rules, rows: int):
    """(mesh or None, static rules, PartitionSpec of the rows) for a generation call."""
    mesh = jax.sharding.get_mesh() if mesh is None else mesh
    if mesh.empty:
        return None, (), None
    rules = nn.get_logical_axis_rules() if rules is None else rules
    rules, spec = _batch_rules(tuple(rules), mesh, rows)
    return mesh, rules, spec


def _replicated(tree):
    """Outputs replicated across the active mesh (any process can read them)."""
    if jax.sharding.get_abstract_mesh().empty:
        return tree
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, PartitionSpec()), tree)


def _split_rows(out: GenerateOutput) -> GenerateOutput:
    """tokens, logprobs and lengths split over the `batch` axes of the active rules (as
    the prompts are), the counters replicated."""
    if jax.sharding.get_abstract_mesh().empty:
        return out
    rows = lambda x: nn.with_logical_constraint(x, ("batch",) + (None,) * (x.ndim - 1))  # noqa: E731
    return out.replace(tokens=rows(out.tokens), logprobs=rows(out.logprobs), lengths=rows(out.lengths),
                       **_replicated({"forwards": out.forwards, "drafted": out.drafted, "accepted": out.accepted}))


def _in_place(model: Transformer, variables, rows: int = 1):
    """`model` (its config resolved for the platform, `impl.resolved`) and `variables` in
    the weight layout that decoding reads in place: where the layers run unrolled,
    'layers' (`to_layout`: one copy of the layers' weights, made before the decoding
    loop), so that a step does not copy each weight out of the stacks; and the weight
    copies the platform's 'decode_copies' hook makes for steps of `rows` rows (batch x
    tokens per step), in the `impl.DECODE_COPIES` collection."""
    cfg = impl.resolved(model.cfg)
    model = model.clone(cfg=cfg)
    if model.layout == "stacked" and impl.unroll_layers(cfg):
        model, variables = model.clone(layout="layers"), to_layout(variables, "layers")
    prepare = impl.lookup("decode_copies", cfg.matmul_impl)
    copies = prepare(cfg, variables["params"], rows) if prepare is not None else None
    if copies:
        variables = {**variables, impl.DECODE_COPIES: copies}
    return model, variables


def _decoder(model: Transformer, variables, rows: int = 1):
    """The decode-mode model and its variables, in the layout of `_in_place`, for steps of
    `rows` rows."""
    model, variables = _in_place(model, variables, rows)
    return model.clone(decode=True), variables


def _prefill(decoder, variables, cache, prompts):
    B, P = prompts.shape
    positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    out, mutated = decoder.apply({**variables, "cache": cache}, prompts, positions, mtp=False, mutable=["cache"])
    return out, mutated["cache"], positions


_STATIC = ("model", "max_new_tokens", "greedy", "top_k", "top_p", "stop_tokens", "rules", "gather")


def _jit_under_rules(body):
    """`body` jitted, run under its static logical-axis `rules` (part of the jit cache key:
    the rules are read while tracing), with its output replicated (`gather`) or split by
    rows."""

    def run(model, variables, prompts, lengths, rng, temperature, *, rules, gather=True, **static):
        with nn.logical_axis_rules(rules):
            out = body(model, variables, prompts, lengths, rng, temperature, **static)
            return _replicated(out) if gather else _split_rows(out)

    return jax.jit(run, static_argnames=_STATIC)


def _plain(model, variables, prompts, lengths, rng, temperature, *, max_new_tokens, greedy, top_k, top_p,
           stop_tokens):
    B, P = prompts.shape
    N = max_new_tokens
    decoder, variables = _decoder(model, variables, rows=B)
    rows = jnp.arange(B)
    out, cache, _ = _prefill(decoder, variables, init_cache(decoder, B, P + N), prompts)
    last = out.logits[rows, lengths - 1]

    def cond(s):
        return (s["i"] < N) & ~jnp.all(s["done"])

    def body(s):
        rng, sub = jax.random.split(s["rng"])
        tok, _ = _choose(sub, s["last"], greedy, temperature, top_k, top_p)
        logp = jax.nn.log_softmax(s["last"])[rows, tok]
        active = ~s["done"]
        bufs = _emit(s["bufs"], s["i"], active, tok, logp)
        done = s["done"] | _stop_mask(tok, stop_tokens)
        pos = (lengths + s["i"])[:, None]
        o, mutated = decoder.apply({**variables, "cache": s["cache"]}, tok[:, None], pos, mtp=False,
                                   mutable=["cache"])
        return dict(i=s["i"] + 1, rng=rng, last=o.logits[:, 0], cache=mutated["cache"], bufs=bufs, done=done,
                    count=s["count"] + active, forwards=s["forwards"] + 1)

    state = dict(i=jnp.int32(0), rng=rng, last=last, cache=cache,
                 bufs=(jnp.zeros((B, N), jnp.int32), jnp.zeros((B, N), jnp.float32)),
                 done=jnp.zeros((B,), bool), count=jnp.zeros((B,), jnp.int32), forwards=jnp.int32(0))
    s = jax.lax.while_loop(cond, body, state)
    zero = jnp.int32(0)
    return GenerateOutput(s["bufs"][0], s["bufs"][1], s["count"], s["forwards"], zero, zero)


def _speculative(model, variables, prompts, lengths, rng, temperature, *, max_new_tokens, greedy, top_k, top_p,
                 stop_tokens):
    B, P = prompts.shape
    N = max_new_tokens
    decoder, variables = _decoder(model, variables, rows=2 * B)  # a step verifies 2 tokens a row
    rows = jnp.arange(B)
    out, cache, positions = _prefill(decoder, variables, init_cache(decoder, B, P + N + 2), prompts)
    rng, k0, k1 = jax.random.split(rng, 3)
    first, _ = _choose(k0, out.logits[rows, lengths - 1], greedy, temperature, top_k, top_p)
    first_logp = jax.nn.log_softmax(out.logits[rows, lengths - 1])[rows, first]
    # The MTP module's cache over the prompt: position t sees h_t and token t+1.
    nxt = jnp.pad(prompts[:, 1:], ((0, 0), (0, 1))).at[rows, lengths - 1].set(first)
    mtp_logits, mutated = decoder.apply({**variables, "cache": cache}, out.hidden, nxt, positions,
                                        method=Transformer.mtp_step, mutable=["cache"])
    draft_logits = mtp_logits[rows, lengths - 1]
    draft, draft_logp = _choose(k1, draft_logits, greedy, temperature, top_k, top_p)
    bufs = _emit((jnp.zeros((B, N), jnp.int32), jnp.zeros((B, N), jnp.float32)), jnp.zeros((B,), jnp.int32),
                 jnp.ones((B,), bool), first, first_logp)
    done = _stop_mask(first, stop_tokens) | (N <= 1)

    def cond(s):
        return ~jnp.all(s["done"])

    def body(s):
        rng, k_acc, k_bonus, k_draft = jax.random.split(s["rng"], 4)
        active = ~s["done"]
        toks = jnp.stack([s["pending"], s["draft"]], axis=1)
        pos = jnp.stack([s["pos"], s["pos"] + 1], axis=1)
        o, mutated = decoder.apply({**variables, "cache": s["cache"]}, toks, pos, mtp=False, mutable=["cache"])
        p0, p1 = o.logits[:, 0], o.logits[:, 1]
        if greedy:
            target = jnp.argmax(p0, axis=-1).astype(jnp.int32)
            accepted = s["draft"] == target
            new1 = target
        else:
            new1, accepted = speculative_accept(k_acc, sampling_logprobs(p0, temperature, top_k, top_p),
                                                s["draft_logp"], s["draft"])
        bonus, _ = _choose(k_bonus, p1, greedy, temperature, top_k, top_p)
        # Emit new1, then the bonus token if the draft was accepted.
        count = s["count"]
        bufs = _emit(s["bufs"], count, active, new1, jax.nn.log_softmax(p0)[rows, new1])
        done1 = s["done"] | _stop_mask(new1, stop_tokens) | (count + 1 >= N)
        second = active & ~done1 & accepted
        bufs = _emit(bufs, count + 1, second, bonus, jax.nn.log_softmax(p1)[rows, bonus])
        done = done1 | (second & (_stop_mask(bonus, stop_tokens) | (count + 2 >= N)))
        count = count + active + second
        # Draft the next token with the MTP module at the new pending token's predecessor.
        m, mutated = decoder.apply({**variables, "cache": mutated["cache"]}, o.hidden,
                                   jnp.stack([new1, bonus], axis=1), pos, method=Transformer.mtp_step,
                                   mutable=["cache"])
        next_logits = jnp.where(accepted[:, None], m[:, 1], m[:, 0])
        nd, nd_logp = _choose(k_draft, next_logits, greedy, temperature, top_k, top_p)
        pending = jnp.where(accepted, bonus, new1)
        advance = jnp.where(active, 1 + accepted, 0)  # finished rows stay where they are
        return dict(rng=rng, cache=mutated["cache"], bufs=bufs, done=done, count=count,
                    pending=jnp.where(active, pending, s["pending"]), pos=s["pos"] + advance,
                    draft=nd, draft_logp=nd_logp if nd_logp is not None else s["draft_logp"],
                    forwards=s["forwards"] + 1, drafted=s["drafted"] + jnp.sum(active),
                    accepted=s["accepted"] + jnp.sum(active & accepted))

    state = dict(rng=rng, cache=mutated["cache"], bufs=bufs, done=done, count=jnp.ones((B,), jnp.int32),
                 pending=first, pos=lengths, draft=draft,
                 draft_logp=draft_logp if draft_logp is not None else jnp.zeros((B, 1), jnp.float32),
                 forwards=jnp.int32(0), drafted=jnp.int32(0), accepted=jnp.int32(0))
    s = jax.lax.while_loop(cond, body, state)
    return GenerateOutput(s["bufs"][0], s["bufs"][1], s["count"], s["forwards"], s["drafted"], s["accepted"])


_generate_plain = _jit_under_rules(_plain)
_generate_speculative = _jit_under_rules(_speculative)


def generate(model: Transformer, variables, prompts, prompt_lengths, max_new_tokens: int = 32,
             temperature: float = 0.0, rng=None, speculative: bool = False, *, top_k: int = 0,
             top_p: float = 1.0, stop_tokens=(), prompt_bucket: int = 64, mesh=None, rules=None,
             gather: bool = True) -> GenerateOutput:
    """Generates continuations of a batch of prompts.

    Args:
      model, variables: a Transformer and its {'params', 'moe_bias'}, used where they are
        (sharded parameters stay sharded; arrays off the mesh are replicated onto it).
      prompts: int [B, P], right-padded; prompt_lengths: int [B], each in [1, P].
      max_new_tokens: N, tokens to generate per row.
      temperature: 0 for greedy decoding; otherwise sampling with `top_k` (0: off) and
        `top_p` (1: off) and the key `rng`.
      speculative: draft with the first MTP module and verify with the main model.
      stop_tokens: ids that end a row (kept in the output, counted in its length).
      prompt_bucket: prompts are padded to a multiple of this, so a new prompt length
        only recompiles when it crosses a bucket.
      mesh: the jax.sharding.Mesh to run on (default: the one set with `jax.set_mesh`, if
        any; with neither, the devices of the inputs).
      rules: the logical-axis rules of the run, e.g. `sharding.activation_rules("fsdp")`
        (default: those of an enclosing `nn.logical_axis_rules`). Their `batch` axes split
        the rows where B divides them.
      gather: the outputs replicated over the mesh; False: tokens, logprobs and lengths
        stay split by rows as the prompts are (a process reads the rows its devices hold;
        `eval.completions.ProcessRows`), the counters replicated.
    Returns:
      GenerateOutput with tokens [B, N], logprobs [B, N], lengths [B] and counters.
    """
    cfg = model.cfg
    prompts = np.asarray(prompts, np.int32)
    lengths = np.asarray(prompt_lengths, np.int32).reshape(-1)
    if prompts.ndim != 2 or lengths.shape[0] != prompts.shape[0]:
        raise ValueError(f"prompts must be [B, P] with one length per row; got {prompts.shape} and {lengths.shape}")
    if lengths.min() < 1 or lengths.max() > prompts.shape[1]:
        raise ValueError(f"prompt_lengths must be in [1, {prompts.shape[1]}], got {lengths.tolist()}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if speculative and cfg.num_nextn_predict_layers < 1:
        raise ValueError("speculative decoding needs an MTP module (num_nextn_predict_layers >= 1)")
    if temperature > 0 and rng is None:
        raise ValueError("sampling (temperature > 0) needs an explicit rng key")
    P = -(-prompts.shape[1] // prompt_bucket) * prompt_bucket
    if P + max_new_tokens + 2 > cfg.max_position_embeddings and cfg.rope_scaling is None:
        raise ValueError(f"prompt bucket {P} + max_new_tokens {max_new_tokens} exceeds "
                         f"max_position_embeddings={cfg.max_position_embeddings}")
    padded = np.zeros((prompts.shape[0], P), np.int32)
    padded[:, :prompts.shape[1]] = prompts
    variables = {k: v for k, v in variables.items() if k != "cache"}
    rng = rng if rng is not None else jax.random.key(0)
    mesh, rules, rows = _placement(mesh, rules, prompts.shape[0])
    if mesh is None:
        padded, lengths = jnp.asarray(padded), jnp.asarray(lengths)
    else:
        padded, lengths = _put(padded, NamedSharding(mesh, rows)), _put(lengths, NamedSharding(mesh, rows))
        variables, rng = _on_mesh(variables, mesh), _on_mesh(rng, mesh)
    model = model.clone(cfg=impl.resolve(cfg, impl.platform_of(mesh)))  # the platform of the devices it runs on
    fn = _generate_speculative if speculative else _generate_plain
    with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):
        return fn(model, variables, padded, lengths, rng, jnp.float32(max(temperature, 1e-6)),
                  max_new_tokens=max_new_tokens, greedy=temperature == 0, top_k=int(top_k), top_p=float(top_p),
                  stop_tokens=tuple(int(t) for t in stop_tokens), rules=rules, gather=bool(gather))


@functools.partial(jax.jit, static_argnames=("model", "max_len", "rules"))
def _stream_prefill(model, variables, prompt, length, max_len, rules):
    """prompt [1, P] right-padded to its bucket, `length` real tokens -> (logits [V] after
    the last real token, cache of max_len slots). Padding is written past the prompt and
    never read: each query sees only slots at or before its position."""
    with nn.logical_axis_rules(rules):
        decoder = model.clone(decode=True)
        out, cache, _ = _prefill(decoder, variables, init_cache(decoder, 1, max_len), prompt)
    return _replicated(out.logits[0, length - 1]), cache


@functools.partial(jax.jit, static_argnames=("model", "rules"))
def _stream_step(model, variables, cache, token, position, rules):
    with nn.logical_axis_rules(rules):
        out, mutated = model.clone(decode=True).apply({**variables, "cache": cache}, token[None, None],
                                                      position[None, None], mtp=False, mutable=["cache"])
    return _replicated(out.logits[0, 0]), mutated["cache"]


def generate_stream(model: Transformer, variables, prompt, max_new_tokens: int = 64, temperature: float = 0.0,
                    rng=None, *, top_k: int = 0, top_p: float = 1.0, stop_tokens=(), prompt_bucket: int = 64,
                    mesh=None, rules=None):
    """An iterator over the tokens of one continuation as they are decoded (interactive use).

    prompt: int [P]. Same sampling, `prompt_bucket` and `mesh`/`rules` options as
    `generate` (the prompt is padded to a multiple of `prompt_bucket`, so prompt lengths in
    one bucket share one compiled prefill and step); one jitted step per token. Raises
    ValueError at the call (not at the first token) when prompt + max_new_tokens exceed
    the context.
    """
    prompt = np.asarray(prompt, np.int32).reshape(1, -1)
    cfg = model.cfg
    if prompt.shape[1] + max_new_tokens > cfg.max_position_embeddings and cfg.rope_scaling is None:
        raise ValueError(f"the prompt ({prompt.shape[1]} tokens) + max_new_tokens {max_new_tokens} exceeds the "
                         f"model's max_position_embeddings={cfg.max_position_embeddings}")
    if prompt.shape[1] < 1:
        raise ValueError("the prompt is empty")
    if temperature > 0 and rng is None:
        raise ValueError("sampling (temperature > 0) needs an explicit rng key")
    variables = {k: v for k, v in variables.items() if k != "cache"}
    mesh, rules, _ = _placement(mesh, rules, 1)
    model = model.clone(cfg=impl.resolve(cfg, impl.platform_of(mesh)))
    if mesh is not None:
        variables = _on_mesh(variables, mesh)
    P = prompt.shape[1]
    padded = np.zeros((1, -(-P // prompt_bucket) * prompt_bucket), np.int32)
    padded[:, :P] = prompt
    return _stream(model, variables, padded, P, max_new_tokens, temperature, rng, top_k, top_p, stop_tokens, mesh,
                   rules)


def _stream(model, variables, padded, length, max_new_tokens, temperature, rng, top_k, top_p, stop_tokens, mesh,
            rules):
    on_mesh = lambda: contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)  # noqa: E731
    with on_mesh():
        model, variables = _in_place(model, variables)  # one copy of the weights, not one per step
        logits, cache = _stream_prefill(model, variables, jnp.asarray(padded), jnp.int32(length),
                                        padded.shape[1] + max_new_tokens, rules=rules)
    rng = jax.random.key(0) if rng is None else rng
    for i in range(max_new_tokens):
        rng, sub = jax.random.split(rng)
        token, _ = _choose(sub, logits[None], temperature == 0, jnp.float32(max(temperature, 1e-6)), top_k, top_p)
        token = int(token[0])
        yield token
        if token in stop_tokens:
            return
        with on_mesh():
            logits, cache = _stream_step(model, variables, cache, jnp.int32(token), jnp.int32(length + i),
                                         rules=rules)
