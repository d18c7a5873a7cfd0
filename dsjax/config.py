"""Model configuration: one frozen dataclass whose fields are the Hugging Face keys.

`ModelConfig` mirrors the DeepSeek-V2/V3 `config.json` key for key, so a real config maps
1:1 (`ModelConfig.from_hf(json.load(...))`). A few fields that are not in the HF schema
choose implementations (`attn_impl`, `moe_impl`, `dtype`, ...; their values and 'auto'
rules are in dsjax/impl.py); `to_hf()` leaves them out. The defaults are DeepSeek-V3's
`config.json` (the 671B model), as Hugging Face configs default to their model's.
Presets live in `configs/models/*.yaml` and load with `load_model_config(name)`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import yaml

from dsjax import impl


def _config_dir(package_dir: str) -> str:
    """configs/: inside the package as `dsjax/configs/` where `pip install .` puts the YAML
    files (pyproject.toml), else beside it (a checkout, or an editable install)."""
    installed = os.path.join(package_dir, "configs")
    return installed if os.path.isdir(installed) else os.path.join(os.path.dirname(package_dir), "configs")


_CONFIG_DIR = _config_dir(os.path.dirname(os.path.abspath(__file__)))

SCORING_FUNCS = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")

# HF keys that carry no information for the model math; accepted and dropped by from_hf.
_IGNORED_HF_KEYS = frozenset({
    "architectures", "auto_map", "model_type", "transformers_version", "torch_dtype", "dtype",
    "use_cache", "pretraining_tp", "attention_dropout", "ep_size", "aux_loss_alpha", "seq_aux",
    "output_router_logits", "quantization_config", "pad_token_id", "initializer_range",
    "num_key_value_heads", "qk_head_dim", "head_dim", "_name_or_path", "moe_layer_freq",
    "tie_word_embeddings", "attention_bias", "mlp_bias", "hidden_act", "rope_parameters",
    "rope_theta", "rope_scaling", "num_mtp_layers", "router_aux_loss_coef",
})


class ConfigError(ValueError):
    """An impossible or unknown configuration value; the message names the key."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """YaRN rope scaling (DeepSeek-V2 §2.1 / Appendix), HF `rope_scaling` keys.

    Attributes:
      type: 'yarn', the only scaling supported.
      factor: context extension factor s (new context / original_max_position_embeddings).
      original_max_position_embeddings: the context the model was pretrained on.
      beta_fast / beta_slow: rotary dimensions turning more than beta_fast times over the
        original context keep their frequency, those turning fewer than beta_slow times are
        interpolated by `factor`, a linear ramp between.
      mscale / mscale_all_dim: cos/sin are multiplied by mscale(factor, mscale) /
        mscale(factor, mscale_all_dim) and the softmax scale by mscale(factor, mscale_all_dim)^2.
    """

    type: str = "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0

    @classmethod
    def from_hf(cls, d: dict[str, Any] | None) -> "RopeScaling | None":
        if not d:
            return None
        kind = d.get("type", d.get("rope_type", "yarn"))
        if kind == "default":
            return None
        if kind != "yarn":
            raise ConfigError(f"rope_scaling.type={kind!r} is not supported (only 'yarn')")
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known and v is not None}
        kw["type"] = "yarn"
        return cls(**kw)

    def to_hf(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """DeepSeek-V2/V3 architecture. Field names are the HF `config.json` keys.

    The defaults are DeepSeek-V3's (671B parameters): `ModelConfig()` is that model, and a
    `config.json` leaves out only the keys whose value it shares with V3 (`from_hf`).

    Attributes:
      vocab_size: tokens in the vocabulary.
      hidden_size: model width D.
      intermediate_size: hidden width of the dense (first-k) SwiGLU MLPs.
      moe_intermediate_size: hidden width F of each routed / shared expert.
      num_hidden_layers: decoder layers L of the main model (MTP modules come on top).
      num_attention_heads: heads H.
      q_lora_rank: query compression rank Q; None projects queries directly (V2-Lite).
      kv_lora_rank: KV compression rank C (the latent the absorbed cache stores).
      qk_nope_head_dim: per-head query/key width K without RoPE.
      qk_rope_head_dim: decoupled RoPE width R, shared by all heads on the key side.
      v_head_dim: per-head value width V.
      n_routed_experts: routed experts E (0 makes every layer dense).
      n_shared_experts: shared experts; fused into one MLP of width n * F.
      num_experts_per_tok: routed experts per token (top-k).
      first_k_dense_replace: the first k layers use a dense MLP instead of MoE.
      n_group / topk_group: group-limited routing: keep the best `topk_group` of `n_group`.
      topk_method: 'greedy', 'group_limited_greedy' (V2: group score = max) or 'noaux_tc'
        (V3: group score = sum of top-2, selection uses bias-corrected scores).
      scoring_func: 'softmax' (V2) or 'sigmoid' (V3).
      norm_topk_prob: renormalize the top-k weights to sum to one.
      routed_scaling_factor: multiplies the routed output.
      num_nextn_predict_layers: MTP modules (DeepSeek-V3 §2.2).
      rope_theta / rope_scaling / max_position_embeddings: RoPE and YaRN.
      rope_interleave: rotary pairs are interleaved (x0, x1), (x2, x3) as in DeepSeek's
        checkpoints; False uses the rotate-half layout.
      rms_norm_eps: epsilon of the hidden-size norms (q/kv latent norms use 1e-6).
      tie_word_embeddings: share the embedding with the output head.
      bos_token_id / eos_token_id: special token ids.
      initializer_range: standard deviation of the normal initializer of the weights.
      model_type: 'deepseek_v3' or 'deepseek_v2' (the HF `model_type`, kept by `to_hf()`).
      attn_impl: 'naive' (expand K/V per head) or 'absorb' (attend in the latent space).
      attn_kernel: how softmax(q k^T) v runs over a sequence (`dsjax.impl.attention_kernel`):
        'dense' (the float32 scores [B, H, T, S] materialized), 'blockwise' (online
        softmax over 512-token blocks with a recomputing backward pass,
        dsjax/attention.py: the scores are never all live; absorbed MLA attends to the
        shared latents the same way), 'cudnn' (jax.nn.dot_product_attention's cuDNN flash
        attention for the naive form, V padded to the key width, blockwise where cuDNN
        refuses the shapes; GPUs, bf16/fp16), 'splash' (Pallas's splash attention for the
        naive form's causal calls, dsjax/splash_attention.py: TPUs, interpreted elsewhere,
        blockwise where it cannot take the call), 'cpu' (the CPU wing: its native kernels
        in float32, blockwise otherwise) or 'auto' (default; `dsjax.impl.resolve`: 'splash'
        on a TPU). One-query decoding steps run dense under every kernel.
      layer_loop: how the stacked layers run: 'scan' (one compiled layer, looped),
        'unroll' (the same stacked weights, the loop unrolled at compile time),
        'unroll_single_device' (unrolled on one device, scanned under a mesh of several) or
        'auto' (default: 'unroll_single_device' on a CPU, 'scan' on GPUs and TPUs).
      moe_impl: how the routed experts run: 'dense' (every expert on every token,
        reference), 'ragged' (dropless sort + grouped GEMM with jax.lax.ragged_dot), the
        CPU wing's 'blocked' (dropless sort into fixed-size row blocks, each one expert's,
        run as dense GEMMs), 'gather' (a loop over the experts the token copies chose: for
        a few tokens, as in decoding) and 'cpu' (gather for at most two token copies per
        expert, blocked otherwise), or 'auto' (default: ragged on GPUs and TPUs, 'cpu' on
        a CPU, dense there under the FP8 recipe; blocked and gather have no FP8 form).
        Expert parallelism (experts split over a mesh axis) always runs the grouped GEMMs.
      matmul_impl: how the linear layers multiply: 'xla' (x @ w), 'cpu' (the CPU wing:
        weight gradients as plain GEMMs, few-row decoding products through its native
        kernel) or 'auto' (default: 'cpu' on a CPU, 'xla' elsewhere).
      dtype: activation/compute dtype; param_dtype: storage dtype of parameters.
      remat_policy: activation checkpointing of each decoder layer.
      precision: 'default', or 'fp8' for DeepSeek-V3's FP8 recipe in the linear layers of
        MLA, the MLPs, the experts and the MTP blocks (dsjax/fp8.py); the embedding, output
        head, router, norms and attention softmax keep their precision.
      fp8_gemm: how the FP8 GEMMs multiply: 'native' (E4M3 operands, float32 results,
        one GEMM per 128-wide contraction block), 'emulated' (exact float32 copies of the
        E4M3 values in one GEMM: the same sums in another order) or 'auto' (default:
        native off the CPU, emulated on it).
      fp8_pow2_scales: round every FP8 scale up to a power of two (2^ceil(log2(amax / 448))),
        the exponent-only UE8M0 scales of DeepSeek's later recipes (DeepGEMM, V3.1);
        V3's recipe (the default, false) keeps amax / 448.
    """

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    first_k_dense_replace: int = 3
    n_group: int = 8
    topk_group: int = 4
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    num_nextn_predict_layers: int = 1
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rope_interleave: bool = True
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    initializer_range: float = 0.02
    model_type: str = "deepseek_v3"
    # dsjax implementation choices (not HF keys).
    attn_impl: str = "naive"
    attn_kernel: str = "auto"
    moe_impl: str = "auto"
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat_policy: str = "none"
    layer_loop: str = "auto"
    matmul_impl: str = "auto"
    precision: str = "default"
    fp8_gemm: str = "auto"
    fp8_pow2_scales: bool = False

    # ---------------------------------------------------------------- validation
    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling.from_hf(self.rope_scaling))
        if isinstance(self.eos_token_id, (list, tuple)):
            object.__setattr__(self, "eos_token_id", int(self.eos_token_id[0]))
        self.validate()

    def validate(self) -> None:
        positive = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "kv_lora_rank", "qk_rope_head_dim", "v_head_dim", "intermediate_size")
        for name in positive:
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("qk_nope_head_dim", "n_routed_experts", "n_shared_experts",
                     "first_k_dense_replace", "num_nextn_predict_layers"):
            if int(getattr(self, name)) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise ConfigError(f"q_lora_rank must be positive or null, got {self.q_lora_rank}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        for name, allowed in (("scoring_func", SCORING_FUNCS), ("topk_method", TOPK_METHODS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not one of {list(allowed)}")
        for _, message in impl.check(self):
            raise ConfigError(message)
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise ConfigError(f"first_k_dense_replace={self.first_k_dense_replace} exceeds "
                              f"num_hidden_layers={self.num_hidden_layers}")
        if self.num_moe_layers > 0:
            if self.moe_intermediate_size <= 0:
                raise ConfigError(f"moe_intermediate_size must be positive, got {self.moe_intermediate_size}")
            if not 0 < self.num_experts_per_tok <= self.n_routed_experts:
                raise ConfigError(f"num_experts_per_tok={self.num_experts_per_tok} must be in "
                                  f"[1, n_routed_experts={self.n_routed_experts}]")
            if self.n_group <= 0 or self.n_routed_experts % self.n_group:
                raise ConfigError(f"n_routed_experts={self.n_routed_experts} is not divisible by "
                                  f"n_group={self.n_group}")
            if not 0 < self.topk_group <= self.n_group:
                raise ConfigError(f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
            if self.num_experts_per_tok > self.topk_group * self.experts_per_group:
                raise ConfigError(f"num_experts_per_tok={self.num_experts_per_tok} exceeds the "
                                  f"{self.topk_group * self.experts_per_group} experts in topk_group="
                                  f"{self.topk_group} groups")
            if self.topk_method == "noaux_tc" and self.n_group > 1 and self.experts_per_group < 2:
                raise ConfigError("topk_method='noaux_tc' scores a group by its top-2 experts: "
                                  f"n_routed_experts / n_group must be >= 2, got {self.experts_per_group}")
        if self.bos_token_id is not None and not 0 <= self.bos_token_id < self.vocab_size:
            raise ConfigError(f"bos_token_id={self.bos_token_id} outside the vocabulary")
        if self.eos_token_id is not None and not 0 <= self.eos_token_id < self.vocab_size:
            raise ConfigError(f"eos_token_id={self.eos_token_id} outside the vocabulary")

    # ------------------------------------------------------------- derived sizes
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_dense_layers(self) -> int:
        if self.n_routed_experts == 0:
            return self.num_hidden_layers
        return self.first_k_dense_replace

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.num_dense_layers

    @property
    def experts_per_group(self) -> int:
        return self.n_routed_experts // max(self.n_group, 1)

    @property
    def shared_intermediate_size(self) -> int:
        return self.n_shared_experts * self.moe_intermediate_size

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(K+R), times YaRN's mscale(factor, mscale_all_dim)^2 when scaled."""
        scale = self.qk_head_dim ** -0.5
        rs = self.rope_scaling
        if rs is not None and rs.mscale_all_dim:
            m = yarn_get_mscale(rs.factor, rs.mscale_all_dim)
            scale = scale * m * m
        return scale

    @property
    def cache_values_per_token(self) -> int:
        """Values per token per layer in the absorbed MLA cache: C + R."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    # ------------------------------------------------------------------ HF I/O
    @classmethod
    def from_hf(cls, d: dict[str, Any], **overrides: Any) -> "ModelConfig":
        """Builds a config from a Hugging Face DeepSeek-V2/V3 `config.json` dict.

        Accepts both the original keys (`rope_theta`, `rope_scaling`) and the
        transformers >= 5 `rope_parameters` form. V2 defaults apply for
        `model_type == 'deepseek_v2'` where a key is absent.
        """
        d = dict(d)
        if d.get("attention_bias") or d.get("mlp_bias"):
            raise ConfigError("attention_bias / mlp_bias = true is not supported by DeepSeek models here")
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act={d['hidden_act']!r} is not supported (only 'silu')")
        if int(d.get("moe_layer_freq", 1)) != 1:
            raise ConfigError(f"moe_layer_freq={d['moe_layer_freq']} is not supported (only 1)")
        kw: dict[str, Any] = {}
        model_type = d.get("model_type", "deepseek_v3")
        if model_type == "deepseek_v2":
            kw.update(topk_method="greedy", scoring_func="softmax", norm_topk_prob=False,
                      routed_scaling_factor=1.0, num_nextn_predict_layers=0, n_group=1,
                      topk_group=1, first_k_dense_replace=0)
        rope = d.get("rope_parameters") or {}
        theta = d.get("rope_theta", rope.get("rope_theta"))
        if theta is not None:
            kw["rope_theta"] = float(theta)
        scaling = d.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        kw["rope_scaling"] = RopeScaling.from_hf(scaling)
        if "num_mtp_layers" in d and "num_nextn_predict_layers" not in d:
            d["num_nextn_predict_layers"] = d["num_mtp_layers"]
        fields = {f.name for f in dataclasses.fields(cls)}
        for k, v in d.items():
            if k in fields and k != "rope_scaling" and k != "rope_theta":
                if v is None and k in ("n_group", "topk_group"):
                    v = 1
                kw[k] = v
        kw.update(overrides)
        return cls(**kw)

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` dict (DeepSeek's own key names; transformers reads it)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in impl.IMPL_FIELDS}
        out["rope_scaling"] = self.rope_scaling.to_hf() if self.rope_scaling else None
        arch = "DeepseekV2ForCausalLM" if self.model_type == "deepseek_v2" else "DeepseekV3ForCausalLM"
        out.update(architectures=[arch], num_key_value_heads=self.num_attention_heads,
                   hidden_act="silu", attention_bias=False, moe_layer_freq=1,
                   torch_dtype="bfloat16" if self.param_dtype == "bfloat16" else "float32")
        return out

    def replace(self, **kw: Any) -> "ModelConfig":
        return dataclasses.replace(self, **kw)


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature: 0.1 * mscale * ln(scale) + 1 (1 for scale <= 1)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def preset_names() -> list[str]:
    """Names of the model presets under configs/models/."""
    d = os.path.join(_CONFIG_DIR, "models")
    return sorted(f[:-5] for f in os.listdir(d) if f.endswith(".yaml"))


def load_model_config(name_or_path: str, **overrides: Any) -> ModelConfig:
    """Loads a model preset by name (`tiny`, `deepseek-v3-671b`, ...) or YAML/JSON path.

    Unknown keys are an error naming the key.
    """
    path = name_or_path
    if not os.path.exists(path):
        path = os.path.join(_CONFIG_DIR, "models", f"{name_or_path}.yaml")
        if not os.path.exists(path):
            raise ConfigError(f"unknown model preset {name_or_path!r}; presets: {preset_names()}")
    with open(path) as f:
        d = yaml.safe_load(f) or {}
    return config_from_dict(d, **overrides)


def config_from_dict(d: dict[str, Any], **overrides: Any) -> ModelConfig:
    """Strict construction from a dict of ModelConfig fields (unknown keys rejected)."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    for k in list(d) + list(overrides):
        if k not in fields:
            raise ConfigError(f"unknown model config key {k!r}")
    merged = {**d, **overrides}
    return ModelConfig(**merged)


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts from the architecture alone (no arrays), main model and MTP apart.

    `activated` counts what one token's forward pass multiplies with: everything but the
    embedding table (a row lookup) and the routed experts it is not sent to.
    `mtp_activated` does the same for the MTP modules, with their use of the shared head.
    """
    D, H, V = cfg.hidden_size, cfg.num_attention_heads, cfg.vocab_size
    K, R, Vh, C = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    if cfg.q_lora_rank is None:
        attn = D * H * (K + R)
    else:
        attn = D * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * H * (K + R)
    attn += D * (C + R) + C + C * H * (K + Vh) + H * Vh * D + 2 * D
    E, F = cfg.n_routed_experts, cfg.moe_intermediate_size
    dense = attn + 3 * D * cfg.intermediate_size
    routed = 3 * E * D * F
    moe = attn + D * E + routed + 3 * D * cfg.shared_intermediate_size
    head = 0 if cfg.tie_word_embeddings else D * V
    total = V * D + head + D + cfg.num_dense_layers * dense + cfg.num_moe_layers * moe
    inactive = cfg.num_moe_layers * routed * (E - cfg.num_experts_per_tok) // max(E, 1)
    mtp_block = moe if cfg.n_routed_experts else dense
    mtp = cfg.num_nextn_predict_layers * (3 * D + 2 * D * D + mtp_block)
    mtp_inactive = cfg.num_nextn_predict_layers * (routed * (E - cfg.num_experts_per_tok) // max(E, 1)
                                                   if cfg.n_routed_experts else 0)
    return {"total": total, "activated": total - V * D - inactive, "mtp": mtp,
            "mtp_activated": mtp - mtp_inactive + cfg.num_nextn_predict_layers * D * V}
