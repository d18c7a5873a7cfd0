"""Memory plan for `python -m train --dry-run`: per-device bytes of a layout, from
`jax.eval_shape` and the sharding rules, allocating nothing and needing no devices.

Parameters, gradients and AdamW's two moments are float32 (master weights) and split as
the rules say. Activations are an estimate, per device, of what the backward pass keeps:

- `remat_policy=none`: every intermediate of every layer (norm outputs, the query and KV
  paths, per-head keys and values, float32 attention scores, the MoE hidden units of the
  k routed copies and the shared experts);
- `dots` / `dots_no_batch`: the matmul outputs among those (scores included);
- `full`: each layer's input, plus one layer's intermediates while it is recomputed;
plus the float32 logits of the main head and the MTP heads.
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


def memory_plan(run_cfg, num_devices: int, device_memory_gib: float, backend: str | None = None) -> MemoryPlan:
    """Per-device memory of training `run_cfg` on `num_devices` devices of `backend`
    ('cpu', 'gpu' or 'tpu'; default: that of JAX's devices; the model's implementation
    choices are resolved for it), allocating nothing."""
    cfg = impl.resolve(run_cfg.model.replace(param_dtype="float32"), backend or impl.platform_of(jax.devices()))
    tcfg = run_cfg.train
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
    L_dense, L_moe = cfg.num_dense_layers, cfg.num_moe_layers + cfg.num_nextn_predict_layers
    if cfg.remat_policy == "none":
        per_token = L_dense * dense_all + L_moe * moe_all
    elif cfg.remat_policy == "full":
        per_token = (L_dense + L_moe) * cfg.hidden_size + max(dense_all, moe_all if L_moe else 0)
    else:
        per_token = L_dense * dense_dots + L_moe * moe_dots
    vocab_split = sizes["tensor"] if preset == "fsdp_tp" else 1
    # Per head, float32: the logits, their exponentials and their gradient.
    logits = 3 * tokens * cfg.vocab_size / vocab_split * 4 * (1 + cfg.num_nextn_predict_layers)
    rows = {
        "parameters (fp32)": params,
        "gradients (fp32)": params,
        "AdamW moments (fp32)": 2 * params,
        "router bias": bias,
        f"activations ({cfg.remat_policy})": int(tokens * per_token * act_bytes + logits),
    }
    return MemoryPlan({a: sizes[a] for a in AXES}, rows, int(device_memory_gib * GiB),
                      "expert-parallel" if expert_parallel else dispatch)
