"""`python -m train pretrain` (the default stage): next-token pretraining on a text corpus
(dsjax.data), DeepSeek-V3's objective (train.steps): packed windows, every token scored,
validation against the corpus's unigram baseline."""

from __future__ import annotations

import time

from dsjax import data as data_lib
from dsjax.config import ConfigError
from train.loop import Run, StageSpec, SupervisedStage
from train.report import plot_curves


class PretrainStage(SupervisedStage):
    """Pretraining on a text corpus (dsjax.data): packed windows, every token scored."""

    name = "pretrain"

    def __init__(self, run: Run):
        super().__init__(run)
        cfg, tcfg = run.cfg, run.cfg.train
        t0 = time.time()
        try:
            corpus = data_lib.load_corpus(cfg.data, run.tokenizer)
            self.batches = data_lib.train_iterator(corpus.train, tcfg.seq_len, run.local_batch, tcfg.seed,
                                                   run.process_index, run.process_count)
            self.val = data_lib.eval_batches(corpus.val, tcfg.seq_len, run.local_batch,
                                             max(tcfg.eval_batches, 1), run.process_index, run.process_count)
        except (ValueError, KeyError, FileNotFoundError, UnicodeDecodeError) as e:
            raise ConfigError(e.args[0] if e.args else str(e)) from None
        if not tcfg.eval_batches:
            self.val = []
        self.baseline = corpus.unigram_baseline()
        run.log(f"data: {cfg.data.source} -> {len(corpus.train):,} train / {len(corpus.val):,} validation tokens "
                f"from {corpus.num_files} files ({time.time() - t0:.1f}s); unigram baseline "
                f"{self.baseline:.3f} nats/token")

    def plot(self) -> str | None:
        return plot_curves(self.run.workdir, self.baseline)

    def summary(self, last_eval) -> str:
        if "val_loss" not in last_eval:
            return ""
        return f"validation loss {last_eval['val_loss']:.4f} vs unigram baseline {self.baseline:.4f} nats/token"


STAGE = StageSpec(name="pretrain", section=None, config=None, stage=PretrainStage, default_config="pretrain")
