"""`python -m eval export`: a `python -m train` run directory's checkpoint as a Hugging Face
folder.

The folder is what `dsjax.save_pretrained` writes with the run's tokenizer: config.json
(`DeepseekV3ForCausalLM`, or V2), the weights as safetensors, and tokenizer.json +
tokenizer_config.json (the run's tokenizer, its chat template included; the byte
tokenizer as a `tokenizers` model with the same ids). transformers' AutoModelForCausalLM
and AutoTokenizer load it; `dsjax.from_pretrained` and `python -m eval ... --hf` read it.

A reward model (`python -m train rm`) exports its backbone as that causal-LM folder (its
language-model head is the one it was initialized with, unused by the score), plus its
scalar head:

  reward_head.safetensors   score.weight float32 [1, D], score.bias float32 [1]
  reward_model.json         REWARD_FORMAT: where the score is read

    h = AutoModelForCausalLM.from_pretrained(DIR).model(ids).last_hidden_state  # [B, T, D]
    score = h[b, t] @ score.weight[0] + score.bias[0]     # t: the last token (the EOS)

with ids = prompt + response + EOS (dsjax.reward_model.encode_responses).
"""

from __future__ import annotations

import fnmatch
import json
import os

import numpy as np

REWARD_HEAD = "reward_head.safetensors"
REWARD_CONFIG = "reward_model.json"
# What reward_model.json says (besides the EOS id and the checkpoint step).
REWARD_FORMAT = {
    "head": REWARD_HEAD,
    "hidden_states": "last_hidden_state of the backbone (AutoModelForCausalLM(...).model), the final RMSNorm's output",
    "read_at": "the last token of prompt + response + EOS (the EOS)",
    "score": "hidden_states[b, t] @ score.weight[0] + score.bias[0]",
}
# The files an export writes: what --overwrite clears first, so no stale shard stays.
_EXPORT_FILES = ("config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                 "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                 REWARD_CONFIG)


def check_out(out: str, overwrite: bool = False) -> None:
    """Refuses an --out that is a file, or a non-empty folder unless `overwrite` (ValueError)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is a file, not a folder")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ValueError(f"--out {out} is not empty (add --overwrite to replace an export there)")


def _clear(out: str) -> None:
    if not os.path.isdir(out):
        return
    for name in os.listdir(out):
        path = os.path.join(out, name)
        if os.path.isfile(path) and any(fnmatch.fnmatch(name, p) for p in _EXPORT_FILES):
            os.remove(path)


def export_run(workdir: str, out: str, *, overwrite: bool = False, step: int | None = None,
               tokenizer: str | None = None) -> dict:
    """Writes the run's latest (or given) checkpoint to `out` as a Hugging Face folder.

    Args:
      workdir: a `python -m train` run directory.
      out: the folder to write (created; a non-empty one only with `overwrite`, which
        replaces an earlier export's files there and leaves other files alone).
      step: the checkpoint (default: the latest).
      tokenizer: 'bytes' or a tokenizer.json (or its folder) to write instead of the
        run's `data.tokenizer` (one with the same ids, e.g. where the run's has moved).
    Returns:
      {'checkpoint', 'step', 'stage', 'out', 'files'}. Raises FileNotFoundError or
      ValueError with a one-line message (no run, no checkpoint, --out not empty, ...).
    """
    import dsjax
    from dsjax.checkpoint import load_trained, read_run_config
    from dsjax.tokenizer import load_tokenizer

    run = read_run_config(workdir)
    check_out(out, overwrite)
    tokenizer = load_tokenizer(tokenizer or (run.get("data") or {}).get("tokenizer", "bytes"))
    reward = run.get("stage") == "rm"
    if reward:
        from dsjax.reward_model import load_reward_model

        model, variables, run = load_reward_model(workdir, step)
        params = dict(variables["params"])
        head = {"score.weight": np.asarray(params.pop("score"), np.float32).reshape(1, -1),
                "score.bias": np.asarray(params.pop("score_bias"), np.float32).reshape(1)}
        variables = {**variables, "params": params}
        # The score reads the trunk only: the backbone has no MTP module.
        model = dsjax.Transformer(model.cfg.replace(num_nextn_predict_layers=0))
    else:
        model, variables, run = load_trained(workdir, step)
    _clear(out)
    dsjax.save_pretrained(model, variables, out, tokenizer=tokenizer)
    if reward:
        from safetensors.numpy import save_file

        save_file(head, os.path.join(out, REWARD_HEAD))
        with open(os.path.join(out, REWARD_CONFIG), "w") as f:
            json.dump({**REWARD_FORMAT, "eos_token_id": tokenizer.eos_id, "step": run["checkpoint_step"]}, f,
                      indent=2)
    return {"checkpoint": workdir, "step": run["checkpoint_step"], "stage": run.get("stage", "pretrain"),
            "out": out, "files": sorted(os.listdir(out))}
