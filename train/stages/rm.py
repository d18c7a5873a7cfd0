"""`python -m train rm`: a reward model (dsjax.reward_model.RewardModel) trained on preference
pairs with the Bradley-Terry loss (DeepSeek-R1 §2.3.4's preference models).

JSONL records hold `prompt`, `chosen` and `rejected` (names set by `rm.*_field`). Each
pair becomes two rows, prompt + chosen + EOS and prompt + rejected + EOS, padded to
train.seq_len; the score is read at each row's last token. Pairs are split into train
and validation by a hash of their text, and the run logs the held-out pairwise accuracy.
The backbone starts from `--init WORKDIR` / `init.hf` (any run of the same architecture)
or from scratch; the scalar head starts fresh. Same run skeleton as the other stages:
sharded jit step, checkpoints, exact resume, plots.
"""

from __future__ import annotations

import dataclasses

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dsjax.config import ConfigError
from dsjax.data import is_validation, read_jsonl, source_files
from dsjax.losses import apply_model
from dsjax.reward_model import RewardModel, bradley_terry, encode_responses
from train.loop import StageSpec, SupervisedStage
from train.optim import applied_updates
from train.steps import guarded_update

HEAD_PARAMS = ("score", "score_bias")


@dataclasses.dataclass(frozen=True)
class RMConfig:
    """Attributes:
      prompt_field / chosen_field / rejected_field: the JSONL keys of a preference pair.
      strict: a malformed line is an error (else it is skipped and counted).
    """

    prompt_field: str = "prompt"
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    strict: bool = True


def read_pairs(paths: list[str], cfg: RMConfig) -> tuple[list[tuple[str, str, str]], int]:
    """(prompt, chosen, rejected) of every record, and the count of skipped malformed lines
    (0 when `cfg.strict`: the first one raises ValueError naming the file and line)."""
    pairs, skipped = [], 0
    keys = (cfg.prompt_field, cfg.chosen_field, cfg.rejected_field)
    for path in paths:
        errors = None if cfg.strict else []
        for n, record in read_jsonl(path, numbered=True, errors=errors):
            missing = [k for k in keys if k not in record]
            if missing:
                if cfg.strict:
                    raise ValueError(f"{path}:{n}: record has no field {missing[0]!r}")
                skipped += 1
                continue
            pairs.append(tuple(str(record[k]) for k in keys))
        skipped += len(errors or ())
    return pairs, skipped


def encode_pairs(pairs, tokenizer, seq_len: int) -> dict[str, np.ndarray]:
    """tokens int32 [P, 2, seq_len] (chosen, rejected; zero padded) and last int32 [P, 2]."""
    prompts = [p for p, _, _ in pairs]
    chosen = encode_responses(tokenizer, prompts, [c for _, c, _ in pairs], seq_len)
    rejected = encode_responses(tokenizer, prompts, [r for _, _, r in pairs], seq_len)
    return {"tokens": np.stack([chosen[0], rejected[0]], axis=1),
            "last": np.concatenate([chosen[1], rejected[1]], axis=1)}


class _Pairs:
    def __init__(self, arrays):
        self.arrays = arrays

    def __len__(self):
        return len(self.arrays["last"])

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.arrays.items()}


def make_rm_step(model: RewardModel, tx, lr_schedule, rules=()):
    """rm_step(state, batch) -> (state, metrics): Bradley-Terry loss over the batch's pairs
    (`tokens` [B, 2, T], `last` [B, 2]); the router bias stays as it is."""

    def scores(params, moe_bias, batch):
        B, _, T = batch["tokens"].shape
        s = apply_model(model, params, moe_bias, batch["tokens"].reshape(2 * B, T),
                        batch["last"].reshape(2 * B, 1), rules=rules)
        return s.reshape(B, 2)

    def loss_fn(params, moe_bias, batch):
        s = scores(params, moe_bias, batch)
        loss, accuracy = bradley_terry(s[:, 0], s[:, 1], batch.get("mask"))
        return loss, (accuracy, jnp.mean(s[:, 0] - s[:, 1]))

    def rm_step(state, batch):
        (loss, (accuracy, margin)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.moe_bias, batch)
        return guarded_update(state, tx, loss, grads, {"loss": loss, "accuracy": accuracy, "margin": margin,
                                                       "grad_norm": optax.tree_utils.tree_norm(grads),
                                                       "lr": lr_schedule(applied_updates(state.opt_state))})

    def eval_step(params, moe_bias, batch):
        s = scores(params, moe_bias, batch)
        m = batch["mask"].astype(jnp.float32)
        margin = s[:, 0] - s[:, 1]
        return jnp.sum(jax.nn.softplus(-margin) * m), jnp.sum((margin > 0) * m), jnp.sum(m)

    return rm_step, eval_step


class RMStage(SupervisedStage):
    """`python -m train rm`: Bradley-Terry training of a reward model on preference pairs
    (the supervised stages' batches, checkpoints and resume; its own step and evaluation)."""

    name = "rm"
    head_params = HEAD_PARAMS
    prints_sample = False  # a reward model scores text; it does not write any

    @classmethod
    def build_model(cls, model_cfg):
        return RewardModel(model_cfg)

    def __init__(self, run):
        super().__init__(run)  # checks the batch against the mesh
        cfg, tcfg = run.cfg, run.cfg.train
        try:
            paths = source_files(dataclasses.replace(cfg.data, file_pattern="*.jsonl"), pattern_key="")
            pairs, skipped = read_pairs(paths, cfg.rm)
        except (FileNotFoundError, OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"data.source: {e}") from None
        except ValueError as e:
            raise ConfigError(str(e)) from None
        train = [p for p in pairs if not is_validation("\0".join(p), cfg.data.val_fraction)]
        val = [p for p in pairs if is_validation("\0".join(p), cfg.data.val_fraction)]
        if not train:
            raise ConfigError(f"data.source={','.join(paths)} holds no training preference pairs")
        try:
            self.train_pairs = encode_pairs(train, run.tokenizer, tcfg.seq_len)
            val_pairs = encode_pairs(val, run.tokenizer, tcfg.seq_len) if val else None
        except ValueError as e:
            raise ConfigError(f"{e} (train.seq_len)") from None
        self.tokens_per_step = 2 * tcfg.batch_size * tcfg.seq_len
        self.batches = self._iterator(run, tcfg.seed)
        self.val = self._val_batches(run, val_pairs, tcfg.eval_batches)
        self.first_prompt = (val or train)[0][0]
        run.log(f"data: {','.join(paths)} -> {len(train)} train / {len(val)} validation preference pairs"
                + (f"; skipped {skipped} malformed lines" if skipped else ""))

    def _iterator(self, run, seed):
        arrays = self.train_pairs
        need = run.local_batch * run.process_count
        if len(arrays["last"]) < need:
            reps = -(-need // len(arrays["last"]))
            arrays = {k: np.concatenate([v] * reps) for k, v in arrays.items()}
        ds = grain.MapDataset.source(_Pairs(arrays)).seed(seed).shuffle().repeat(None)
        ds = ds[run.process_index::run.process_count].batch(run.local_batch, drop_remainder=True)
        return iter(ds.to_iter_dataset())

    @staticmethod
    def _val_batches(run, arrays, num_batches):
        if arrays is None or not num_batches:
            return []
        rows = {k: v[run.process_index::run.process_count] for k, v in arrays.items()}
        n = min(num_batches, -(-len(rows["last"]) // run.local_batch))
        out = []
        for b in range(n):
            part = {k: v[b * run.local_batch:(b + 1) * run.local_batch] for k, v in rows.items()}
            pad = run.local_batch - len(part["last"])
            part["mask"] = np.arange(run.local_batch) < len(part["last"])
            part["tokens"] = np.concatenate([part["tokens"], np.zeros((pad,) + part["tokens"].shape[1:], np.int32)])
            part["last"] = np.concatenate([part["last"], np.zeros((pad, 2), np.int32)])
            out.append(part)
        return out

    def compile(self) -> None:
        run = self.run
        step, evaluate = make_rm_step(run.model, run.tx, run.lr_schedule, run.rules)
        self.train_step = jax.jit(step, in_shardings=(run.state_sh, run.batch_sh),
                                  out_shardings=(run.state_sh, None), donate_argnums=(0,))
        self.eval_step = jax.jit(evaluate, in_shardings=(run.state_sh.params, run.state_sh.moe_bias, run.batch_sh))

    def evaluate(self, state) -> dict[str, float]:
        if not self.val:
            return {}
        sums = jax.device_get([self.eval_step(state.params, state.moe_bias, self.run.to_global(b))
                               for b in self.val])
        count = max(sum(s[2] for s in sums), 1.0)
        return {"val_loss": float(sum(s[0] for s in sums) / count),
                "val_accuracy": float(sum(s[1] for s in sums) / count)}

    def progress(self, record: dict) -> dict[str, str]:
        return {k: f"{record[k]:.3f}" for k in ("loss", "accuracy") if k in record}

    def summary(self, last_eval) -> str:
        if "val_accuracy" not in last_eval:
            return ""
        return f"held-out pairwise accuracy {last_eval['val_accuracy']:.4f}, loss {last_eval['val_loss']:.4f}"


STAGE = StageSpec(name="rm", section="rm", config=RMConfig, stage=RMStage, default_config="rm")
