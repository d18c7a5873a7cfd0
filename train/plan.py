"""Memory plan for `python -m train --dry-run`: per-device bytes of a layout, from
`jax.eval_shape` and the sharding rules, allocating nothing and needing no devices.

Parameters, gradients and AdamW's two moments are float32 (master weights) and split as
the rules say. Activations are an estimate, per device, of what the backward pass keeps:

- `remat_policy=none`: every intermediate of every layer (norm outputs, the query and KV
  paths, per-head keys and values, float32 attention scores, the MoE hidden units of the
  k routed copies and the shared experts);
- `dots` / `dots_no_batch`: the matmul outputs among those (scores included);
- `full`: each layer's input, plus one layer's intermediates while it is recomputed;
plus the float32 logits of the main head and the MTP heads; and, under fsdp, two scanned
layers' weights gathered in the compute dtype with their whole float32 gradients (the
layer running and the one XLA's collective pipelining gathers or reduces beside it).

`python -m train --dry-run --topology NAME` compiles the same step for a TPU slice
(train/aot.py) and prints this plan beside XLA:TPU's memory analysis; docs/scaling.md
gives the two side by side for small, V2-Lite and V3.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dsjax import impl
from dsjax.attention import causal_chunks
from dsjax.model import Transformer
from dsjax.cpu.moe import block_rows
from sharding.mesh import AXES
from sharding.rules import per_device_bytes

GiB = 2**30


@dataclasses.dataclass
class MemoryPlan:
    mesh: dict[str, int]
    rows: dict[str, int]  # name -> bytes per device
    capacity: int
    dispatch: str  # the routed experts' dispatch planned for ('dense', 'ragged', 'expert-parallel')

    @property
    def total(self) -> int:
        return sum(self.rows.values())

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity

    def table(self) -> str:
        lines = [f"mesh {' x '.join(f'{a}={n}' for a, n in self.mesh.items())}"]
        for name, value in self.rows.items():
            lines.append(f"  {name:<24}{value / GiB:10.2f} GiB")
        lines.append(f"  {'total per device':<24}{self.total / GiB:10.2f} GiB of {self.capacity / GiB:.0f} GiB")
        return "\n".join(lines)


def _layer_activation_values(cfg, seq_len: int, moe: bool, tensor: int, dispatch: str,
                              expert_parallel: bool, tokens: int = 1) -> tuple[float, float]:
    """(all intermediates, matmul outputs) per token of one layer, in values (not bytes);
    the float32 attention scores are counted twice to weigh 4 bytes against 2 (blockwise:
    none, but the key and value prefixes of its causal query chunks). The routed
    experts count what the dispatch in force keeps: the dense form every expert's hidden
    units, the grouped GEMMs the k copies' (blocked: its padded rows, for a device's
    `tokens`), and the expert-parallel exchange only the copies it sends and gets back
    (its backward pass moves them again and recomputes)."""
    D, H, T = cfg.hidden_size, cfg.num_attention_heads / tensor, seq_len
    K, R, V, C = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    q = (cfg.q_lora_rank or 0) + H * (K + R)
    kv = (C + R) + H * (K + V)
    kernel = impl.attention_kernel(cfg, T)
    scores = 0 if kernel != "dense" else 2 * H * T  # float32
    if kernel == "blockwise":  # each causal chunk keeps its own key and value prefix
        scores += (causal_chunks(T) - 1) / 2 * H * (K + R + V)
    if moe:
        k, E, F = cfg.num_experts_per_tok, cfg.n_routed_experts, cfg.moe_intermediate_size
        if expert_parallel:
            routed = 2 * k * D
        elif dispatch == "dense":  # per expert unit: x W1, x W3, SiLU's two factors, the gated
            routed = 7 * E * F / tensor + E  # product, its combine-weighted copy, and one more
        elif dispatch == "blocked":  # its VJP keeps each padded row, x W1 and x W3; the combine
            b = block_rows(tokens * k, E)  # keeps the k unsorted outputs
            rows = -(-(tokens * k + E * (b - 1)) // b) * b / tokens  # padded rows per token
            routed = rows * (D + 2 * F / tensor) + k * D
        else:
            routed = k * (2 * D + 3 * F / tensor)
        ffn = routed + 3 * cfg.shared_intermediate_size / tensor
    else:
        ffn = 3 * cfg.intermediate_size / tensor
    dots = q + kv + scores + H * V + D + ffn
    return dots + 6 * D, dots


def gathered_layer_bytes(boxed_params, sizes: dict[str, int], preset: str) -> int:
    """float32 bytes of the largest scanned layer's weights on one device once gathered over
    the `fsdp` axis (experts and tensor splits kept): what a layer of the scan all-gathers
    before it runs, and the size of its weight gradient before the reduce-scatter."""
    import flax.linen as nn

    whole = {**sizes, "fsdp": 1}
    best = 0
    for name in ("dense_layers", "moe_layers"):
        stack = boxed_params.get(name)
        if not stack:
            continue
        first = jax.tree.leaves(stack, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
        layers = (first.value if isinstance(first, nn.LogicallyPartitioned) else first).shape[0]
        best = max(best, per_device_bytes(stack, whole, preset) // layers)
    return best


def memory_plan(run_cfg, num_devices: int, device_memory_gib: float, backend: str | None = None, *,
                batch_size: int | None = None, seq_len: int | None = None, reference: bool = False,
                mtp: bool = True) -> MemoryPlan:
    """Per-device memory of training `run_cfg` on `num_devices` devices of `backend`
    ('cpu', 'gpu' or 'tpu'; default: that of JAX's devices; the model's implementation
    choices are resolved for it), allocating nothing.

    `batch_size` / `seq_len` replace train.batch_size / train.seq_len (GRPO's update
    step trains on its rollout's rows); `reference` adds a frozen float32 copy of the
    parameters (GRPO with beta > 0); `mtp=False` leaves out the MTP heads' activations and
    logits (a step that does not call them: GRPO)."""
    cfg = impl.resolve(run_cfg.model.replace(param_dtype="float32"), backend or impl.platform_of(jax.devices()))
    tcfg = dataclasses.replace(run_cfg.train, batch_size=batch_size or run_cfg.train.batch_size,
                               seq_len=seq_len or run_cfg.train.seq_len)
    sizes = run_cfg.mesh.sizes(num_devices)
    boxed = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), jax.ShapeDtypeStruct((1, 1), jnp.int32))
    preset = run_cfg.mesh.rules
    params = per_device_bytes(boxed["params"], sizes, preset)
    bias = per_device_bytes(boxed.get("moe_bias", {}), sizes, preset)
    batch_split = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    if tcfg.batch_size % batch_split:
        raise ValueError(f"train.batch_size={tcfg.batch_size} does not divide over data x fsdp x expert = "
                         f"{batch_split} devices")
    tokens = tcfg.batch_size // batch_split * tcfg.seq_len
    act_bytes = jnp.dtype(cfg.dtype).itemsize
    dispatch = impl.moe_dispatch(cfg)
    expert_parallel = sizes["expert"] > 1 and preset != "dp"
    dense_all, dense_dots = _layer_activation_values(cfg, tcfg.seq_len, False, sizes["tensor"], dispatch, False)
    moe_all, moe_dots = _layer_activation_values(cfg, tcfg.seq_len, True, sizes["tensor"], dispatch,
                                                 expert_parallel, tokens)
    heads = cfg.num_nextn_predict_layers if mtp else 0  # MTP modules the step calls
    L_dense, L_moe = cfg.num_dense_layers, cfg.num_moe_layers + heads
    if cfg.remat_policy == "none":
        per_token = L_dense * dense_all + L_moe * moe_all
    elif cfg.remat_policy == "full":
        per_token = (L_dense + L_moe) * cfg.hidden_size + max(dense_all, moe_all if L_moe else 0)
    else:
        per_token = L_dense * dense_dots + L_moe * moe_dots
    vocab_split = sizes["tensor"] if preset == "fsdp_tp" else 1
    # Per head, float32: the logits, their exponentials and their gradient.
    logits = 3 * tokens * cfg.vocab_size / vocab_split * 4 * (1 + heads)
    rows = {
        "parameters (fp32)": params,
        "gradients (fp32)": params,
        "AdamW moments (fp32)": 2 * params,
        **({"reference parameters (fp32)": params} if reference else {}),
        "router bias": bias,
        f"activations ({cfg.remat_policy})": int(tokens * per_token * act_bytes + logits),
    }
    if sizes["fsdp"] > 1:
        # A scanned layer runs on its weights gathered over fsdp (in the compute dtype) and
        # makes its weight gradient whole (float32) before reducing it over fsdp; two layers
        # of both are live at once: XLA's collective pipelining gathers the next layer and
        # reduces the last one's gradient while a layer computes.
        layer = gathered_layer_bytes(boxed["params"], sizes, preset)
        rows["gathered layers (2, fsdp)"] = int(2 * layer * (act_bytes / 4 + 1))
    return MemoryPlan({a: sizes[a] for a in AXES}, rows, int(device_memory_gib * GiB),
                      "expert-parallel" if expert_parallel else dispatch)
