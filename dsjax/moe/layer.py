"""The DeepSeekMoE layer (DeepSeek-V2 §2.2, DeepSeek-V3 §2.1.2).

y = Σ shared_i(x) + Σ_{i in topk} g_i FFN_i(x), with fine-grained routed experts and
always-on shared experts (fused into one MLP of width n_shared * F).

The routed experts run one of three ways, by the active mesh and logical-axis rules:
expert-parallel when `experts` is split over several devices
(`dsjax.moe.expert_parallel`); per device (`experts_local`) when only the tokens are
split; otherwise the dispatch `moe_impl` names (`dsjax.impl.moe_dispatch`, chosen for a
device's tokens: a registered 'moe' implementation, the dense reference where none is).
A platform may register a 'moe_shared' form of that dispatch which runs the shared experts
in the same call (the CPU wing's gather kernel); MoE hands it the shared MLP's weights.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsjax import impl
from dsjax.config import ModelConfig
from dsjax.fp8 import Recipe
from dsjax.layers import MLP, dtype_of, param
from dsjax.moe.dispatch import experts_dense, experts_local
from dsjax.moe.expert_parallel import data_parallel_axes, experts_expert_parallel, expert_parallel_axes
from dsjax.moe.routing import Gate, expert_loads, sequence_balance_loss


class MoE(nn.Module):
    """DeepSeekMoE FFN. x: [B, T, D] -> (y [B, T, D], loads [E], balance loss scalar)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jnp.ndarray):
        cfg, dt = impl.resolved(self.cfg), dtype_of(self.cfg.dtype)
        B, T, D = x.shape
        E, F = cfg.n_routed_experts, cfg.moe_intermediate_size
        flat = x.reshape(B * T, D).astype(dt)
        with jax.named_scope("gate"):
            weights, indices, scores = Gate(cfg, name="gate")(flat)
        w1 = param(self, "w1", (E, D, F), ("experts", "embed", "expert_mlp")).astype(dt)
        w3 = param(self, "w3", (E, D, F), ("experts", "embed", "expert_mlp")).astype(dt)
        w2 = param(self, "w2", (E, F, D), ("experts", "expert_mlp", "embed")).astype(dt)
        shared = MLP(cfg, cfg.shared_intermediate_size, name="shared_experts") if cfg.n_shared_experts else None
        fused = False  # the shared experts ran in the routed experts' call
        with jax.named_scope("routed_experts"):
            ep = expert_parallel_axes()
            fp8 = Recipe(cfg.fp8_gemm, cfg.fp8_pow2_scales) if cfg.precision == "fp8" else None
            dp = data_parallel_axes() if ep is None else None
            mesh = jax.sharding.get_abstract_mesh()
            shards = 1 if dp is None else math.prod(mesh.shape[a] for a in dp[0])
            name = impl.moe_dispatch(cfg, tokens=B * T // shards)  # a device's tokens pick the dispatch
            dispatch = impl.lookup("moe", name) or experts_dense
            with_shared = impl.lookup("moe_shared", name)
            if ep is not None:
                y = experts_expert_parallel(flat, weights, indices, w1, w3, w2, *ep, fp8=fp8)
            elif dp is not None and name != "dense":
                y = experts_local(flat, weights, indices, w1, w3, w2, *dp, fp8=fp8, dispatch=dispatch)
            else:
                y = None
                if with_shared is not None and shared is not None and fp8 is None and not self.is_initializing():
                    y = with_shared(flat, weights, indices, w1, w3, w2, shared.weights())  # None: not fused
                    fused = y is not None
                if y is None:
                    y = dispatch(flat, weights, indices, w1, w3, w2, fp8)
            y = y.reshape(B, T, D)
        if shared is not None and not fused:
            with jax.named_scope("shared_experts"):
                y = y + shared(x)
        loads = expert_loads(cfg, indices)
        balance = sequence_balance_loss(cfg, indices, scores, B)
        return y.astype(x.dtype), loads, balance
