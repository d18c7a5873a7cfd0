"""Verifiable reasoning tasks generated from a seed (DeepSeek-R1 §2.2, R1-Zero's rule-based
rewards need problems whose answers a program can check).

A task makes `Problem`s: a prompt in R1's template (`<think> ... </think> <answer> ...
</answer>`), the fields its rewards check (`answer`, or `numbers` and `target`), and a
worked solution for cold-start SFT. Every problem belongs to exactly one split, decided
by a hash of its canonical key (operands in sorted order, so `3+5` and `5+3` land
together), so `train` and `test` never share a problem whatever the seed or count.

    task = tasks.get("addition", difficulty=3)
    problems = task.split("train", n=1000, seed=0)
    problems[0].prompt, problems[0].fields, problems[0].solution

Tasks: `addition` and `multiplication` (difficulty = digits of the operands; the second
factor of a multiplication has one digit fewer, at least one) and `countdown` (reach a
target with the given numbers, each used exactly once, with + - * / and parentheses;
difficulty = how many numbers).
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import random
from fractions import Fraction
from typing import Any, Callable

# R1-Zero's template (DeepSeek-R1, Table 1), and a short one for byte-level toy models.
TEMPLATES = {
    "r1": ("A conversation between User and Assistant. The user asks a question, and the Assistant "
           "solves it. The assistant first thinks about the reasoning process in the mind and then "
           "provides the user with the answer. The reasoning process and answer are enclosed within "
           "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process "
           "here </think> <answer> answer here </answer>. User: {question} Assistant:"),
    "short": "Q: {question} A: ",
}
SPLITS = ("train", "test")


DOCUMENT_KINDS = ("answer", "work", "solution")


@dataclasses.dataclass(frozen=True)
class Problem:
    """One problem.

    Attributes:
      prompt: the text the model continues (the question in the task's template).
      question: the bare question.
      fields: what the rewards check, passed as `reward(prompt, completion, **fields)`.
      work: a worked solution in plain text (restating the question, then the steps).
      answer: the answer as the <answer> block should hold it.
      key: the canonical key that decides the split.
    """

    prompt: str
    question: str
    fields: dict[str, Any]
    work: str
    answer: str
    key: str

    @property
    def checkable(self) -> bool:
        """Whether a program can check an answer: the fields hold `answer`, or `numbers` and
        `target` (every task problem; a general prompt only when its line gives them)."""
        return "answer" in self.fields or ("numbers" in self.fields and "target" in self.fields)

    @property
    def solution(self) -> str:
        """A well-formed, correct completion: `<think>work</think><answer>answer</answer>`."""
        return f"<think>{self.work}</think><answer>{self.answer}</answer>"

    @property
    def brief_solution(self) -> str:
        """The same answer after a brief think: only the restated question ('34+58'), no steps."""
        brief = self.work.split(":", 1)[0] if ":" in self.work else ""
        return f"<think>{brief}</think><answer>{self.answer}</answer>"

    def document(self, kind: str) -> str:
        """Pretraining text about this problem: 'answer' (the prompt and the bare answer),
        'work' (the worked solution without tags) or 'solution' (prompt + tagged solution)."""
        if kind == "answer":
            return self.prompt + self.answer
        if kind == "work":
            return self.work
        if kind == "solution":
            return self.prompt + self.solution
        raise ValueError(f"unknown document kind {kind!r}; kinds: {list(DOCUMENT_KINDS)}")


def split_of(key: str, test_fraction: float) -> str:
    """'test' for a stable `test_fraction` of keys, else 'train'."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return "test" if h % 1_000_000 < test_fraction * 1_000_000 else "train"


class Task(abc.ABC):
    """A problem generator with train/test splits; subclasses implement `_sample`."""

    name = "task"

    def __init__(self, difficulty: int, template: str = "short", test_fraction: float = 0.15):
        if template not in TEMPLATES:
            raise ValueError(f"unknown template {template!r}; templates: {sorted(TEMPLATES)}")
        if not 0 < test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        self.difficulty = int(difficulty)
        self.template = template
        self.test_fraction = test_fraction

    @abc.abstractmethod
    def _sample(self, rng: random.Random) -> tuple[str, str, dict[str, Any], str, str]:
        """(key, question, fields, work, answer) of one random problem."""

    def problem(self, rng: random.Random) -> Problem:
        key, question, fields, work, answer = self._sample(rng)
        return Problem(prompt=TEMPLATES[self.template].format(question=question), question=question,
                       fields=fields, work=work, answer=answer, key=key)

    def split(self, split: str, n: int, seed: int = 0) -> list[Problem]:
        """`n` distinct problems of `split` ('train' or 'test'), the same for the same seed.

        Raises ValueError when the split holds fewer than `n` distinct problems.
        """
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; splits: {list(SPLITS)}")
        if n < 1:
            raise ValueError(f"n must be positive, got {n}")
        rng = random.Random(f"{self.name}/{self.difficulty}/{split}/{seed}")
        out: dict[str, Problem] = {}
        attempts = 0
        limit = 200 * n + 10_000
        while len(out) < n and attempts < limit:
            attempts += 1
            p = self.problem(rng)
            if p.key not in out and split_of(p.key, self.test_fraction) == split:
                out[p.key] = p
        if len(out) < n:
            raise ValueError(f"{self.name} (difficulty {self.difficulty}) has only {len(out)} distinct "
                             f"{split} problems; asked for {n}")
        return list(out.values())


def _digits(rng: random.Random, d: int) -> int:
    return rng.randint(10 ** (d - 1) if d > 1 else 0, 10 ** d - 1)


def addition_work(a: int, b: int) -> str:
    """Column addition, least significant digit first, carry in explicit:
    '347+85: 7+5+0=12,4+8+1=13,3+0+1=4 so 432'. Restating the operands next to the
    steps keeps the digits a small model must read close to where it uses them."""
    steps, carry = [], 0
    xs, ys = str(a)[::-1], str(b)[::-1]
    for i in range(max(len(xs), len(ys))):
        x = int(xs[i]) if i < len(xs) else 0
        y = int(ys[i]) if i < len(ys) else 0
        s = x + y + carry
        steps.append(f"{x}+{y}+{carry}={s}")
        carry = s // 10
    return f"{a}+{b}: {','.join(steps)} so {a + b}"


def multiplication_work(a: int, b: int) -> str:
    """Long multiplication: by a one-digit b digit by digit with carries
    ('47*6: 7*6+0=42,4*6+4=28 so 282'), else partial products by each digit of b and
    their sum ('123*45: 123*5=615,123*40=4920,615+4920=5535 so 5535')."""
    if b < 10:
        steps, carry = [], 0
        for x in str(a)[::-1]:
            s = int(x) * b + carry
            steps.append(f"{x}*{b}+{carry}={s}")
            carry = s // 10
        return f"{a}*{b}: {','.join(steps)} so {a * b}"
    parts = [(int(d) * 10 ** i, a * int(d) * 10 ** i) for i, d in enumerate(str(b)[::-1])]
    steps = [f"{a}*{m}={p}" for m, p in parts] + [f"{'+'.join(str(p) for _, p in parts)}={a * b}"]
    return f"{a}*{b}: {','.join(steps)} so {a * b}"


class Addition(Task):
    """a + b with `difficulty`-digit operands."""

    name = "addition"

    def __init__(self, difficulty: int = 2, **kw):
        if not 1 <= int(difficulty) <= 18:
            raise ValueError(f"addition difficulty (digits) must be in [1, 18], got {difficulty}")
        super().__init__(difficulty, **kw)

    def _sample(self, rng):
        a, b = _digits(rng, self.difficulty), _digits(rng, self.difficulty)
        answer = str(a + b)
        return f"add:{min(a, b)}:{max(a, b)}", f"{a}+{b}=?", {"answer": answer}, addition_work(a, b), answer


class Multiplication(Task):
    """a * b with a of `difficulty` digits and b of `difficulty - 1` (one digit, 2-9, when
    difficulty <= 2)."""

    name = "multiplication"

    def __init__(self, difficulty: int = 2, **kw):
        if not 1 <= int(difficulty) <= 9:
            raise ValueError(f"multiplication difficulty (digits) must be in [1, 9], got {difficulty}")
        super().__init__(difficulty, **kw)

    def _sample(self, rng):
        a = _digits(rng, self.difficulty)
        b = rng.randint(2, 9) if self.difficulty <= 2 else _digits(rng, self.difficulty - 1)
        answer = str(a * b)
        return f"mul:{min(a, b)}:{max(a, b)}", f"{a}*{b}=?", {"answer": answer}, multiplication_work(a, b), answer


class Countdown(Task):
    """Reach `target` with `difficulty` numbers in [1, 99], each used exactly once.

    The target is built from a random expression over all the numbers (exact divisions
    only, every intermediate a positive integer), so every problem has a solution.
    """

    name = "countdown"

    def __init__(self, difficulty: int = 3, **kw):
        if not 2 <= int(difficulty) <= 6:
            raise ValueError(f"countdown difficulty (numbers) must be in [2, 6], got {difficulty}")
        super().__init__(difficulty, **kw)

    def _sample(self, rng):
        while True:
            numbers = [rng.randint(1, 99) for _ in range(self.difficulty)]
            built = _random_expression(rng, numbers)
            if built is not None and 1 <= built[0] <= 999:
                break
        target, expression, steps = built
        question = f"Using the numbers {numbers}, create an equation that equals {target}."
        key = f"countdown:{sorted(numbers)}:{target}"
        return key, question, {"numbers": list(numbers), "target": int(target)}, ",".join(steps), expression


def _random_expression(rng: random.Random, numbers: list[int]):
    """Combines the numbers pairwise at random: (value, expression, steps) or None."""
    items = [(n, str(n)) for n in numbers]
    rng.shuffle(items)
    steps = []
    while len(items) > 1:
        (x, ex), (y, ey) = items.pop(), items.pop()
        if x < y:
            (x, ex), (y, ey) = (y, ey), (x, ex)
        ops = ["+", "*"] + (["-"] if x > y else []) + (["/"] if y and x % y == 0 else [])
        op = rng.choice(ops)
        value = {"+": x + y, "-": x - y, "*": x * y, "/": x // y if y else 0}[op]
        if value <= 0:
            return None
        steps.append(f"{x}{op}{y}={value}")
        items.append((value, f"({ex}{op}{ey})" if items else f"{ex}{op}{ey}"))
    return items[0][0], items[0][1], steps


_TASKS: dict[str, Callable[..., Task]] = {"addition": Addition, "multiplication": Multiplication,
                                         "countdown": Countdown}


def register(name: str, factory: Callable[..., Task]) -> None:
    """Adds a task factory (called with difficulty=..., template=...) under `name`."""
    _TASKS[name] = factory


def names() -> list[str]:
    return sorted(_TASKS)


def get(name: str, difficulty: int | None = None, template: str = "short", **kw) -> Task:
    """The task `name` at `difficulty` (the task's default when None)."""
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; tasks: {names()}")
    if difficulty is not None:
        kw["difficulty"] = difficulty
    return _TASKS[name](template=template, **kw)


def parse_spec(spec: str, template: str = "short") -> list[tuple[str, Task]]:
    """'addition:2,countdown' -> [('addition:2', Task), ('countdown:3', Task)] (the
    difficulty after ':' is optional); ValueError naming a bad item or an unknown task."""
    out = []
    for item in spec.split(","):
        name, _, difficulty = item.strip().partition(":")
        try:
            level = int(difficulty) if difficulty else None
        except ValueError:
            raise ValueError(f"task {item!r}: the difficulty after ':' must be an integer") from None
        task = get(name, level, template=template)
        out.append((f"{name}:{task.difficulty}", task))
    return out


def evaluate_expression(text: str, max_len: int = 256, max_depth: int = 32) -> tuple[Fraction, list[int]] | None:
    """Value and numbers of an arithmetic expression with + - * / and parentheses, or None.

    A small recursive-descent parser over exact fractions: nothing is evaluated as code.
    Inputs longer than `max_len`, nested deeper than `max_depth`, numbers of more than 6
    digits, division by zero or any other character give None.
    """
    if len(text) > max_len:
        return None
    tokens: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c.isspace():
            i += 1
        elif c in "+-*/()":
            tokens.append(c)
            i += 1
        elif "0" <= c <= "9":
            j = i
            while j < len(text) and "0" <= text[j] <= "9":
                j += 1
            if j - i > 6:
                return None
            tokens.append(text[i:j])
            i = j
        else:
            return None
    numbers: list[int] = []
    pos = 0

    def peek():
        return tokens[pos] if pos < len(tokens) else None

    def expr(depth):
        nonlocal pos
        value = term(depth)
        while peek() in ("+", "-"):
            op = tokens[pos]
            pos += 1
            rhs = term(depth)
            value = value + rhs if op == "+" else value - rhs
        return value

    def term(depth):
        nonlocal pos
        value = factor(depth)
        while peek() in ("*", "/"):
            op = tokens[pos]
            pos += 1
            rhs = factor(depth)
            if op == "/":
                if rhs == 0:
                    raise ZeroDivisionError
                value = value / rhs
            else:
                value = value * rhs
        return value

    def factor(depth):
        nonlocal pos
        if depth > max_depth:
            raise ValueError("too deep")
        tok = peek()
        if tok == "(":
            pos += 1
            value = expr(depth + 1)
            if peek() != ")":
                raise ValueError("unbalanced")
            pos += 1
            return value
        if tok is not None and tok.isdigit():
            pos += 1
            numbers.append(int(tok))
            return Fraction(int(tok))
        raise ValueError("unexpected token")

    try:
        value = expr(0)
    except (ValueError, ZeroDivisionError):
        return None
    if pos != len(tokens):
        return None
    return value, numbers
