"""dsjax: DeepSeek-V2/V3/R1 in JAX/Flax.

Dimension legend, used in every einsum and shape comment:
  B batch, T query length, S key length, D model dim (hidden_size), H heads,
  K nope head dim (qk_nope_head_dim), R rope head dim (qk_rope_head_dim),
  V value head dim, C kv_lora_rank, Q q_lora_rank, E routed experts,
  F expert hidden (moe_intermediate_size), G expert groups, L layers, N tokens (B*T).

The core (this package) runs on every platform; the CPU wing (`dsjax.cpu`) registers its
implementations in `dsjax.impl` when dsjax is imported, and is imported nowhere else.
"""

from dsjax import cpu  # noqa: F401  (registers the CPU wing's implementations)
from dsjax.checkpoint import load_trained
from dsjax.config import ConfigError, ModelConfig, RopeScaling, load_model_config, preset_names
from dsjax.decoding import GenerateOutput, generate, generate_stream
from dsjax.hf import from_pretrained, save_pretrained
from dsjax.model import ModelOutput, Transformer, unbox

__all__ = [
    "ConfigError", "ModelConfig", "RopeScaling", "load_model_config", "preset_names",
    "from_pretrained", "save_pretrained", "ModelOutput", "Transformer", "unbox",
    "generate", "generate_stream", "GenerateOutput", "load_trained",
]
