"""Supervised fine-tuning data (R1's cold start, §2.3.1): prompt/response examples packed
into windows, the loss on response (assistant) tokens only.

JSONL records hold `prompt` and `response` (names set by `sft.prompt_field` /
`sft.response_field`), or `messages` (a list of {role, content} ending with the
assistant's). A prompt/response example is tokenized as prompt + response + EOS, the loss
on the response and the EOS.

A transcript is rendered by the tokenizer's chat template where it has one (as
transformers' `apply_chat_template` renders it, DeepSeek-V3's
`<｜begin▁of▁sentence｜>{system}<｜User｜>...<｜Assistant｜>...<｜end▁of▁sentence｜>`), and the
loss covers every assistant turn: the text the template adds after the turn's generation
prompt (the conversation so far with `add_generation_prompt`), its end-of-turn token
included; system, user and tool text and the generation prompts get none. Each piece is
tokenized on its own, so a reply's tokens start where generation starts. A template whose
generation prompt is not how it starts the reply, or that renders a turn differently once
later turns follow, is refused (ValueError naming the record). Without a template (the
byte tokenizer) the last assistant message is the response and the turns before it,
rendered as `Role: content` lines followed by `Assistant: `, the prompt.

Examples are packed first-fit into windows of seq_len + 1 tokens with a segment id per
example: packed examples never attend to each other (the model's `segment_ids`), and
positions restart at 0 in every example. The loss mask keeps the targets that are trained
tokens of the same example. Records are split into train and validation by a hash of
their text, as pretraining splits documents.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

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


class Example(NamedTuple):
    """One SFT example.

    Attributes:
      key: the text the train/validation split hashes.
      prompt / response: the text before the first trained token and the rest.
      pieces: ((text, trained), ...), the whole example in order for a chat-template
        transcript (no EOS is added: the template ends each turn); () for prompt +
        response + EOS.
    """

    key: str
    prompt: str
    response: str
    pieces: tuple[tuple[str, bool], ...] = ()


def chat_pieces(tokenizer, messages: list[dict]) -> tuple[tuple[str, bool], ...]:
    """A transcript rendered by the tokenizer's chat template, cut into (text, trained)
    pieces whose concatenation is the whole rendering; the trained pieces are the
    assistant turns. Turn i's piece is what rendering messages[:i + 1] adds to
    messages[:i] rendered with the generation prompt. Raises ValueError where the
    template's generation prompt is not how it starts that turn, or where it renders an
    earlier turn differently once later turns follow (the turn's tokens are then not
    where generation would put them)."""
    whole = tokenizer.apply_chat_template(messages)
    pieces, at = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[:i + 1])
        if not upto.startswith(before) or len(before) < at:
            raise ValueError(f"the chat template's generation prompt is not how it starts message {i} "
                             "(the assistant's), so the reply's tokens are not where generation puts them")
        if not whole.startswith(upto):
            raise ValueError(f"the chat template renders message {i} (the assistant's) differently once later "
                             "turns follow, so its tokens cannot be found in the transcript")
        if len(before) < len(upto):
            pieces += [(whole[at:len(before)], False), (whole[len(before):len(upto)], True)]
            at = len(upto)
    pieces.append((whole[at:], False))
    return tuple((text, trained) for text, trained in pieces if text)


def _record_example(record, cfg: SFTConfig, where: str, tokenizer=None) -> Example:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a record must be a JSON object")
    if cfg.prompt_field in record or cfg.response_field in record:
        if cfg.prompt_field not in record or cfg.response_field not in record:
            missing = cfg.prompt_field if cfg.prompt_field not in record else cfg.response_field
            raise ValueError(f"{where}: record has no field {missing!r} (sft.{'prompt' if missing == cfg.prompt_field else 'response'}_field)")
        prompt, response = str(record[cfg.prompt_field]), str(record[cfg.response_field])
        return Example(f"{prompt}\0{response}", prompt, response)
    messages = record.get(cfg.messages_field)
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: record has neither {cfg.prompt_field!r}/{cfg.response_field!r} "
                         f"nor a {cfg.messages_field!r} list")
    if not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise ValueError(f"{where}: every message needs 'role' and 'content'")
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"{where}: the last message must be the assistant's response")
    if getattr(tokenizer, "chat_template", None):
        try:
            pieces = chat_pieces(tokenizer, messages)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        first = next((i for i, (_, trained) in enumerate(pieces) if trained), None)
        if first is None:
            raise ValueError(f"{where}: the chat template renders no text for the assistant's messages")
        prompt = "".join(text for text, _ in pieces[:first])
        response = "".join(text for text, _ in pieces[first:])
        return Example(f"{prompt}\0{response}", prompt, response, pieces)
    prompt = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages[:-1]) + "Assistant: "
    response = str(messages[-1]["content"])
    return Example(f"{prompt}\0{response}", prompt, response)


def read_examples(paths: list[str], cfg: SFTConfig, tokenizer=None) -> tuple[list[Example], int]:
    """Every record of the JSONL files as an Example, and the count of skipped malformed
    lines (always 0 when `cfg.strict`: the first one raises ValueError naming its file
    and line). `messages` records are rendered with `tokenizer`'s chat template where it
    has one (else as `Role: content` lines)."""
    examples, skipped = [], 0
    for path in paths:
        errors = None if cfg.strict else []
        for n, record in read_jsonl(path, numbered=True, errors=errors):
            try:
                example = _record_example(record, cfg, f"{path}:{n}", tokenizer)
            except ValueError:
                if cfg.strict:
                    raise
                skipped += 1
                continue
            examples.append(example)
        skipped += len(errors or ())
    return examples, skipped


@dataclasses.dataclass
class Packed:
    """Windows of seq_len + 1 tokens: tokens, segment ids (0 is padding) and the loss
    mask over tokens (trained tokens), each int32/bool [W, seq_len + 1]."""

    tokens: np.ndarray
    segments: np.ndarray
    loss: np.ndarray
    examples: int
    truncated: int

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return window_batch(self.tokens[i:i + 1], self.segments[i:i + 1], self.loss[i:i + 1], squeeze=True)


def encode_example(example, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32 [N], trained bool [N]) of an Example or a (key, prompt, response)
    tuple: its pieces, or prompt + response + EOS with the response and EOS trained."""
    pieces = example[3] if len(example) > 3 else ()
    if not pieces:
        eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
        p = np.asarray(tokenizer.encode(example[1]), np.int32)
        r = np.concatenate([np.asarray(tokenizer.encode(example[2]), np.int32), np.asarray(eos, np.int32)])
        return np.concatenate([p, r]), np.concatenate([np.zeros(len(p), bool), np.ones(len(r), bool)])
    ids = [np.asarray(tokenizer.encode(text), np.int32) for text, _ in pieces]
    return (np.concatenate(ids).astype(np.int32),
            np.concatenate([np.full(len(i), trained, bool) for i, (_, trained) in zip(ids, pieces)]))


def pack(examples, tokenizer, seq_len: int, truncate: bool = False) -> Packed:
    """Packs tokenized examples (Examples or (key, prompt, response) tuples) first-fit (in
    order) into windows of seq_len + 1 tokens."""
    width = seq_len + 1
    windows: list[list[tuple[np.ndarray, np.ndarray]]] = []
    room: list[int] = []
    truncated = 0
    for example in examples:
        toks, loss = encode_example(example, tokenizer)
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
        examples, skipped = read_examples(paths, cfg, tokenizer)
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
            return source_files(dataclasses.replace(self.run.cfg.data, file_pattern="*.jsonl"), pattern_key="")
        except FileNotFoundError as e:
            raise ConfigError(str(e)) from None

    def sample_prompt(self) -> str:
        return self.first_prompt


STAGE = StageSpec(name="sft", section="sft", config=SFTConfig, stage=SFTStage, default_config="sft")
