"""Supervised fine-tuning data (R1's cold start, §2.3.1): prompt/response examples packed
into windows, the loss on response tokens only.

JSONL records hold `prompt` and `response` (names set by `sft.prompt_field` /
`sft.response_field`), or `messages` (a list of {role, content}; the last assistant
message is the response and the turns before it, rendered as `Role: content` lines
followed by `Assistant: `, the prompt). Each example is tokenized as prompt + response +
EOS and packed first-fit into windows of seq_len + 1 tokens with a segment id per
example: packed examples never attend to each other (the model's `segment_ids`), and
positions restart at 0 in every example. The loss mask keeps the targets that are
response tokens (and the EOS) of the same example. Records are split into train and
validation by a hash of their text, as pretraining splits documents.
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from dsjax.config import ConfigError
from dsjax.data import is_validation, read_jsonl, source_files
from train.loop import StageSpec, SupervisedStage


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """Attributes:
      prompt_field / response_field: the JSONL keys of prompt and response.
      messages_field: the key of a chat transcript (used when the prompt key is absent).
      strict: a malformed line is an error (else it is skipped and counted).
      truncate: an example longer than the window is cut (else it is an error).
    """

    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    strict: bool = True
    truncate: bool = False


def _record_text(record, cfg: SFTConfig, where: str) -> tuple[str, str]:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a record must be a JSON object")
    if cfg.prompt_field in record or cfg.response_field in record:
        if cfg.prompt_field not in record or cfg.response_field not in record:
            missing = cfg.prompt_field if cfg.prompt_field not in record else cfg.response_field
            raise ValueError(f"{where}: record has no field {missing!r} (sft.{'prompt' if missing == cfg.prompt_field else 'response'}_field)")
        return str(record[cfg.prompt_field]), str(record[cfg.response_field])
    messages = record.get(cfg.messages_field)
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: record has neither {cfg.prompt_field!r}/{cfg.response_field!r} "
                         f"nor a {cfg.messages_field!r} list")
    if not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise ValueError(f"{where}: every message needs 'role' and 'content'")
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"{where}: the last message must be the assistant's response")
    prompt = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages[:-1]) + "Assistant: "
    return prompt, str(messages[-1]["content"])


def read_examples(paths: list[str], cfg: SFTConfig) -> tuple[list[tuple[str, str, str]], int]:
    """(key, prompt, response) of every record of the JSONL files, and the count of
    skipped malformed lines (always 0 when `cfg.strict`: the first one raises ValueError
    naming its file and line)."""
    examples, skipped = [], 0
    for path in paths:
        errors = None if cfg.strict else []
        for n, record in read_jsonl(path, numbered=True, errors=errors):
            try:
                prompt, response = _record_text(record, cfg, f"{path}:{n}")
            except ValueError:
                if cfg.strict:
                    raise
                skipped += 1
                continue
            examples.append((f"{prompt}\0{response}", prompt, response))
        skipped += len(errors or ())
    return examples, skipped


@dataclasses.dataclass
class Packed:
    """Windows of seq_len + 1 tokens: tokens, segment ids (0 is padding) and the loss
    mask over tokens (response tokens), each int32/bool [W, seq_len + 1]."""

    tokens: np.ndarray
    segments: np.ndarray
    loss: np.ndarray
    examples: int
    truncated: int

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return window_batch(self.tokens[i:i + 1], self.segments[i:i + 1], self.loss[i:i + 1], squeeze=True)


def pack(examples: list[tuple[str, str, str]], tokenizer, seq_len: int, truncate: bool = False) -> Packed:
    """Packs tokenized examples first-fit (in order) into windows of seq_len + 1 tokens."""
    width = seq_len + 1
    eos = tokenizer.eos_id
    windows: list[list[tuple[np.ndarray, np.ndarray]]] = []
    room: list[int] = []
    truncated = 0
    for _, prompt, response in examples:
        p = np.asarray(tokenizer.encode(prompt), np.int32)
        r = np.asarray(tokenizer.encode(response), np.int32)
        if eos is not None:
            r = np.concatenate([r, np.asarray([eos], np.int32)])
        toks = np.concatenate([p, r])
        loss = np.concatenate([np.zeros(len(p), bool), np.ones(len(r), bool)])
        if len(toks) > width:
            if not truncate:
                raise ValueError(f"an example of {len(toks)} tokens does not fit train.seq_len={seq_len} + 1 "
                                 f"(raise train.seq_len or set sft.truncate=true)")
            toks, loss = toks[:width], loss[:width]
            truncated += 1
        for w, free in enumerate(room):
            if free >= len(toks):
                windows[w].append((toks, loss))
                room[w] -= len(toks)
                break
        else:
            windows.append([(toks, loss)])
            room.append(width - len(toks))
    tokens = np.zeros((len(windows), width), np.int32)
    segments = np.zeros((len(windows), width), np.int32)
    losses = np.zeros((len(windows), width), bool)
    for w, items in enumerate(windows):
        at = 0
        for s, (toks, loss) in enumerate(items, 1):
            tokens[w, at:at + len(toks)] = toks
            segments[w, at:at + len(toks)] = s
            losses[w, at:at + len(toks)] = loss
            at += len(toks)
    return Packed(tokens, segments, losses, len(examples), truncated)


def window_batch(tokens, segments, loss, squeeze: bool = False) -> dict[str, np.ndarray]:
    """Model inputs of packed windows [B, L + 1]: inputs, targets, positions (restarting per
    segment), segment_ids and the loss mask (targets that are response tokens of the same
    segment), each [B, L]."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    seg_in = segments[:, :-1]
    mask = loss[:, 1:] & (segments[:, 1:] == seg_in) & (seg_in > 0)
    starts = np.concatenate([np.ones((len(seg_in), 1), bool), seg_in[:, 1:] != seg_in[:, :-1]], axis=1)
    idx = np.broadcast_to(np.arange(seg_in.shape[1]), seg_in.shape)
    last_start = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
    out = {"inputs": inputs.astype(np.int32), "targets": targets.astype(np.int32),
           "positions": (idx - last_start).astype(np.int32), "segment_ids": seg_in.astype(np.int32),
           "mask": mask}
    return {k: v[0] for k, v in out.items()} if squeeze else out


def load_sft(paths: list[str], cfg: SFTConfig, tokenizer, seq_len: int, val_fraction: float):
    """(train Packed, validation Packed or None, skipped lines, the first validation or
    training prompt) from JSONL files; ConfigError with a one-line message on bad input."""
    try:
        examples, skipped = read_examples(paths, cfg)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"data.source: {e}") from None
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not examples:
        raise ConfigError(f"data.source={','.join(paths)} holds no SFT examples")
    train = [e for e in examples if not is_validation(e[0], val_fraction)]
    val = [e for e in examples if is_validation(e[0], val_fraction)]
    if not train:
        raise ConfigError("every SFT example fell in the validation split; lower data.val_fraction")
    try:
        return (pack(train, tokenizer, seq_len, cfg.truncate),
                pack(val, tokenizer, seq_len, cfg.truncate) if val else None, skipped, (val or train)[0][1])
    except ValueError as e:
        raise ConfigError(str(e)) from None


def sft_iterator(packed: Packed, local_batch: int, seed: int, process_index: int = 0, process_count: int = 1):
    """Endless shuffled batches of packed windows (a grain iterator with get/set_state)."""
    if len(packed) < local_batch * process_count:
        # Few examples: repeat the windows so one global batch exists (order stays a shuffle).
        reps = -(-local_batch * process_count // len(packed))
        packed = Packed(np.tile(packed.tokens, (reps, 1)), np.tile(packed.segments, (reps, 1)),
                        np.tile(packed.loss, (reps, 1)), packed.examples, packed.truncated)
    ds = grain.MapDataset.source(packed).seed(seed).shuffle().repeat(None)[process_index::process_count]
    ds = ds.batch(local_batch, drop_remainder=True)
    return iter(ds.to_iter_dataset())


def val_batches(packed: Packed | None, local_batch: int, num_batches: int, process_index: int = 0,
                process_count: int = 1) -> list[dict[str, np.ndarray]]:
    """The first validation batches in order (the same count on every process), the last
    padded with empty windows (their mask is all false)."""
    if packed is None or not num_batches:
        return []
    n = min(num_batches, -(-len(packed) // (local_batch * process_count)))
    rows = [a[process_index::process_count] for a in (packed.tokens, packed.segments, packed.loss)]
    out = []
    for b in range(n):
        parts = [r[b * local_batch:(b + 1) * local_batch] for r in rows]
        pad = local_batch - len(parts[0])
        parts = [np.concatenate([p, np.zeros((pad,) + p.shape[1:], p.dtype)]) for p in parts]
        out.append(window_batch(*parts))
    return out


class SFTStage(SupervisedStage):
    """`python -m train sft`: packed prompt/response windows from `data.source` (JSONL),
    the loss on response tokens, validation on held-out examples."""

    name = "sft"

    def __init__(self, run):
        super().__init__(run)
        cfg, tcfg = run.cfg, run.cfg.train
        paths = self.sources()
        train, val, skipped, self.first_prompt = load_sft(paths, cfg.sft, run.tokenizer, tcfg.seq_len,
                                                          cfg.data.val_fraction)
        self.batches = sft_iterator(train, run.local_batch, tcfg.seed, run.process_index, run.process_count)
        self.val = val_batches(val, run.local_batch, tcfg.eval_batches, run.process_index, run.process_count)
        scored = int(train.loss[:, 1:].sum())
        run.log(f"data: {','.join(paths)} -> {train.examples} train examples in {len(train)} windows of "
                f"{tcfg.seq_len + 1} tokens ({scored:,} response tokens), "
                f"{val.examples if val else 0} validation examples"
                + (f"; skipped {skipped} malformed lines" if skipped else "")
                + (f"; truncated {train.truncated} long examples" if train.truncated else ""))

    def sources(self) -> list[str]:
        """The JSONL files to read (data.source)."""
        try:
            return source_files(dataclasses.replace(self.run.cfg.data, file_pattern="*.jsonl"))
        except FileNotFoundError as e:
            raise ConfigError(str(e)) from None

    def sample_prompt(self) -> str:
        return self.first_prompt


STAGE = StageSpec(name="sft", section="sft", config=SFTConfig, stage=SFTStage, default_config="sft")
