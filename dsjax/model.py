"""The DeepSeek-V2/V3 decoder: embedding, scanned MLA + (dense | MoE) blocks, head, MTP.

Layers are stacked on a leading `layers` axis and run under `nn.scan`: one scan for the
first `first_k_dense_replace` dense layers, one for the MoE layers (DeepSeek-V3 §2,
Figure 2). `Transformer.__call__` is pure: it returns a `ModelOutput` with the logits,
the MTP logits (§2.2), the tokens routed to each expert per MoE layer and the
sequence-wise balance-loss term per MoE layer, so training needs no mutable collections.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from dsjax.config import ModelConfig
from dsjax.block import Block
from dsjax.layers import RMSNorm, decode_transposed, dtype_of, matmul, param
from dsjax.mtp import MTP
from dsjax.rope import rope_tables

_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


@flax.struct.dataclass
class ModelOutput:
    """What one forward pass returns.

    Attributes:
      logits: float32 [B, T, vocab]; position t predicts token t+1.
      mtp_logits: float32 [num_nextn_predict_layers, B, T, vocab] or None; module k
        (0-based) at position t predicts token t+2+k.
      expert_loads: float32 [L_moe, E], tokens routed to each expert in each MoE layer.
      balance_loss: float32 [L_moe], V3's sequence-wise balance loss per MoE layer.
      mtp_expert_loads / mtp_balance_loss: the same for the MTP modules' MoE blocks
        ([num_nextn_predict_layers, E] / [num_nextn_predict_layers]) or None.
      hidden: float32 [B, T, D], the final normalized hidden state (MTP's input).
    """

    logits: jnp.ndarray
    mtp_logits: Any = None
    expert_loads: Any = None
    balance_loss: Any = None
    mtp_expert_loads: Any = None
    mtp_balance_loss: Any = None
    hidden: Any = None


def scanned_blocks(cfg: ModelConfig, moe: bool, length: int, name: str, decode: bool = False) -> nn.Module:
    """`length` Blocks stacked on a leading `layers` axis, run with nn.scan (+ remat),
    unrolled where `cfg.unroll_layers()` says so."""
    block = Block
    if cfg.remat_policy != "none" and not decode:
        block = nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat_policy], prevent_cse=False)
    scanned = nn.scan(block, variable_axes={"params": 0, "moe_bias": 0, "cache": 0, "decode_weights": 0},
                      split_rngs={"params": True},
                      in_axes=(nn.broadcast,) * 4, length=length, unroll=length if cfg.unroll_layers() else 1,
                      metadata_params={nn.PARTITION_NAME: "layers"})
    return scanned(cfg, moe=moe, decode=decode, name=name)


class LayerList(nn.Module):
    """`length` Blocks with their own weights (`layer_0`, `layer_1`, ...): the 'layers'
    layout of `Transformer.layout`, with the same call and outputs as `scanned_blocks`."""

    cfg: ModelConfig
    moe: bool
    length: int
    decode: bool = False

    @nn.compact
    def __call__(self, x, cos, sin, mask, positions):
        aux = []
        for i in range(self.length):
            x, a = Block(self.cfg, moe=self.moe, decode=self.decode, name=f"layer_{i}")(x, cos, sin, mask, positions)
            aux.append(a)
        return x, jax.tree.map(lambda *a: jnp.stack(a), *aux)


LAYOUTS = ("stacked", "layers")
_STACKS = ("dense_layers", "moe_layers")


def _boxed(x) -> bool:
    return isinstance(x, nn.LogicallyPartitioned)


def _layer(x, i: int):
    """Layer i of a stacked array, or of a boxed one (its leading `layers` axis name dropped)."""
    return x.replace(value=x.value[i], names=x.names[1:]) if _boxed(x) else x[i]


def to_layout(variables: dict, layout: str) -> dict:
    """Variables of a stacked Transformer (the checkpoint layout) in `layout` (see
    `Transformer.layout`): for 'layers', each collection's `dense_layers` / `moe_layers`
    tree of [L, ...] arrays becomes {'layer_0': tree[0], ...}, a copy of the layers'
    weights (boxed variables keep their axis names, less the leading `layers`)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "stacked":
        return variables

    def split(tree):
        if not isinstance(tree, dict):
            return tree
        out = dict(tree)
        for key in _STACKS:
            if key in tree:
                length = jax.tree.leaves(tree[key])[0].shape[0]
                out[key] = {f"layer_{i}": jax.tree.map(lambda x, i=i: _layer(x, i), tree[key], is_leaf=_boxed)
                            for i in range(length)}
        return out

    return {name: split(tree) for name, tree in variables.items()}


# Weights of the few-row products a decode step runs through `layers.matmul`'s kernel:
# {name: dimensions contracted}, in an attention block ('attn'), a dense MLP (an 'ffn'
# without a router), an MTP module, and the output head.
_TRANSPOSED_ATTN = {"wq": 1, "wq_a": 1, "wq_b": 1, "wkv_a": 1, "wo": 2}
_TRANSPOSED_MLP = {"w1": 1, "w3": 1, "w2": 1}
_FOLDED = ("wq", "wq_b")  # absorbed MLA decodes with these folded (`wq_folded_t`)
_BASE_NDIM = {"wq": 3, "wq_a": 2, "wq_b": 3, "wkv_a": 2, "wo": 3, "w1": 2, "w3": 2, "w2": 2, "eh_proj": 2, "head": 2}


def decode_weights(params, absorbed: bool = True, transposed: bool = False) -> dict:
    """The `decode_weights` collection for `params` (any layout; stacked layers keep their
    leading axis). `dsjax.generate` makes it once per call, outside its decoding loop,
    since XLA does not hoist the transposes out of the loop itself.

    `absorbed`: each MLA block's wkv_b [C, H, K + V] copied head-major as `wkv_b_heads`
    [H, C, K + V], the layout the absorbed attention's per-head products read without a
    copy. `transposed`: each projection, dense MLP matrix, MTP input projection and the
    output head as `<name>_t` [N, K] (the weight [K..., N...] flattened and transposed;
    the tied embedding is the head's as it is), which `layers.matmul` hands to the native
    few-row kernel (`layers.rows_kernel_applies`). The transposed copies take as much
    memory again as those weights, for the call.
    """

    def flat_t(x, name, contract):
        value = x.value if _boxed(x) else x
        lead = value.shape[:value.ndim - _BASE_NDIM[name]]
        dims = value.shape[len(lead):]
        k = math.prod(dims[:contract])
        t = jnp.swapaxes(value.reshape(lead + (k, math.prod(dims[contract:]))), -1, -2)
        if _boxed(x):
            return x.replace(value=t, names=tuple(x.names[:len(lead)]) + (None, None))
        return t

    def heads_major(x):
        n = (x.value if _boxed(x) else x).ndim
        perm = tuple(range(n - 3)) + (n - 2, n - 3, n - 1)
        if _boxed(x):
            return x.replace(value=jnp.transpose(x.value, perm), names=tuple(x.names[i] for i in perm))
        return jnp.transpose(x, perm)

    def walk(tree, parent=None):
        out = {}
        mlp = parent == "ffn" and "gate" not in tree  # a dense layer's MLP, not a MoE layer's
        for key, sub in tree.items():
            if key == "wkv_b" and absorbed:
                out["wkv_b_heads"] = heads_major(sub)
            elif isinstance(sub, Mapping):
                found = walk(sub, key)
                if transposed and absorbed and key == "attn" and "wkv_b" in sub:
                    found.update(folds(sub))
                if found:
                    out[key] = found
            elif transposed and parent == "attn" and key in _TRANSPOSED_ATTN and not (absorbed and key in _FOLDED):
                out[key + "_t"] = flat_t(sub, key, _TRANSPOSED_ATTN[key])
            elif transposed and mlp and key in _TRANSPOSED_MLP:
                out[key + "_t"] = flat_t(sub, key, 1)
            elif transposed and key == "eh_proj":
                out[key + "_t"] = flat_t(sub, key, 1)
        return out

    def folds(attn):
        """W_UK folded into the query projection, transposed: wq_folded_t [H * (C + R),
        q_lora or D]. (W_UV stays out of the output projection, `MLA.folded` says why.)"""
        val = lambda x: (x.value if _boxed(x) else x).astype(jnp.float32)  # noqa: E731 (the kernel's dtype)
        wkv_b, wo = val(attn["wkv_b"]), val(attn["wo"])
        wq = val(attn["wq_b"] if "wq_b" in attn else attn["wq"])
        V = wo.shape[-2]
        K = wkv_b.shape[-1] - V
        q_lat = jnp.einsum("...lhk,...chk->...lhc", wq[..., :K], wkv_b[..., :K])
        wq_f = jnp.concatenate([q_lat, wq[..., K:]], -1)  # [..., L, H, C + R]
        return {"wq_folded_t": jnp.swapaxes(wq_f.reshape(wq_f.shape[:-2] + (-1,)), -1, -2)}

    out = walk(params)
    if transposed and "head" in params:
        out["head_t"] = flat_t(params["head"], "head", 1)
    elif transposed and "embed" in params:
        out["head_t"] = params["embed"]
    return out


def attention_mask(batch: int, length: int, segment_ids=None) -> jnp.ndarray:
    """Causal mask, restricted to equal segments when given. Returns bool [B, T, T]."""
    B, T = batch, length
    idx = jnp.arange(T)
    mask = jnp.broadcast_to(idx[None, :, None] >= idx[None, None, :], (B, T, T))
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return mask


class Transformer(nn.Module):
    """DeepSeek-V2/V3 causal LM.

    Call: tokens int32 [B, T], optional positions int32 [B, T] (default 0..T-1) and
    segment_ids int32 [B, T] (packed documents attend only within their segment).
    Returns a `ModelOutput`.

    With `decode=True` the attention layers keep a KV cache in the `cache` collection
    (create it with `init_cache`, pass it with mutable=["cache"]); tokens are written at
    their `positions` and see every earlier slot. Same parameters either way.

    `layout` is how the decoder layers' weights are held: 'stacked' (default; the layout
    of checkpoints and training, [L, ...] arrays run by `nn.scan`) or 'layers' (each
    layer's apart, `LayerList`; convert stacked variables with `to_layout`).
    `dsjax.generate` decodes in 'layers' where the layers run unrolled
    (`ModelConfig.unroll_layers`): XLA copies a layer's weights out of the stacks wherever
    they are used and does not hoist the copies out of the decoding loop, so each step
    would copy every weight it reads.
    """

    cfg: ModelConfig
    decode: bool = False
    layout: str = "stacked"

    def setup(self):
        cfg = self.cfg
        self.embed = param(self, "embed", (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"))
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        layers = scanned_blocks if self.layout == "stacked" else (
            lambda cfg, moe, length, name, decode: LayerList(cfg, moe, length, decode, name=name))
        if cfg.num_dense_layers:
            self.dense_layers = layers(cfg, False, cfg.num_dense_layers, "dense_layers", self.decode)
        if cfg.num_moe_layers:
            self.moe_layers = layers(cfg, True, cfg.num_moe_layers, "moe_layers", self.decode)
        self.norm = RMSNorm(cfg, cfg.rms_norm_eps)
        if not cfg.tie_word_embeddings:
            self.head = param(self, "head", (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"))
        self.mtp = [MTP(cfg, moe=cfg.n_routed_experts > 0, decode=self.decode, name=f"mtp_{k}")
                    for k in range(cfg.num_nextn_predict_layers)]

    def embed_tokens(self, tokens: jnp.ndarray) -> jnp.ndarray:
        """tokens [B, T] -> [B, T, D] in the compute dtype."""
        x = jnp.take(self.embed, tokens, axis=0).astype(dtype_of(self.cfg.dtype))
        return nn.with_logical_constraint(x, ("batch", "seq", "embed"))

    def logits_from_hidden(self, h: jnp.ndarray) -> jnp.ndarray:
        """Normalized hidden [B, T, D] -> float32 logits [B, T, vocab] (shared by MTP)."""
        dt = dtype_of(self.cfg.dtype)
        w = self.embed.T if self.cfg.tie_word_embeddings else self.head
        wt = decode_transposed(self, "head")  # decoding's [vocab, D] copy (the embedding when tied)
        logits = matmul(h.astype(dt), w.astype(dt), None if wt is None else wt.astype(dt))
        return nn.with_logical_constraint(logits, ("batch", "seq", "vocab")).astype(jnp.float32)

    def trunk(self, tokens: jnp.ndarray, positions: jnp.ndarray | None = None,
              segment_ids: jnp.ndarray | None = None):
        """Everything but the heads: (normalized hidden [B, T, D] in the compute dtype,
        expert loads, balance losses, (cos, sin, mask, positions) for the MTP modules)."""
        cfg = self.cfg
        B, T = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        cos, sin = rope_tables(cfg, positions)
        mask = None if self.decode else attention_mask(B, T, segment_ids)
        x = self.embed_tokens(tokens)
        loads = balance = None
        if cfg.num_dense_layers:
            x, _ = self.dense_layers(x, cos, sin, mask, positions)
        if cfg.num_moe_layers:
            x, (loads, balance) = self.moe_layers(x, cos, sin, mask, positions)
        return self.norm(x), loads, balance, (cos, sin, mask, positions)

    def __call__(self, tokens: jnp.ndarray, positions: jnp.ndarray | None = None,
                 segment_ids: jnp.ndarray | None = None, mtp: bool = True) -> ModelOutput:
        h, loads, balance, context = self.trunk(tokens, positions, segment_ids)
        out = ModelOutput(logits=self.logits_from_hidden(h), expert_loads=loads, balance_loss=balance,
                          hidden=h.astype(jnp.float32))
        if mtp and self.mtp:
            out = self.run_mtp(out, tokens, *context)
        return out

    def run_mtp(self, out: ModelOutput, tokens, cos, sin, mask, positions) -> ModelOutput:
        """Sequential MTP modules: module k sees h^{k-1}_t and Emb(token_{t+k+1})."""
        h = out.hidden
        logits, loads, balance = [], [], []
        for k, module in enumerate(self.mtp):
            shifted = jnp.pad(tokens[:, k + 1:], ((0, 0), (0, min(k + 1, tokens.shape[1]))))  # t+k+1 at t
            h, mtp_out, aux = module(h, self.embed_tokens(shifted), cos, sin, mask, positions)
            logits.append(self.logits_from_hidden(mtp_out))
            if aux:
                loads.append(aux[0])
                balance.append(aux[1])
        return out.replace(mtp_logits=jnp.stack(logits),
                           mtp_expert_loads=jnp.stack(loads) if loads else None,
                           mtp_balance_loss=jnp.stack(balance) if balance else None)

    def mtp_step(self, hidden: jnp.ndarray, next_tokens: jnp.ndarray, positions: jnp.ndarray) -> jnp.ndarray:
        """The first MTP module alone, for drafting: position t combines the main model's
        hidden state h_t [B, T, D] with the embedding of token t+1 (next_tokens [B, T]).
        Returns float32 logits [B, T, vocab] for token t+2."""
        cos, sin = rope_tables(self.cfg, positions)
        B, T = next_tokens.shape
        mask = None if self.decode else attention_mask(B, T)
        _, out, _ = self.mtp[0](hidden, self.embed_tokens(next_tokens), cos, sin, mask, positions)
        return self.logits_from_hidden(out)


def init_cache(model: Transformer, batch: int, max_len: int) -> dict:
    """A zeroed `cache` collection for `batch` rows of `max_len` slots (decode mode).

    Under a mesh and logical-axis rules (`nn.logical_axis_rules`) each array is
    constrained to its logical axes (`layers`, `batch`, `seq`, ...), so inside jit the
    cache is created already sharded, batch over the batch axes.
    """
    decoder = model.clone(decode=True)
    boxed = jax.eval_shape(decoder.init, jax.random.key(0), jnp.zeros((batch, max_len), jnp.int32))["cache"]

    def zeros(leaf):
        if _boxed(leaf):
            return nn.with_logical_constraint(jnp.zeros(leaf.value.shape, leaf.value.dtype), leaf.names)
        return jnp.zeros(leaf.shape, leaf.dtype)

    return jax.tree.map(zeros, boxed, is_leaf=_boxed)


def cache_bytes(model: Transformer, batch: int, max_len: int, mtp: bool = False) -> int:
    """Bytes of the decode cache of the main layers (and of the MTP blocks with `mtp`).

    For attn_impl='absorb' this is L x batch x max_len x cfg.cache_values_per_token (C + R)
    x bytes per element; for 'naive', L x batch x max_len x H x (K + R + V) x bytes.
    """
    decoder = model.clone(decode=True)
    shapes = unbox(jax.eval_shape(decoder.init, jax.random.key(0),
                                  jnp.zeros((batch, max_len), jnp.int32))["cache"])
    total = 0
    for key, tree in shapes.items():
        if key.startswith("mtp_") and not mtp:
            continue
        total += sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
    return total


def unbox(variables):
    """Strips flax's logical-partitioning boxes: a tree of plain arrays."""
    return nn.meta.unbox(variables)
