"""eval.tasks and eval.rewards: splits that never overlap, correct solutions, and rewards
that survive hostile completions (hypothesis)."""

import os
import re

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from eval import rewards, tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name, difficulty", [("addition", 2), ("addition", 4), ("multiplication", 4),
                                              ("multiplication", 3), ("countdown", 3), ("countdown", 4)])
def test_splits_are_disjoint_seeded_and_solutions_score_one(name, difficulty):
    task = tasks.get(name, difficulty=difficulty)
    train = task.split("train", n=300, seed=0)
    test = task.split("test", n=100, seed=0)
    assert len({p.key for p in train}) == 300 and len({p.key for p in test}) == 100
    assert not {p.key for p in train} & {p.key for p in test}
    # Another seed draws other problems of the same split, never the other split's.
    other = task.split("train", n=300, seed=1)
    assert {p.key for p in other} != {p.key for p in train}
    assert not {p.key for p in other} & {p.key for p in test}
    assert [p.key for p in task.split("train", n=300, seed=0)] == [p.key for p in train]
    score = rewards.combine("accuracy:1,format:0.5")
    for p in train[:50] + test[:50]:
        assert p.question in p.prompt
        assert score(p.prompt, p.solution, **p.fields) == (1.5, {"accuracy": 1.0, "format": 1.0}), p
        assert rewards.partial_credit(p.prompt, p.solution, **p.fields) == 0.0


def test_r1_template_and_small_split_error():
    p = tasks.get("addition", difficulty=2, template="r1").split("test", 1)[0]
    assert p.prompt.startswith("A conversation between User and Assistant.")
    assert p.prompt.endswith(f"User: {p.question} Assistant:")
    with pytest.raises(ValueError, match="has only .* distinct test problems"):
        tasks.get("addition", difficulty=1).split("test", n=100)
    with pytest.raises(ValueError, match="unknown task 'sudoku'"):
        tasks.get("sudoku")
    with pytest.raises(ValueError, match="unknown split"):
        tasks.get("addition").split("validation", 3)


def test_arithmetic_solutions_show_the_work():
    assert tasks.addition_work(347, 85) == "347+85: 7+5+0=12,4+8+1=13,3+0+1=4 so 432"
    assert tasks.addition_work(95, 17) == "95+17: 5+7+0=12,9+1+1=11 so 112"
    assert tasks.multiplication_work(347, 6) == "347*6: 7*6+0=42,4*6+4=28,3*6+2=20 so 2082"
    assert tasks.multiplication_work(123, 45) == "123*45: 123*5=615,123*40=4920,615+4920=5535 so 5535"
    p = tasks.get("addition", 2).split("train", 1)[0]
    assert p.prompt == f"Q: {p.question} A: " and p.question.endswith("=?")
    assert p.document("answer") == p.prompt + p.answer and p.document("work") == p.work
    assert p.document("solution") == p.prompt + p.solution == p.prompt + f"<think>{p.work}</think><answer>{p.answer}</answer>"
    assert p.brief_solution == f"<think>{p.question[:-2]}</think><answer>{p.answer}</answer>"
    assert rewards.accuracy(p.prompt, p.brief_solution, **p.fields) == 1.0
    c = tasks.get("countdown", 3).split("train", 1)[0]
    assert c.brief_solution == f"<think></think><answer>{c.answer}</answer>"


@pytest.mark.parametrize("completion, fields, acc, fmt", [
    ("<think>3+4=7</think><answer>7</answer>", {"answer": "7"}, 1, 1),
    ("  <think>\nwork\n</think>\n <answer> 007 </answer>\n", {"answer": "7"}, 1, 1),
    ("<think></think><answer>-12</answer>", {"answer": "-12"}, 1, 1),
    ("<think>x</think><answer>8</answer>", {"answer": "7"}, 0, 1),
    ("<answer>7</answer>", {"answer": "7"}, 0, 0),                                # no think
    ("<think>x</think> and so <answer>7</answer>", {"answer": "7"}, 0, 0),        # text between blocks
    ("<think>x</think><answer>7</answer> trailing", {"answer": "7"}, 0, 0),
    ("<think>x</think><answer>7</answer><answer>7</answer>", {"answer": "7"}, 0, 0),
    ("<think><answer>7</answer></think><answer>7</answer>", {"answer": "7"}, 0, 0),
    ("<think>x</think><answer>7.0</answer>", {"answer": "7"}, 0, 1),
    ("<think>x</think><answer>" + "9" * 65 + "</answer>", {"answer": "9" * 65}, 0, 1),   # too long to compare
    ("<think>x</think><answer>(44+19)-35</answer>", {"numbers": [19, 35, 44], "target": 28}, 1, 1),
    ("<think>x</think><answer>44+19-35+0</answer>", {"numbers": [19, 35, 44], "target": 28}, 0, 1),  # extra number
    ("<think>x</think><answer>44+19</answer>", {"numbers": [19, 35, 44], "target": 63}, 0, 1),      # one unused
    ("<think>x</think><answer>44+44-60</answer>", {"numbers": [44, 44, 60], "target": 28}, 1, 1),   # repeats
    ("<think>x</think><answer>44+44-60</answer>", {"numbers": [44, 60, 1], "target": 28}, 0, 1),    # 44 twice
    ("<think>x</think><answer>(8/(3-8/3))</answer>", {"numbers": [8, 3, 8, 3], "target": 24}, 1, 1),  # exact fractions
    ("<think>x</think><answer>8/(3-3)+8*8</answer>", {"numbers": [8, 3, 3, 8, 8], "target": 64}, 0, 1),
    ("<think>x</think><answer>__import__('os')</answer>", {"numbers": [1], "target": 1}, 0, 1),
    ("<think>x</think><answer>2**5</answer>", {"numbers": [2, 5], "target": 32}, 0, 1),
    ("<think></think><answer></answer>", {"answer": "7"}, 0, 0),                   # no answer: no format reward
    ("<think>x</think><answer> \n </answer>", {"answer": "7"}, 0, 0),
    ("<think>x</think><answer></answer>", {"numbers": [19, 35, 44], "target": 28}, 0, 0),
])
def test_rewards_on_hand_picked_completions(completion, fields, acc, fmt):
    assert rewards.accuracy("p", completion, **fields) == acc
    assert rewards.format_reward("p", completion, **fields) == fmt
    assert rewards.partial_credit("p", completion, **fields) == float(fmt and not acc
                                                                       and bool(rewards.answer_of(completion)))
    # integer_answer needs no fields: well formed with a signed integer in digits.
    integer = fmt and re.fullmatch(r"\s*[+-]?\d{1,64}\s*", rewards.answer_of(completion) or "") is not None
    assert rewards.get("integer_answer")("p", completion) == float(integer)


def test_overlong_penalty_is_dapo_soft_linear():
    kw = dict(max_tokens=64, overlong_buffer=16)
    assert [rewards.overlong("", "", completion_tokens=n, **kw) for n in (10, 48, 56, 64, 80)] == \
        [0.0, 0.0, -0.5, -1.0, -1.0]
    assert rewards.overlong("", "", completion_tokens=999) == 0.0  # off unless configured


def test_spec_parsing_and_unknown_names():
    assert rewards.parse_spec("accuracy:1, format:0.1,partial_credit") == [
        ("accuracy", 1.0), ("format", 0.1), ("partial_credit", 1.0)]
    with pytest.raises(ValueError, match="unknown reward 'acuracy'"):
        rewards.parse_spec("acuracy:1")
    with pytest.raises(ValueError, match="weight 'x' is not a number"):
        rewards.parse_spec("accuracy:x")

    @rewards.register("length_test")
    def length(prompt, completion, **fields):
        return float(len(completion))

    try:
        assert rewards.combine("length_test:0.5")("p", "abcd") == (2.0, {"length_test": 4.0})
    finally:
        rewards.unregister("length_test")


def test_random_control_reward_ignores_correctness():
    p = tasks.get("addition", difficulty=2).split("train", 400)
    values = [rewards.random_reward(q.prompt, q.solution, **q.fields) for q in p]
    assert 0.35 < sum(values) / len(values) < 0.65  # every solution is correct: the reward does not see it
    assert rewards.random_reward("p", "no tags", answer="1") == 0.0


# ----------------------------------------------------------------------------- hostile input
_pieces = st.sampled_from(["<think>", "</think>", "<answer>", "</answer>", "(", ")", "+", "-", "*", "/",
                           "**", "9" * 50, "1e999", "0", "7", " ", "\n", "__import__('os').system('x')",
                           "\x00", "é", "<", ">", "=", ".", "lambda: 0", "[", "]"])
_hostile = st.one_of(
    st.text(max_size=300),
    st.lists(_pieces, max_size=80).map("".join),
    st.integers(1, 20_000).map(lambda n: "<think>x</think><answer>" + "(" * n + "1" + ")" * n + "</answer>"),
    st.integers(1, 5_000).map(lambda n: "<think>x</think><answer>" + "9" * n + "</answer>"),
    st.integers(1, 2_000).map(lambda n: "<think>x</think><answer>" + "*".join(["999999"] * n) + "</answer>"),
    st.integers(1, 2_000).map(lambda n: "<think>" + "<think>" * n + "</answer>"),
)
_fields = st.sampled_from([{"answer": "7"}, {"answer": "-12"}, {"numbers": [1, 2, 3], "target": 6},
                           {"numbers": [999999, 999999], "target": 1}])


@settings(max_examples=400, deadline=500, suppress_health_check=[HealthCheck.too_slow])
@given(completion=_hostile, fields=_fields)
def test_no_reward_crashes_hangs_or_runs_code_on_hostile_completions(completion, fields):
    for name in rewards.names():
        value = rewards.get(name)("prompt", completion, completion_tokens=len(completion), max_tokens=64,
                                  overlong_buffer=8, **fields)
        assert isinstance(value, float) and -1.0 <= value <= 1.0, (name, value)


def test_no_code_evaluation_in_rewards_or_tasks():
    for module in ("rewards.py", "tasks.py"):
        source = open(os.path.join(ROOT, "eval", module)).read()
        assert not re.search(r"(?<![\w.])(eval|exec|compile)\(|literal_eval|pickle|subprocess", source), module


def test_language_consistency_is_the_share_of_words_in_the_target_script():
    # R1's reward: the share of the chain of thought in the target language. Numbers and
    # symbols are neither; each CJK character is a word.
    assert rewards.script_share("add the digits: 4+8=12 so 92", "latin") == 1.0
    assert rewards.script_share("add les chiffres потом сумма", "latin") == pytest.approx(0.6)
    assert rewards.script_share("add les chiffres потом сумма", "cyrillic") == pytest.approx(0.4)
    assert rewards.script_share("计算 sum", "cjk") == pytest.approx(2 / 3)
    assert rewards.script_share("12+34=46", "greek") == 1.0  # no words at all
    assert rewards.script_share("mixedкириллица", "latin") == 0.0  # a word in two scripts is not in one
    language = rewards.get("language")
    assert language("", "<think>сложим цифры so</think><answer>5</answer>") == pytest.approx(1 / 3)
    assert language("", "<think>сложим цифры so</think><answer>5</answer>", language="cyrillic") == pytest.approx(2 / 3)
    assert language("", "<think>ok</think><answer>пять</answer>") == 1.0  # only the chain of thought counts
    assert language("", "no tags at all, все слова") == pytest.approx(4 / 6)
    with pytest.raises(ValueError, match="unknown script 'klingon'"):
        language("", "x", language="klingon")
