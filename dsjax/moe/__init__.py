"""DeepSeekMoE (DeepSeek-V2 §2.2, DeepSeek-V3 §2.1.2): `routing` (the gate and top-k
routing), `dispatch` (the routed experts' local dispatches: the dense reference, the
grouped GEMM, per device), `expert_parallel` (experts split over a mesh axis) and `layer`
(the `MoE` module that runs them)."""

from dsjax.moe.dispatch import experts_dense, experts_local, experts_ragged, grouped_swiglu, swiglu
from dsjax.moe.expert_parallel import data_parallel_axes, experts_expert_parallel, expert_parallel_axes
from dsjax.moe.layer import MoE
from dsjax.moe.routing import Gate, expert_loads, route, sequence_balance_loss

__all__ = ["Gate", "MoE", "route", "expert_loads", "sequence_balance_loss", "experts_dense", "experts_ragged",
           "experts_local", "experts_expert_parallel", "expert_parallel_axes", "data_parallel_axes",
           "grouped_swiglu", "swiglu"]
