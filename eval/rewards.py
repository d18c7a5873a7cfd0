"""Rule-based rewards (DeepSeek-R1 §2.2.2): plain functions registered by name.

Every reward has one signature, `reward(prompt, completion, **fields) -> float`, where
`fields` are the problem's (`answer`, or `numbers` and `target`) plus what the trainer
knows about the sample (`completion_tokens`, `max_tokens`). Nothing here evaluates model
output as code: answers go through `eval.tasks.evaluate_expression`, a small parser over
exact fractions, and the tag parser is a linear scan.

    r = rewards.get("accuracy")(prompt, completion, **problem.fields)
    total, parts = rewards.combine("accuracy:1,format:0.1")(prompt, completion, **fields)

Accuracy is granted only to a well-formed completion, so a format bonus can never reward
a long wrong answer. Add a reward with `@rewards.register("name")`.

Batch rewards score many completions in one call, `fn(prompts, completions, fields) ->
[float]` (`@rewards.register_batch("name")`). A trained reward model is such a function
too, but a run loads it for itself and passes it in rather than registering it:
`combine(spec, batch_rewards={"helpful": fn})`. `combine(spec)(...)` scores one
completion; `combine(spec).batch(...)` many.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Mapping

from eval.tasks import evaluate_expression

Reward = Callable[..., float]
BatchReward = Callable[[list, list, list], Any]
_REWARDS: dict[str, Reward] = {}
_BATCH: dict[str, BatchReward] = {}
_MAX_ANSWER = 64  # characters of an integer answer that are compared at all
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
# The names a reward call passes besides a problem's own fields: its two arguments and what
# the trainer knows about the sample. A problem (a prompt-file line) may not hold a field
# of one of these names: it would collide with them in `reward(prompt, completion, **fields)`.
RESERVED_FIELDS = ("prompt", "completion", "completion_tokens", "max_tokens", "overlong_buffer", "reward_seed")


def register(name: str) -> Callable[[Reward], Reward]:
    """Decorator: adds `fn(prompt, completion, **fields) -> float` under `name`."""
    def wrap(fn: Reward) -> Reward:
        _REWARDS[name] = fn
        return fn
    return wrap


def register_batch(name: str) -> Callable[[BatchReward], BatchReward]:
    """Decorator: adds `fn(prompts, completions, fields) -> [float]` (lists of one length;
    `fields` holds each completion's keyword fields) under `name`."""
    def wrap(fn: BatchReward) -> BatchReward:
        _BATCH[name] = fn
        return fn
    return wrap


def is_batch(name: str) -> bool:
    """Whether `name` is a batch reward (a reward model)."""
    return name in _BATCH


def unregister(name: str) -> None:
    _REWARDS.pop(name, None)
    _BATCH.pop(name, None)


def names() -> list[str]:
    return sorted(set(_REWARDS) | set(_BATCH))


def get(name: str) -> Reward:
    """The reward `name` as fn(prompt, completion, **fields) -> float (a batch reward is
    called on a batch of one)."""
    if name in _BATCH:
        return lambda prompt, completion, **fields: float(_BATCH[name]([prompt], [completion], [fields])[0])
    if name not in _REWARDS:
        raise ValueError(f"unknown reward {name!r}; rewards: {names()}")
    return _REWARDS[name]


def get_batch(name: str) -> BatchReward:
    """The reward `name` as fn(prompts, completions, fields) -> [float] (a rule-based
    reward is called once per completion)."""
    if name in _BATCH:
        return _BATCH[name]
    fn = get(name)
    return lambda prompts, completions, fields: [fn(p, c, **f) for p, c, f in zip(prompts, completions, fields)]


def parse_tags(completion: str) -> tuple[str, str] | None:
    """(think, answer) of `<think>T</think> <answer>A</answer>` (whitespace allowed around
    and between the blocks), each tag exactly once and nothing else outside; else None."""
    text = completion.strip()
    if any(text.count(tag) != 1 for tag in _TAGS):
        return None
    starts = [text.find(tag) for tag in _TAGS]
    if starts[0] != 0 or starts != sorted(starts) or not text.endswith(_TAGS[3]):
        return None
    between = text[starts[1] + len(_TAGS[1]):starts[2]]
    if between.strip():
        return None
    return text[len(_TAGS[0]):starts[1]], text[starts[2] + len(_TAGS[2]):starts[3]]


def normalize_int(text: str) -> str | None:
    """'-0042' -> '-42'; None unless an optionally signed integer of at most 64 characters."""
    s = text.strip()
    if not s or len(s) > _MAX_ANSWER:
        return None
    sign = ""
    if s[0] in "+-":
        sign, s = ("-" if s[0] == "-" else ""), s[1:]
    if not s or not all("0" <= c <= "9" for c in s):
        return None
    s = s.lstrip("0") or "0"
    return s if s == "0" else sign + s


def answer_of(completion: str) -> str | None:
    """The text inside <answer> of a well-formed completion, stripped; None otherwise."""
    tags = parse_tags(completion)
    return None if tags is None else tags[1].strip()


def is_correct(given: str, /, **fields: Any) -> bool:
    """Whether an extracted answer `given` solves the problem described by `fields`."""
    if "numbers" in fields and "target" in fields:
        parsed = evaluate_expression(given)
        if parsed is None:
            return False
        value, used = parsed
        return sorted(used) == sorted(int(n) for n in fields["numbers"]) and value == int(fields["target"])
    if "answer" in fields:
        got, want = normalize_int(given), normalize_int(str(fields["answer"]))
        return got is not None and got == want
    raise ValueError("the problem has neither 'answer' nor 'numbers'/'target' fields")


@register("accuracy")
def accuracy(prompt: str, completion: str, **fields: Any) -> float:
    """1 for a well-formed completion whose answer is correct, else 0."""
    answer = answer_of(completion)
    return float(answer is not None and is_correct(answer, **fields))


@register("format")
def format_reward(prompt: str, completion: str, **fields: Any) -> float:
    """1 for `<think>...</think> <answer>...</answer>` with each tag once and a non-empty
    answer (an empty chain of thought is allowed), else 0."""
    return float(bool(answer_of(completion)))


@register("integer_answer")
def integer_answer(prompt: str, completion: str, **fields: Any) -> float:
    """1 for a well-formed completion whose answer is an integer in digits, else 0: the
    rule for prompts without a known answer (it needs no `answer` field)."""
    answer = answer_of(completion)
    return float(answer is not None and normalize_int(answer) is not None)


@register("partial_credit")
def partial_credit(prompt: str, completion: str, **fields: Any) -> float:
    """1 for a well-formed completion with a non-empty wrong answer (TinyZero gives such
    answers 0.1: use weight 0.1)."""
    answer = answer_of(completion)
    return float(bool(answer) and not is_correct(answer, **fields))


@register("overlong")
def overlong(prompt: str, completion: str, *, completion_tokens: int = 0, max_tokens: int = 0,
             overlong_buffer: int = 0, **fields: Any) -> float:
    """DAPO's soft overlong penalty: 0 up to max_tokens - buffer, then falling linearly to
    -1 at max_tokens (and -1 beyond). 0 when max_tokens or the buffer is unset."""
    if max_tokens <= 0 or overlong_buffer <= 0:
        return 0.0
    free = max_tokens - overlong_buffer
    if completion_tokens <= free:
        return 0.0
    return max(-1.0, (free - completion_tokens) / overlong_buffer)


@register("random")
def random_reward(prompt: str, completion: str, *, reward_seed: int = 0, **fields: Any) -> float:
    """A control: 1 or 0 by a hash of (seed, prompt, completion), only for well-formed
    completions (like accuracy), independent of correctness."""
    if parse_tags(completion) is None:
        return 0.0
    h = hashlib.sha256(f"{reward_seed}\0{prompt}\0{completion}".encode()).digest()
    return float(h[0] & 1)


# Scripts of the language-consistency reward: a letter belongs to a script when its
# Unicode name starts with one of the prefixes.
SCRIPTS = {"latin": ("LATIN",), "cyrillic": ("CYRILLIC",), "greek": ("GREEK",), "arabic": ("ARABIC",),
           "hebrew": ("HEBREW",), "devanagari": ("DEVANAGARI",), "hangul": ("HANGUL",),
           "cjk": ("CJK", "HIRAGANA", "KATAKANA", "HANGUL", "IDEOGRAPHIC")}


def script_share(text: str, script: str) -> float:
    """The share of the words of `text` that contain letters and whose letters are all in
    `script` (a key of SCRIPTS); words without letters (numbers, symbols) do not count, and
    a text without such words scores 1. Each CJK character counts as a word."""
    import unicodedata

    if script not in SCRIPTS:
        raise ValueError(f"unknown script {script!r}; scripts: {sorted(SCRIPTS)}")
    prefixes = SCRIPTS[script]
    words, good, word = 0, 0, []

    def close():
        nonlocal words, good
        if word:
            words += 1
            good += all(unicodedata.name(c, "").startswith(prefixes) for c in word)
            word.clear()

    for c in text:
        if c.isalpha():
            if unicodedata.name(c, "").startswith(("CJK", "HIRAGANA", "KATAKANA")):
                close()
                word.append(c)
                close()
            else:
                word.append(c)
        elif not c.isdigit() and c not in "'-":
            close()
    close()
    return good / words if words else 1.0


@register("language")
def language(prompt: str, completion: str, *, language: str = "latin", **fields: Any) -> float:
    """R1's language-consistency reward: the share of the chain of thought (the <think>
    block, or the whole completion when it has none) written in the target script
    (`language`: a problem field or the source's setting; default latin)."""
    text = completion
    start, end = completion.find("<think>"), completion.find("</think>")
    if start >= 0:
        text = completion[start + len("<think>"):end if end > start else len(completion)]
    return script_share(text, language or "latin")


def parse_spec(spec: str, known: tuple[str, ...] = ()) -> list[tuple[str, float]]:
    """'accuracy:1,format:0.1' -> [('accuracy', 1.0), ('format', 0.1)]; a bare name weighs 1.
    `known`: names accepted besides the registered rewards (reward models a run will load).

    Raises ValueError naming an unknown reward or a bad weight.
    """
    out = []
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        name, _, weight = part.partition(":")
        name = name.strip()
        if name not in _REWARDS and name not in _BATCH and name not in known:
            raise ValueError(f"unknown reward {name!r}; rewards: {sorted(set(names()) | set(known))}")
        try:
            w = float(weight) if weight.strip() else 1.0
        except ValueError:
            raise ValueError(f"reward {name!r}: weight {weight!r} is not a number") from None
        out.append((name, w))
    if not out:
        raise ValueError(f"no rewards in {spec!r}")
    return out


def combine(spec: str, batch_rewards: Mapping[str, BatchReward] | None = None
            ) -> Callable[..., tuple[float, dict[str, float]]]:
    """A weighted sum of rewards.

    Args:
      spec: weighted reward names, 'accuracy:1,format:0.1' (see `parse_spec`).
      batch_rewards: {name: fn(prompts, completions, fields) -> [float]} passed in beside
        the registered rewards (the reward models a run loaded); a name here wins.
    Returns:
      fn(prompt, completion, **fields) -> (total, {name: unweighted value}), with
      `fn.batch(prompts, completions, fields)` -> (totals float32 [B], {name: values
      float32 [B]}) scoring a batch, each batch reward in one call.
    """
    import numpy as np

    given = dict(batch_rewards or {})
    parts = parse_spec(spec, known=tuple(given))
    batched = {name: given.get(name) or _BATCH[name] for name, _ in parts if name in given or name in _BATCH}
    single = {name: _REWARDS[name] for name, _ in parts if name not in batched}

    def one(name: str, prompt: str, completion: str, fields: dict) -> float:
        if name in batched:
            return float(batched[name]([prompt], [completion], [fields])[0])
        return float(single[name](prompt, completion, **fields))

    def total(prompt: str, completion: str, **fields: Any) -> tuple[float, dict[str, float]]:
        values = {name: one(name, prompt, completion, fields) for name, _ in parts}
        return sum(w * values[name] for name, w in parts), values

    def batch(prompts, completions, fields) -> tuple[Any, dict[str, Any]]:
        values = {}
        for name, _ in parts:
            if name in batched:
                values[name] = np.asarray(batched[name](list(prompts), list(completions), list(fields)), np.float32)
            else:
                fn = single[name]
                values[name] = np.asarray([fn(p, c, **f) for p, c, f in zip(prompts, completions, fields)],
                                          np.float32)
        totals = sum(w * values[name] for name, w in parts)
        return np.asarray(totals, np.float32), values

    total.batch = batch
    return total
