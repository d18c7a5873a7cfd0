"""The DeepSeek-V2/V3 decoder: embedding, scanned MLA + (dense | MoE) blocks, head, MTP.

Layers are stacked on a leading `layers` axis and run under `nn.scan`: one scan for the
first `first_k_dense_replace` dense layers, one for the MoE layers (DeepSeek-V3 §2,
Figure 2). `Transformer.__call__` is pure: it returns a `ModelOutput` with the logits,
the MTP logits (§2.2), the tokens routed to each expert per MoE layer and the
sequence-wise balance-loss term per MoE layer, so training needs no mutable collections.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from dsjax import impl
from dsjax.block import Block
from dsjax.config import ModelConfig
from dsjax.layers import RMSNorm, dtype_of, matmul, param, weight_copy
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
    unrolled where `impl.unroll_layers(cfg)` says so."""
    block = Block
    if cfg.remat_policy != "none" and not decode:
        block = nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat_policy], prevent_cse=False)
    scanned = nn.scan(block, variable_axes={"params": 0, "moe_bias": 0, "cache": 0, impl.DECODE_COPIES: 0},
                      split_rngs={"params": True},
                      in_axes=(nn.broadcast,) * 4, length=length, unroll=length if impl.unroll_layers(cfg) else 1,
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
    (`impl.unroll_layers`): XLA copies a layer's weights out of the stacks wherever they
    are used and does not hoist the copies out of the decoding loop, so each step would
    copy every weight it reads.

    Implementation fields left 'auto' in `cfg` are resolved while tracing
    (`dsjax.impl.resolved`: the platform of the mesh set with `jax.set_mesh`, else of the
    default device); a config resolved beforehand (`dsjax.impl.resolve`) is used as is.
    """

    cfg: ModelConfig
    decode: bool = False
    layout: str = "stacked"

    def setup(self):
        cfg = self.resolved_cfg = impl.resolved(self.cfg)
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
        cfg = self.resolved_cfg
        dt = dtype_of(cfg.dtype)
        w = self.embed.T if cfg.tie_word_embeddings else self.head
        copy = weight_copy(self, "head_t")  # a decode hook's [vocab, D] copy (the embedding when tied)
        logits = matmul(cfg, h.astype(dt), w.astype(dt), None if copy is None else copy.astype(dt))
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
