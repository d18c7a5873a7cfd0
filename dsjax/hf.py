"""Hugging Face DeepSeek-V2/V3 checkpoints: `from_pretrained` and `save_pretrained`.

The name map is built from the config (`hf_layout`): every dsjax leaf lists the HF tensors
it is made of (one per layer, and per expert for routed experts) and how each is laid out
(`_TO_DSJAX`). Loading builds each leaf, or each device's shard of it when shardings are
given, with `jax.make_array_from_callback`, reading one tensor at a time and of it only
the window that holds the shard. FP8 weights (float8_e4m3fn with 128x128
`weight_scale_inv` blocks) are dequantized on load, a window with only the scale blocks
that cover it. The MTP layer is HF layer `num_hidden_layers + k`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.config import ModelConfig
from dsjax.fp8 import quantize_blocks
from dsjax.model import Transformer, unbox
from dsjax.safetensors_io import SafetensorsReader, write_sharded
from dsjax.tokenizer import load_tokenizer, save_tokenizer

# HF tensor -> dsjax slot. `n` is the number of heads where a reshape needs it.
_TO_DSJAX: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
    "same": lambda x, n: x,
    "linear": lambda x, n: x.T,                                    # [out, in] -> [in, out]
    "heads_in": lambda x, n: x.T.reshape(x.shape[1], n, -1),       # [H*W, in] -> [in, H, W]
    "heads_out": lambda x, n: x.T.reshape(n, -1, x.shape[0]),      # [D, H*V] -> [H, V, D]
}
_TO_HF: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "same": lambda y: y,
    "linear": lambda y: y.T,
    "heads_in": lambda y: y.reshape(y.shape[0], -1).T,
    "heads_out": lambda y: y.reshape(-1, y.shape[-1]).T,
}


@dataclasses.dataclass
class Leaf:
    """One dsjax variable and the HF tensors it is made of.

    `names` is nested: [layers][experts] for stacked leaves (lists only where stacked).
    """

    collection: str
    path: tuple[str, ...]
    names: Any
    kind: str
    stacked: int  # number of leading stacked axes (0, 1 or 2)
    float32: bool = False


def _block_entries(cfg: ModelConfig, moe: bool) -> list[tuple[str, tuple[str, ...], str, str, bool]]:
    """(collection, path in block, HF suffix, kind, per_expert) for one decoder layer."""
    e = []
    if cfg.q_lora_rank is None:
        e.append(("params", ("attn", "wq"), "self_attn.q_proj.weight", "heads_in", False))
    else:
        e += [("params", ("attn", "wq_a"), "self_attn.q_a_proj.weight", "linear", False),
              ("params", ("attn", "q_norm", "weight"), "self_attn.q_a_layernorm.weight", "same", False),
              ("params", ("attn", "wq_b"), "self_attn.q_b_proj.weight", "heads_in", False)]
    e += [("params", ("attn", "wkv_a"), "self_attn.kv_a_proj_with_mqa.weight", "linear", False),
          ("params", ("attn", "kv_norm", "weight"), "self_attn.kv_a_layernorm.weight", "same", False),
          ("params", ("attn", "wkv_b"), "self_attn.kv_b_proj.weight", "heads_in", False),
          ("params", ("attn", "wo"), "self_attn.o_proj.weight", "heads_out", False),
          ("params", ("attn_norm", "weight"), "input_layernorm.weight", "same", False),
          ("params", ("ffn_norm", "weight"), "post_attention_layernorm.weight", "same", False)]
    mlp = [("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")]
    if not moe:
        e += [("params", ("ffn", ours), f"mlp.{hf}.weight", "linear", False) for ours, hf in mlp]
        return e
    e.append(("params", ("ffn", "gate", "weight"), "mlp.gate.weight", "linear", False))
    if cfg.topk_method == "noaux_tc":
        e.append(("moe_bias", ("ffn", "gate", "bias"), "mlp.gate.e_score_correction_bias", "same", False))
    e += [("params", ("ffn", ours), f"mlp.experts.{{e}}.{hf}.weight", "linear", True) for ours, hf in mlp]
    if cfg.n_shared_experts:
        e += [("params", ("ffn", "shared_experts", ours), f"mlp.shared_experts.{hf}.weight", "linear", False)
              for ours, hf in mlp]
    return e


def hf_layout(cfg: ModelConfig, mtp: bool = True) -> list[Leaf]:
    """Every dsjax leaf with the HF tensor names it is built from."""
    leaves = [Leaf("params", ("embed",), "model.embed_tokens.weight", "same", 0),
              Leaf("params", ("norm", "weight"), "model.norm.weight", "same", 0)]
    if not cfg.tie_word_embeddings:
        leaves.append(Leaf("params", ("head",), "lm_head.weight", "linear", 0))
    stacks = [("dense_layers", False, 0, cfg.num_dense_layers),
              ("moe_layers", True, cfg.num_dense_layers, cfg.num_moe_layers)]
    E = cfg.n_routed_experts
    for stack, moe, first, count in stacks:
        if not count:
            continue
        for coll, path, suffix, kind, per_expert in _block_entries(cfg, moe):
            if per_expert:
                names = [[f"model.layers.{first + j}.{suffix.format(e=x)}" for x in range(E)] for j in range(count)]
            else:
                names = [f"model.layers.{first + j}.{suffix}" for j in range(count)]
            f32 = path[-2:] == ("gate", "weight") or coll == "moe_bias"
            leaves.append(Leaf(coll, (stack,) + path, names, kind, 2 if per_expert else 1, f32))
    if mtp:
        for k in range(cfg.num_nextn_predict_layers):
            pre = f"model.layers.{cfg.num_hidden_layers + k}."
            mod = f"mtp_{k}"
            leaves += [Leaf("params", (mod, "enorm", "weight"), pre + "enorm.weight", "same", 0),
                       Leaf("params", (mod, "hnorm", "weight"), pre + "hnorm.weight", "same", 0),
                       Leaf("params", (mod, "eh_proj"), pre + "eh_proj.weight", "linear", 0),
                       Leaf("params", (mod, "norm", "weight"), pre + "shared_head.norm.weight", "same", 0)]
            for coll, path, suffix, kind, per_expert in _block_entries(cfg, cfg.n_routed_experts > 0):
                names = [pre + suffix.format(e=x) for x in range(E)] if per_expert else pre + suffix
                f32 = path[-2:] == ("gate", "weight") or coll == "moe_bias"
                leaves.append(Leaf(coll, (mod, "block") + path, names, kind, 1 if per_expert else 0, f32))
    return leaves


def _mtp_duplicates(cfg: ModelConfig) -> list[tuple[str, tuple[str, ...], str]]:
    """MTP copies of the shared embedding and head that DeepSeek checkpoints carry."""
    out = []
    for k in range(cfg.num_nextn_predict_layers):
        pre = f"model.layers.{cfg.num_hidden_layers + k}."
        out.append((pre + "embed_tokens.weight", ("embed",), "same"))
        if cfg.tie_word_embeddings:
            out.append((pre + "shared_head.head.weight", ("embed",), "same"))
        else:
            out.append((pre + "shared_head.head.weight", ("head",), "linear"))
    return out


def _flat_names(names) -> list[str]:
    if isinstance(names, str):
        return [names]
    return [n for sub in names for n in _flat_names(sub)]


class _Loader:
    """Reads windows of HF tensors (dequantizing FP8) and checks their shapes."""

    def __init__(self, reader: SafetensorsReader, block: tuple[int, int]):
        self.reader, self.block = reader, block

    def tensor(self, name: str, expected: tuple[int, ...], window: tuple[slice, ...] = ()) -> np.ndarray:
        """HF tensor `name`[window], which must have shape `expected`; an FP8 weight is
        dequantized with only the `weight_scale_inv` blocks that cover the window."""
        if name not in self.reader:
            raise KeyError(f"checkpoint is missing tensor {name} (expected shape {expected})")
        shape = self.reader.shape(name)
        if shape != tuple(expected):
            raise ValueError(f"tensor {name} has shape {shape}, expected {tuple(expected)}")
        x = self.reader.read(name, window)
        scale_name = name[: -len("weight")] + "weight_scale_inv" if name.endswith("weight") else None
        if scale_name and scale_name in self.reader:
            window = tuple(window) + (slice(None),) * (2 - len(window))
            (r0, r1), (c0, c1) = (s.indices(d)[:2] for s, d in zip(window, shape))
            b0, b1 = self.block
            covering = (slice(r0 // b0, -(-r1 // b0)), slice(c0 // b1, -(-c1 // b1)))
            x = dequantize_blockwise(x, self.reader.read(scale_name, covering), self.block, (r0, c0))
        elif str(x.dtype).startswith("float8"):
            raise ValueError(f"tensor {name} is {x.dtype} but has no {scale_name}")
        return x

    def slot(self, name: str, leaf: Leaf, slot_shape: tuple[int, ...], inner: tuple[slice, ...],
             heads: int) -> np.ndarray:
        """The window `inner` of one dsjax slot of `leaf` (its shape `slot_shape`), read from
        the HF tensor `name` and laid out as dsjax has it.

        Only the HF window that holds it is read: the same rows and columns for 'same' and
        'linear' (transposed), whole heads for 'heads_in' and 'heads_out' (the head axis is
        the one that is split; a window of the per-head axis is cut after reading).
        """
        bounds = [s.indices(d)[:2] for s, d in zip(inner, slot_shape)]
        if any(a >= b for a, b in bounds):
            return np.zeros([b - a for a, b in bounds], np.float32)
        cut = lambda ab: slice(*ab)
        rest = ()
        if leaf.kind == "same":
            window = tuple(map(cut, bounds))
        elif leaf.kind == "linear":  # [in, out] <- [out, in]
            window = (cut(bounds[1]), cut(bounds[0]))
        elif leaf.kind == "heads_in":  # [in, H, W] <- [H*W, in]
            (h0, h1), W = bounds[1], slot_shape[2]
            window, heads = (slice(h0 * W, h1 * W), cut(bounds[0])), h1 - h0
            rest = (slice(None), slice(None), cut(bounds[2]))
        else:  # heads_out: [H, V, D] <- [D, H*V]
            (h0, h1), V = bounds[0], slot_shape[1]
            window, heads = (cut(bounds[2]), slice(h0 * V, h1 * V)), h1 - h0
            rest = (slice(None), cut(bounds[1]))
        x = _TO_DSJAX[leaf.kind](self.tensor(name, _leaf_shape_hf(slot_shape, leaf.kind), window), heads)
        return x[rest]


def dequantize_blockwise(w: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int] = (128, 128),
                         origin: tuple[int, int] = (0, 0)) -> np.ndarray:
    """FP8 weight [rows, cols] times its per-block scales -> float32.

    `w` may be a window of the weight starting at row, column `origin`; `scale_inv` then
    holds the blocks that cover it ([ceil(out/b0), ceil(in/b1)] for the whole weight).
    """
    rows = np.arange(origin[0], origin[0] + w.shape[0]) // block[0] - origin[0] // block[0]
    cols = np.arange(origin[1], origin[1] + w.shape[1]) // block[1] - origin[1] // block[1]
    return np.asarray(w, np.float32) * np.asarray(scale_inv, np.float32)[rows[:, None], cols[None, :]]


def _leaf_shape_hf(shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
    """The HF shape of one slot given the dsjax slot shape (the inverse of _TO_DSJAX)."""
    if kind == "same":
        return tuple(shape)
    if kind == "linear":
        return tuple(reversed(shape))
    if kind == "heads_in":  # [in, H, W] -> [H*W, in]
        return (shape[1] * shape[2], shape[0])
    return (shape[2], shape[0] * shape[1])  # heads_out: [H, V, D] -> [D, H*V]


def _get(tree: dict, path: tuple[str, ...]):
    for p in path:
        tree = tree[p]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def abstract_variables(model: Transformer) -> dict:
    """Shapes and dtypes of the model's variables, allocating nothing (unboxed)."""
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return unbox(jax.eval_shape(model.init, jax.random.key(0), tokens))


def _mtp_layer_names(names, num_hidden_layers: int) -> set[str]:
    """The checkpoint's MTP tensors: those of `model.layers.{i}` for i >= num_hidden_layers."""
    layer = re.compile(r"model\.layers\.(\d+)\.")
    return {n for n in names if (m := layer.match(n)) and int(m.group(1)) >= num_hidden_layers}


def from_pretrained(path: str, dtype=jnp.float32, *, mtp: str = "auto", shardings: Any = None,
                    rng: jax.Array | None = None, **overrides: Any) -> tuple[Transformer, dict]:
    """Loads a Hugging Face DeepSeek-V2/V3 directory.

    Args:
      path: directory with config.json and *.safetensors (sharded with an index or not).
      dtype: parameter and compute dtype (router weights and biases stay float32).
      mtp: 'auto' loads MTP weights when the checkpoint has them and otherwise turns MTP
        off (with a warning); 'init' initializes missing MTP modules from `rng`; 'off'
        never loads them.
      shardings: optional tree like the variables of `jax.sharding.Sharding`s; each device
        then reads only its own shard.
      rng: key for 'init'.
      **overrides: ModelConfig fields to change (attn_impl, moe_impl, ...).
    Returns:
      (model, variables) with variables {'params': ..., 'moe_bias': ...} of plain arrays.
    """
    if mtp not in ("auto", "init", "off"):
        raise ValueError(f"mtp={mtp!r} must be 'auto', 'init' or 'off'")
    with open(os.path.join(path, "config.json")) as f:
        hf_config = json.load(f)
    name = jnp.dtype(dtype).name
    cfg = ModelConfig.from_hf(hf_config, dtype=name, param_dtype=name, **overrides)
    reader = SafetensorsReader(path)
    qc = hf_config.get("quantization_config") or {}
    loader = _Loader(reader, tuple(qc.get("weight_block_size", (128, 128))))
    has_mtp = cfg.num_nextn_predict_layers > 0 and any(
        n.startswith(f"model.layers.{cfg.num_hidden_layers}.") for n in reader.names())
    init_mtp = False
    if cfg.num_nextn_predict_layers and not has_mtp:
        if mtp == "init":
            warnings.warn(f"{path} has no MTP weights (model.layers.{cfg.num_hidden_layers}.*): "
                          "initializing the MTP modules randomly", stacklevel=2)
            init_mtp = True
        elif mtp == "auto":
            warnings.warn(f"{path} has no MTP weights (model.layers.{cfg.num_hidden_layers}.*): "
                          "loading with num_nextn_predict_layers=0", stacklevel=2)
            cfg = cfg.replace(num_nextn_predict_layers=0)
    if mtp == "off":
        cfg = cfg.replace(num_nextn_predict_layers=0)
    model = Transformer(cfg)
    abstract = abstract_variables(model)
    leaves = hf_layout(cfg, mtp=not init_mtp)
    variables: dict = {}
    used: set[str] = set()
    H = cfg.num_attention_heads
    for leaf in leaves:
        target = _get(abstract[leaf.collection], leaf.path)
        out_dtype = jnp.float32 if leaf.float32 else target.dtype
        slot_shape = target.shape[leaf.stacked:]
        used.update(_flat_names(leaf.names))

        def build(index, leaf=leaf, target=target, slot_shape=slot_shape, out_dtype=out_dtype):
            index = tuple(index) + (slice(None),) * (len(target.shape) - len(index))
            stacked_idx, inner = index[:leaf.stacked], index[leaf.stacked:]
            ranges = [range(*s.indices(target.shape[i])) for i, s in enumerate(stacked_idx)]

            def slot(names, depth):
                if depth == leaf.stacked:
                    return np.asarray(loader.slot(names, leaf, slot_shape, inner, H), dtype=out_dtype)
                return np.stack([slot(names[i], depth + 1) for i in ranges[depth]])

            return slot(leaf.names, 0)

        sharding = _get(shardings[leaf.collection], leaf.path) if shardings is not None else None
        if sharding is None:
            arr = jnp.asarray(build(()))
        else:
            arr = jax.make_array_from_callback(target.shape, sharding, build)
        _set(variables.setdefault(leaf.collection, {}), leaf.path, arr)
    for dup, _, _ in (_mtp_duplicates(cfg) if not init_mtp else []):
        if dup in reader:
            used.add(dup)
    used.update(n[: -len("weight")] + "weight_scale_inv" for n in list(used) if n.endswith("weight"))
    skipped = _mtp_layer_names(reader.names(), cfg.num_hidden_layers) if mtp == "off" else set()
    extra = sorted(n for n in reader.names() if n not in used and n not in skipped
                   and not n.endswith("rotary_emb.inv_freq")
                   and 0 not in reader.shape(n))  # transformers writes empty shared experts for n=0
    if extra:
        raise ValueError(f"checkpoint has {len(extra)} unexpected tensor(s) for this config, e.g. {extra[0]}")
    if init_mtp:
        fresh = jax.jit(model.init)(rng if rng is not None else jax.random.key(0),
                                    jnp.zeros((1, 1), jnp.int32))
        fresh = unbox(fresh)
        for coll in fresh:
            for key, value in fresh[coll].items():
                if key.startswith("mtp_"):
                    variables.setdefault(coll, {})[key] = value
    return model, variables


# The linear layers DeepSeek-V3 ships in FP8 (embedding, head, router and norms stay wide).
_FP8_LINEAR = re.compile(r"\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|gate_proj|up_proj|"
                         r"down_proj)\.weight$")
FP8_QUANTIZATION_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                           "weight_block_size": [128, 128]}


_quantize_blocks = jax.jit(quantize_blocks)  # one compiled program per weight shape


def _fp8_tensors(tensors: Iterator[tuple[str, np.ndarray]]) -> Iterator[tuple[str, np.ndarray]]:
    """Rewrites the FP8 linear weights as float8_e4m3fn [out, in] plus weight_scale_inv
    [ceil(out/128), ceil(in/128)] (the dequantization multiplier), as DeepSeek ships them."""
    for name, arr in tensors:
        if not _FP8_LINEAR.search(name) or 0 in arr.shape:
            yield name, arr
            continue
        q, s = _quantize_blocks(jnp.asarray(arr, jnp.float32))
        yield name, np.asarray(q)[:arr.shape[0], :arr.shape[1]]
        yield name[: -len("weight")] + "weight_scale_inv", np.asarray(s, np.float32)


def _hf_tensors(cfg: ModelConfig, variables: dict, dtype) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, numpy array) for every tensor of the checkpoint, in layout order."""
    for leaf in hf_layout(cfg):
        value = _get(variables[leaf.collection], leaf.path)

        def emit(names, arr):
            if isinstance(names, str):
                x = np.asarray(jax.device_get(arr))
                keep32 = leaf.float32
                yield names, _TO_HF[leaf.kind](x).astype(np.float32 if keep32 else dtype)
            else:
                for i, sub in enumerate(names):
                    yield from emit(sub, arr[i])

        yield from emit(leaf.names, value)
    for name, path, kind in _mtp_duplicates(cfg):
        x = np.asarray(jax.device_get(_get(variables["params"], path)))
        yield name, _TO_HF[kind](x).astype(dtype)


def save_pretrained(model: Transformer, variables: dict, out_dir: str, *, dtype=None,
                    max_shard_size: int = 5 * 2**30, fp8: bool = False, tokenizer: Any = None) -> None:
    """Writes `config.json` and safetensors shards in the Hugging Face DeepSeek layout, and
    the tokenizer when given: transformers' AutoModelForCausalLM and AutoTokenizer load the
    folder.

    Args:
      model: the Transformer (its config is written as config.json).
      variables: {'params': ..., 'moe_bias': ...}, boxed or not, sharded or not.
      out_dir: created if needed.
      dtype: storage dtype (default: the config's param_dtype); routers stay float32.
      max_shard_size: bytes per shard; more than one shard writes an index file.
      fp8: write the linear layers in DeepSeek's FP8 layout (float8_e4m3fn with 128x128
        `weight_scale_inv` blocks and a `quantization_config`).
      tokenizer: 'bytes', a tokenizer.json (or its folder) or a dsjax.tokenizer tokenizer,
        written as tokenizer.json + tokenizer_config.json (with its chat template; same ids
        as its `encode`, dsjax.tokenizer.save_tokenizer); config.json then names its BOS
        and EOS ids.
    """
    cfg = model.cfg
    variables = unbox(variables)
    np_dtype = np.dtype(jnp.dtype(dtype or cfg.param_dtype))
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
                         f"vocab_size={cfg.vocab_size}")
    os.makedirs(out_dir, exist_ok=True)
    hf = cfg.to_hf()
    hf["torch_dtype"] = jnp.dtype(np_dtype).name
    if tokenizer is not None:
        hf.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
        save_tokenizer(tokenizer, out_dir)
    tensors = _hf_tensors(cfg, variables, np_dtype)
    if fp8:
        hf["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG)
        tensors = _fp8_tensors(tensors)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    write_sharded(tensors, out_dir, max_shard_bytes=max_shard_size)
