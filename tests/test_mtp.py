"""Multi-token prediction: alignment (mtp_logits at t predict t+2) and HF layer placement."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import DeepseekV3ForCausalLM

import dsjax
from dsjax.safetensors_io import SafetensorsReader


@pytest.fixture(scope="module")
def tiny():
    cfg = dsjax.load_model_config("tiny", num_hidden_layers=2, num_nextn_predict_layers=2)
    model = dsjax.Transformer(cfg)
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, cfg.vocab_size)
    variables = dsjax.unbox(model.init(jax.random.key(1), tokens))
    variables["moe_bias"] = jax.tree.map(lambda b: b + 0.01 * jnp.arange(b.shape[-1]), variables["moe_bias"])
    return model, variables, tokens


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
