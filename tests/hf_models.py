"""Tiny random Hugging Face DeepSeek models for parity tests (built here, never downloaded)."""

from __future__ import annotations

import torch
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

_BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
             num_attention_heads=4, kv_lora_rank=16, qk_rope_head_dim=8, v_head_dim=12,
             qk_nope_head_dim=8, rope_theta=10000.0, max_position_embeddings=64)

# Four configs that together cover the matrix.
CONFIGS = {
    # sigmoid + noaux_tc + groups, q_lora, first_k_dense 1, 1 shared expert, YaRN (T > original).
    "v3_yarn_groups": ("v3", dict(_BASE, num_hidden_layers=3, q_lora_rank=24, n_routed_experts=8,
                                  n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
                                  first_k_dense_replace=1, routed_scaling_factor=2.5,
                                  rope_scaling={"type": "yarn", "factor": 4.0,
                                                "original_max_position_embeddings": 16, "beta_fast": 32,
                                                "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})),
    # V2-Lite-like: softmax + group_limited_greedy, no q_lora, first_k_dense 0, 2 shared experts.
    "v2_lite_like": ("v2", dict(_BASE, num_hidden_layers=2, q_lora_rank=None, n_routed_experts=8,
                                n_shared_experts=2, num_experts_per_tok=3, n_group=4, topk_group=2,
                                topk_method="group_limited_greedy", first_k_dense_replace=0,
                                routed_scaling_factor=1.0)),
    # V2 greedy softmax, q_lora, two dense layers, no shared expert, YaRN with mscale 0.707.
    "v2_yarn_noshared": ("v2", dict(_BASE, num_hidden_layers=3, q_lora_rank=24, n_routed_experts=6,
                                    n_shared_experts=0, num_experts_per_tok=2, topk_method="greedy",
                                    first_k_dense_replace=2, routed_scaling_factor=16.0,
                                    rope_scaling={"type": "yarn", "factor": 8.0,
                                                  "original_max_position_embeddings": 16, "beta_fast": 32,
                                                  "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707})),
    # V3 without groups, first_k_dense 0, 2 shared experts, rotate-half RoPE layout.
    "v3_flat_shared2": ("v3", dict(_BASE, num_hidden_layers=2, q_lora_rank=20, n_routed_experts=8,
                                   n_shared_experts=2, num_experts_per_tok=3, n_group=1, topk_group=1,
                                   first_k_dense_replace=0, routed_scaling_factor=1.5,
                                   rope_interleave=False)),
}


def build_hf(name: str, seed: int = 0):
    """A random HF model of CONFIGS[name], every weight (and the router bias) non-trivial."""
    kind, kw = CONFIGS[name]
    torch.manual_seed(seed)
    if kind == "v3":
        model = DeepseekV3ForCausalLM(DeepseekV3Config(num_key_value_heads=kw["num_attention_heads"], **kw))
    else:
        model = DeepseekV2ForCausalLM(DeepseekV2Config(num_key_value_heads=kw["num_attention_heads"], **kw))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.15)
        for mod in model.modules():
            if hasattr(mod, "e_score_correction_bias"):
                mod.e_score_correction_bias.normal_(0.0, 0.1)
    return model.eval()
