"""Multi-token prediction: a numpy reference of DeepSeek-V3 §2.2, alignment (mtp_logits at
t predict t+2) and HF layer placement."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import DeepseekV3ForCausalLM

import dsjax
from dsjax.block import Block
from dsjax.model import attention_mask
from dsjax.rope import rope_tables
from dsjax.safetensors_io import SafetensorsReader


@pytest.fixture(scope="module")
def tiny():
    cfg = dsjax.load_model_config("tiny", num_hidden_layers=2, num_nextn_predict_layers=2)
    model = dsjax.Transformer(cfg)
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, cfg.vocab_size)
    variables = dsjax.unbox(model.init(jax.random.key(1), tokens))
    variables["moe_bias"] = jax.tree.map(lambda b: b + 0.01 * jnp.arange(b.shape[-1]), variables["moe_bias"])
    return model, variables, tokens


def _rms_norm(x, weight, eps):
    return weight * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def test_mtp_logits_equal_a_numpy_reference(tiny):
    """DeepSeek-V3 §2.2 in numpy: depth k (1-based) at position i takes h^{k-1}_i (h^0: the
    main model's final normalized state) and the shared embedding of token i+k,
    h'_i = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)] (eq. 21, in the order of the
    released weights, `eh_proj`, which put the embedding first), h^k = TRM_k(h') (eq. 22),
    logits = RMSNorm(h^k) @ the shared output head (eq. 23, the norm is HF's
    `shared_head.norm`). TRM_k is the model's own Block, checked against transformers
    elsewhere; everything around it is numpy."""
    model, variables, tokens = tiny
    cfg = model.cfg
    rng = np.random.default_rng(0)
    params = jax.tree.map(np.asarray, variables["params"])
    for k in range(2):  # norm weights start at 1: make each one distinct so a swapped or dropped norm shows
        for norm in ("enorm", "hnorm", "norm"):
            params[f"mtp_{k}"][norm]["weight"] = rng.uniform(0.5, 1.5, cfg.hidden_size).astype(np.float32)
    variables = {**variables, "params": params}
    out = jax.jit(model.apply)(variables, tokens)
    B, T = tokens.shape
    tok = np.asarray(tokens)
    embed, head = params["embed"].astype(np.float64), params["head"].astype(np.float64)
    h = np.asarray(out.hidden, np.float64)  # h^0
    np.testing.assert_allclose(h @ head, out.logits, rtol=1e-5, atol=1e-5)  # is what the main head reads
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    cos, sin = rope_tables(cfg, positions)
    mask = attention_mask(B, T)
    block = Block(cfg, moe=cfg.n_routed_experts > 0)
    for k in range(1, 3):
        p = params[f"mtp_{k - 1}"]
        emb = np.zeros((B, T, cfg.hidden_size))
        emb[:, :T - k] = embed[tok[:, k:]]  # Emb(t_{i+k}) at i; the last k positions have no such token
        x = np.concatenate([_rms_norm(emb, p["enorm"]["weight"], cfg.rms_norm_eps),
                            _rms_norm(h, p["hnorm"]["weight"], cfg.rms_norm_eps)], axis=-1) @ p["eh_proj"]
        block_vars = {"params": p["block"], "moe_bias": variables["moe_bias"][f"mtp_{k - 1}"]["block"]}
        h, _ = block.apply(block_vars, jnp.asarray(x, jnp.float32), cos, sin, mask, positions)
        h = np.asarray(h, np.float64)
        logits = _rms_norm(h, p["norm"]["weight"], cfg.rms_norm_eps) @ head
        valid = T - k  # position i predicts token i+k+1; the last k positions see padding
        np.testing.assert_allclose(out.mtp_logits[k - 1, :, :valid], logits[:, :valid], rtol=1e-4, atol=1e-4)


def test_mtp_logits_see_exactly_up_to_token_t_plus_1(tiny):
    model, variables, tokens = tiny
    apply = jax.jit(model.apply)
    base = apply(variables, tokens)
    assert base.mtp_logits.shape == (2,) + base.logits.shape
    t = 6
    for k in range(2):  # module k at position t sees tokens <= t + 1 + k and predicts t + 2 + k
        later = tokens.at[:, t + 2 + k:].set((tokens[:, t + 2 + k:] + 1) % model.cfg.vocab_size)
        out = apply(variables, later)
        np.testing.assert_allclose(out.mtp_logits[k, :, :t + 1], base.mtp_logits[k, :, :t + 1], atol=1e-6)
        seen = tokens.at[:, t + 1 + k].set((tokens[:, t + 1 + k] + 1) % model.cfg.vocab_size)
        out = apply(variables, seen)
        assert np.abs(out.mtp_logits[k, :, t] - base.mtp_logits[k, :, t]).max() > 1e-4
        # The main head at t never sees token t+1.
        np.testing.assert_allclose(out.logits[:, :t + 1 + k], base.logits[:, :t + 1 + k], atol=1e-6)


def test_mtp_layers_round_trip_at_hf_index_num_hidden_layers(tiny, tmp_path):
    model, variables, tokens = tiny
    dsjax.save_pretrained(model, variables, str(tmp_path))
    names = SafetensorsReader(str(tmp_path)).names()
    L = model.cfg.num_hidden_layers
    for k in range(2):
        for suffix in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                       "shared_head.head.weight", "embed_tokens.weight", "mlp.gate.e_score_correction_bias"):
            assert f"model.layers.{L + k}.{suffix}" in names
    model2, variables2 = dsjax.from_pretrained(str(tmp_path))
    assert model2.cfg.num_nextn_predict_layers == 2
    chex.assert_trees_all_close(variables2, variables, atol=0, rtol=0)
    a, b = model.apply(variables, tokens), model2.apply(variables2, tokens)
    np.testing.assert_array_equal(a.mtp_logits, b.mtp_logits)
    # transformers reads the same directory (skipping the MTP layers) and agrees on the logits.
    hf = DeepseekV3ForCausalLM.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        ref = hf(torch.from_numpy(np.asarray(tokens)).long()).logits.numpy()
    assert np.abs(np.asarray(a.logits) - ref).max() <= 1e-4


def test_checkpoint_without_mtp_weights(tiny, tmp_path):
    model, variables, tokens = tiny
    cfg = model.cfg
    plain = dsjax.Transformer(cfg.replace(num_nextn_predict_layers=0))
    no_mtp = {c: {k: v for k, v in t.items() if not k.startswith("mtp_")} for c, t in variables.items()}
    dsjax.save_pretrained(plain, no_mtp, str(tmp_path))
    hf_cfg = json.load(open(tmp_path / "config.json"))
    hf_cfg["num_nextn_predict_layers"] = 2  # as transformers writes it: MTP declared, weights dropped
    json.dump(hf_cfg, open(tmp_path / "config.json", "w"))
    with pytest.warns(UserWarning, match="no MTP weights.*num_nextn_predict_layers=0"):
        m, v = dsjax.from_pretrained(str(tmp_path))
    assert m.cfg.num_nextn_predict_layers == 0 and m.apply(v, tokens).mtp_logits is None
    with pytest.warns(UserWarning, match="initializing the MTP modules"):
        m, v = dsjax.from_pretrained(str(tmp_path), mtp="init", rng=jax.random.key(5))
    assert m.cfg.num_nextn_predict_layers == 2
    out = m.apply(v, tokens)
    assert out.mtp_logits.shape[0] == 2
    np.testing.assert_allclose(out.logits, model.apply(variables, tokens).logits, atol=1e-5)
