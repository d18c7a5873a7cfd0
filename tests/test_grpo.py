"""The GRPO step: compiles once, learns on a fixed batch, equals one device on 8 fake
devices; rollout and trainer log-probabilities agree; `python -m train grpo` runs,
logs what it promises, resumes exactly and refuses bad configs in one line."""

import json
import os
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsjax
from dsjax.tokenizer import ByteTokenizer
from eval import tasks
from eval.completions import complete, encode_prompts, prompt_width
from sharding.mesh import MeshConfig, make_mesh
from sharding.rules import activation_rules
from train.__main__ import main
from train.config import build_config
from train.rl.config import PromptSource
from train.rl.metrics import source_metrics
from train.rl.rewards import Scores
from train.rl.rollout import rollout_batch
from train.rl.sources import Mixture
from train.stages import all_stages
from train.stages.grpo import make_grpo_step, make_score
from train.optim import make_optimizer
from train.steps import TrainState, state_shardings
from tests.test_sharding import OVERRIDES
from tests.test_train import SMALL

B, T = 8, 24


@pytest.fixture(scope="module")
def grpo_setup():
    """A model, optimizer and state for the step tests (the router bias moving, as in
    pretraining), and its jitted scorer: (cfg, model, boxed, tx, schedule, state, score)."""
    cfg = build_config("grpo", OVERRIDES + ["grpo.beta=0.05", "grpo.epsilon_high=0.28", "train.lr=3e-3",
                                            "train.warmup_steps=0", "grpo.moe_bias=update"], all_stages())
    model = dsjax.Transformer(cfg.model)
    boxed = model.init(jax.random.key(1), jnp.zeros((1, T), jnp.int32))
    variables = dsjax.unbox(boxed)
    tx, schedule = make_optimizer(cfg.train, boxed["params"])
    ref = jax.tree.map(lambda p: p * 0.98, variables["params"])
    state = TrainState(jnp.zeros((), jnp.int32), variables["params"], tx.init(variables["params"]),
                       variables["moe_bias"], ref)
    return cfg, model, boxed, tx, schedule, state, jax.jit(make_score(model, 1.0))


def _make_step(setup, rules=()):
    """The GRPO step of `setup` (several updates per rollout, the router bias moving); one
    program for both step tests, so the second loads it from the compilation cache."""
    cfg, model, _, tx, schedule, _, _ = setup
    return make_grpo_step(model, tx, cfg.grpo, cfg.train, schedule, T, rules, use_old=True, update_bias=True)


def _batch(seed, score, state):
    """A fixed GRPO batch: random prompts and completions of random lengths."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(2, 256, (B, T + 1)).astype(np.int32)
    mask = np.zeros((B, T), bool)
    for r in range(B):
        start = rng.integers(2, 8)
        mask[r, start:start + rng.integers(1, T - start)] = True
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask,
             "advantages": rng.normal(0, 1, B).astype(np.float32), "rollout_logp": np.zeros((B, T), np.float32)}
    batch["ref_logp"] = np.asarray(score(state.ref_params, state.moe_bias, batch))
    batch["old_logp"] = np.asarray(score(state.params, state.moe_bias, batch))
    return batch


def test_step_compiles_once_and_lowers_the_loss_on_a_fixed_batch(grpo_setup):
    *_, state, score = grpo_setup
    step = jax.jit(chex.assert_max_traces(_make_step(grpo_setup), n=1))
    fixed = _batch(0, score, state)
    losses = []
    for i in range(6):
        state, metrics = step(state, fixed)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.05, losses
    # Other completion lengths (masks) and advantages: the same compiled step.
    for seed in (1, 2):
        other = _batch(seed, score, state)
        assert other["mask"].sum() != fixed["mask"].sum()
        state, metrics = step(state, other)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["kl"]) > 0


MESHES = [(dict(fsdp=2, expert=4), "fsdp")]  # fsdp and expert parallelism at once


@pytest.mark.parametrize("sizes, preset", MESHES, ids=[str(m[0]) for m in MESHES])
def test_sharded_step_equals_one_device(grpo_setup, sizes, preset):
    _, _, boxed, tx, _, state, score = grpo_setup
    batch = _batch(3, score, state)
    ref_state, ref_metrics = jax.jit(_make_step(grpo_setup))(state, batch)
    mesh = make_mesh(MeshConfig(**{"fsdp": 1, **sizes, "rules": preset}))
    state_sh = state_shardings(boxed, tx, mesh, preset, reference=True)
    batch_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp", "expert")))
    with jax.set_mesh(mesh):
        step = jax.jit(_make_step(grpo_setup, activation_rules(preset)), in_shardings=(state_sh, batch_sh),
                       out_shardings=(state_sh, None))
        new_state, metrics = step(jax.device_put(state, state_sh), jax.device_put(batch, batch_sh))
    for key in ("loss", "grad_norm", "kl", "entropy", "clip_frac", "max_vio"):
        np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, atol=1e-6, err_msg=key)
    # Adam turns a gradient's last-bit difference into up to lr of parameter change where
    # the gradient is near zero (a sum that cancels): 2% of lr (3e-3) bounds it. (1% did,
    # until the optimizer moved into the guard's lax.cond and XLA fused it differently:
    # one of 4,096 elements of a matrix then differed by 1.03% of lr.)
    chex.assert_trees_all_close(jax.device_get(new_state.params), ref_state.params, atol=6e-5)
    chex.assert_trees_all_close(jax.device_get(new_state.moe_bias), ref_state.moe_bias, atol=1e-7)
    # grpo.moe_bias=update: the main layers' bias moved (through the guard's cond), not only
    # agreed (GRPO runs no MTP module, so its bias stays).
    bias = lambda s: np.asarray(s.moe_bias["moe_layers"]["ffn"]["gate"]["bias"])  # noqa: E731
    assert np.any(bias(ref_state) != bias(state))


def test_rollout_logprobs_match_the_trainer():
    cfg = build_config("grpo", SMALL, all_stages())
    model = dsjax.Transformer(cfg.model)
    variables = dsjax.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    problems = tasks.get("addition", 2).split("train", 6)
    tok = ByteTokenizer()
    width = prompt_width(tok, [p.prompt for p in problems])
    comp = complete(dsjax.Transformer(cfg.model.replace(attn_impl="absorb")), variables, tok,
                    [p.prompt for p in problems], width, max_new_tokens=20, temperature=1.0, rng=jax.random.key(3))
    ids, lengths = encode_prompts(tok, [p.prompt for p in problems], width)
    batch = rollout_batch(ids, lengths, comp, width + 20, np.zeros(6, np.float32))
    assert batch["mask"].sum() == comp.lengths.sum() > 0
    # The completion tokens sit where the mask says.
    for r in range(6):
        np.testing.assert_array_equal(batch["targets"][r][batch["mask"][r]], comp.tokens[r, :comp.lengths[r]])
    logp = np.asarray(jax.jit(make_score(model, 1.0))(variables["params"], variables["moe_bias"], batch))
    diff = np.abs(logp - batch["rollout_logp"])[batch["mask"]]
    assert diff.max() < 1e-4, diff.max()


def _grpo_args(workdir, *extra):
    argv = ["grpo", "--workdir", str(workdir)]
    for o in SMALL + ["model.moe_impl=dense", "train.log_every=1", "train.eval_every=2", "train.checkpoint_every=1", "train.sample_tokens=8",
                      "grpo.prompts_per_step=4", "grpo.group_size=4", "grpo.max_new_tokens=12",
                      "grpo.eval_problems=8", "grpo.train_problems=50", "mesh.fsdp=1", "mesh.data=8",
                      "train.batch_size=8", "train.schedule=constant", "train.bias_update_stop=1.0"] + list(extra):
        argv += ["--set", o]
    return argv


def _records(workdir):
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def _watch_generate(monkeypatch) -> list:
    """Wraps dsjax.generate where the run calls it (rollouts, evaluation, the end-of-run
    sample): its variables must be the run's device arrays on the mesh, and nothing may
    come to the host while it runs. Returns the calls' mesh and rules."""
    import eval.completions
    import train.loop
    from dsjax import decoding
    from tests.test_generate_sharded import no_host_copies

    calls = []

    def watched(model, variables, *args, **kwargs):
        for x in jax.tree.leaves(variables):
            assert isinstance(x, jax.Array) and len(x.sharding.device_set) == 8, type(x)
        calls.append((kwargs.get("mesh"), kwargs.get("rules")))
        with no_host_copies():
            return decoding.generate(model, variables, *args, **kwargs)

    monkeypatch.setattr(eval.completions, "generate", watched)
    monkeypatch.setattr(train.loop, "generate", watched)
    return calls


RUN = ["grpo.dynamic_sampling=true", "grpo.mu=2", "grpo.minibatches=2"]


def test_grpo_run_logs_plots_and_resumes_exactly(tmp_path, capsys, monkeypatch):
    full = tmp_path / "full"
    calls = _watch_generate(monkeypatch)
    assert main(_grpo_args(full, *RUN, "train.steps=3")) == 0
    # Rollouts, evaluations and the sample ran on the run's mesh with its rules.
    assert len(calls) > 4 and all(mesh is not None and mesh.size == 8 and rules for mesh, rules in calls)
    records = _records(full)
    for key in ("reward_mean", "reward_std", "accuracy", "format_rate", "kl", "clip_frac", "clip_frac_low",
                "clip_frac_high", "entropy", "completion_len", "completion_len_max", "truncated_frac",
                "frac_reward_zero_std", "rollout_logprob_diff", "max_vio", "rollout_s", "update_s",
                "rollout_tokens_per_s", "reward/accuracy", "reward/format", "loss", "lr", "tokens_per_s"):
        assert key in records[1], key
    assert [r["step"] for r in records] == [0, 1, 2, 3]  # step 0: the held-out evaluation before training
    assert all("test_accuracy" in records[i] for i in (0, 2, 3)) and "test_accuracy" not in records[1]
    assert records[1]["rollout_logprob_diff"] < 1e-4
    assert (full / "plots" / "grpo.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "held-out greedy accuracy" in out and "sample:" in out

    # Its step-2 checkpoint is what a run of 2 steps leaves: resumed, it redoes step 3.
    part = tmp_path / "part"
    shutil.copytree(full, part)
    shutil.rmtree(part / "checkpoints" / "3")
    assert main(_grpo_args(part, *RUN, "train.steps=3")) == 0
    assert "resumed from" in capsys.readouterr().out and (part / "checkpoints" / "3").is_dir()
    a, b = _records(full), _records(part)
    for key in ("loss", "reward_mean", "kl", "grad_norm"):
        assert [r.get(key) for r in a] == [r.get(key) for r in b], key


@pytest.mark.parametrize("overrides, message", [
    (["grpo.group_size=1"], "grpo.group_size must be at least 2"),
    (["grpo.rewards=accuracy:1,brevity:0.5"], "unknown reward 'brevity'"),
    (["grpo.task=chess"], "unknown task 'chess'"),
    (["grpo.loss_agg=sum"], "grpo.loss_agg='sum' is not one of"),
    (["grpo.minibatches=3"], "grpo.minibatches=3 does not divide the 128 completions"),
    (["grpo.minibatches=32"], "an update's 4 completions (grpo.prompts_per_step x grpo.group_size / "
                              "grpo.minibatches) do not divide over the 8 devices"),
    (["grpo.speculative=true", "model.num_nextn_predict_layers=0"], "grpo.speculative needs an MTP module"),
    (["grpo.sources=[{task: addition, prompts: p.jsonl}]"], "give exactly one of task= and prompts="),
    (["grpo.sources=[{task: addition, colour: red}]"], "grpo.sources[0]: unknown key 'colour'"),
    (["grpo.sources=[{task: addition, weight: heavy}]"], "grpo.sources[0].weight='heavy' is not a valid float"),
    (["grpo.sources=[{task: addition}, {task: addition, difficulty: 3}]"], "another source has the name 'addition'"),
    (["grpo.sources=[{task: addition}, {prompts: p.jsonl, rewards: 'helpful:1'}]"], "unknown reward 'helpful'"),
    (["grpo.sources=[{task: addition}, {prompts: missing.jsonl, rewards: 'format:1'}]"],
     "prompt file missing.jsonl does not exist"),
    (["grpo.sources=[{task: addition}, {prompts: p.jsonl, rewards: 'helpful:1'}]", "grpo.reward_models=helpful=nowhere"],
     "grpo.reward_models helpful: nowhere is not a training workdir"),
    (["grpo.sources=[{prompts: p.jsonl, rewards: 'helpful:1'}]", "grpo.reward_models=helpful=nowhere",
      "grpo.rm_from_step=5"], "every source is scored by a reward model"),
])
def test_bad_grpo_configs_exit_2_with_one_line(tmp_path, capsys, overrides, message):
    argv = ["grpo", "--workdir", str(tmp_path / "wd")]
    for o in overrides:
        argv += ["--set", o]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err, err
    assert not (tmp_path / "wd" / "config.yaml").exists()


def test_sigint_during_grpo_saves_the_step_and_resumes(tmp_path, capsys, monkeypatch):
    """Preemption of a GRPO run: a real SIGINT to this process once step 2 is logged (the
    programs of test_grpo_run_logs_plots_and_resumes_exactly, compiled once in this
    process). The run saves the step it is at, returns 0 with one line, and puts back the
    SIGINT handler it found; the same command resumes there."""
    import signal

    import train.report

    workdir = tmp_path / "wd"
    args = lambda steps, *extra: _grpo_args(workdir, *RUN, f"train.steps={steps}",  # noqa: E731
                                            "train.checkpoint_every=100", "train.eval_every=100", *extra)
    write = train.report.MetricsLog.write

    def write_then_interrupt(self, record):
        write(self, record)
        if record["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)  # the run's handler records it; pytest's is back after

    monkeypatch.setattr(train.report.MetricsLog, "write", write_then_interrupt)
    before = signal.getsignal(signal.SIGINT)
    assert main(args(40)) == 0
    assert signal.getsignal(signal.SIGINT) is before
    saved = max(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
    assert saved == 2 and f"SIGINT: saved step {saved}" in capsys.readouterr().out
    monkeypatch.setattr(train.report.MetricsLog, "write", write)
    # One step past the save: a new schedule length, which the resumed run must be allowed.
    assert main(args(saved + 1, "train.allow_schedule_change=true")) == 0
    assert f"at step {saved}" in capsys.readouterr().out
    assert max(r["step"] for r in _records(workdir)) == saved + 1


def test_mixture_sampler_honours_the_weights_and_resumes_from_its_carry():
    weights = np.array([3.0, 1.0, 4.0])
    mix = Mixture(weights)
    total = np.zeros(3)
    for step in range(1, 41):  # every step 12 prompts: each source within one prompt of its share
        counts = mix.counts(12)
        assert counts.sum() == 12
        total += counts
        assert np.abs(total - step * 12 * weights / weights.sum()).max() < 1 + 1e-9, (step, total)
    # A source switched off draws nothing; the others share its place by their weights.
    off = sum(mix.counts(8, active=[True, False, True]) for _ in range(50))
    assert off[1] == 0 and abs(off[0] - 400 * 3 / 7) < 2 and abs(off[2] - 400 * 4 / 7) < 2
    # The carry is the whole state: a copy goes on with the same counts.
    twin = Mixture(weights)
    twin.carry = mix.carry.copy()
    for _ in range(20):
        np.testing.assert_array_equal(mix.counts(5), twin.counts(5))
    with pytest.raises(ValueError, match="no prompt source is active"):
        mix.counts(4, active=[False, False, False])


def test_sources_parse_from_yaml_lists():
    cfg = build_config("grpo", ["grpo.sources=[{task: addition, difficulty: 3, weight: 3}, "
                                "{name: chat, prompts: p.jsonl, rewards: 'helpful:1,language:0.1'}]",
                                "grpo.reward_models=helpful=some/dir", "grpo.rm_from_step=10"], all_stages())
    a, b = cfg.grpo.sources
    assert a == PromptSource(task="addition", difficulty=3, weight=3.0) and isinstance(a.weight, float)
    assert b.label == "chat" and b.prompts == "p.jsonl" and cfg.grpo.rm_from_step == 10
    assert build_config("grpo", [], all_stages()).grpo.resolved_sources()[0].label == "addition"  # R1-Zero: one task source


def test_reward_hacking_guard_counts_rule_failures_the_reward_model_ranks_high():
    # Four completions: two pass the rule (mean RM score 1.0); of the two that fail, one
    # scores above that mean: a quarter of the completions.
    every, none = np.ones(4, bool), np.zeros(4, bool)
    s = Scores(reward=np.zeros(4), accuracy=np.zeros(4), checked=none, format=np.ones(4), parts={}, scored={},
               rm=np.array([2.0, 0.0, 3.0, -1.0]), rm_scored=every, rule=np.array([1.0, 1.0, 0.0, 0.0]),
               guarded=every, source=np.zeros(4, int))
    out = source_metrics("chat", s, every, np.array([5, 6, 7, 8]))
    assert out["chat/rm_high_rule_fail"] == 0.25 and out["chat/hack_rule_rate"] == 0.5
    assert out["chat/rm_score"] == 1.0 and out["chat/completion_len"] == 6.5 and "chat/accuracy" not in out


def test_full_scenario_grpo_mixes_task_and_general_prompts_with_a_reward_model(tmp_path, capsys):
    """R1's last RL stage: addition problems with rule-based rewards and general prompts
    scored by a reward model that joins at step 1 (0-based); per-source metrics; resume."""
    from tests.test_rm import _pairs, _run as train_rm

    # The reward model of tests/test_rm.py's resume test (the same programs, compiled once).
    assert train_rm(tmp_path / "rm", _pairs(tmp_path / "pairs.jsonl", n=48), "train.steps=4", "train.log_every=1") == 0
    general = tmp_path / "general.jsonl"
    general.write_text("".join(json.dumps({"prompt": f"Q: hi {i}? A: "}) + "\n" for i in range(10, 40)))
    sources = (f"grpo.sources=[{{task: addition, problems: 50}}, {{name: chat, prompts: {general}, "
               f"rewards: 'helpful:1,language:0.1'}}]")
    # No dynamic sampling: it would keep the groups with reward spread, whatever their source.
    args = [sources, f"grpo.reward_models=helpful={tmp_path / 'rm'}", "grpo.rm_from_step=1",
            "grpo.dynamic_sampling=false"]
    full = tmp_path / "full"
    assert main(_grpo_args(full, *RUN, *args, "train.steps=3")) == 0
    out = capsys.readouterr().out
    assert "grpo source chat:" in out and "from step 1" in out and "step 1: the reward models join: sources chat" in out
    records = _records(full)
    first, later = records[1], records[2:]
    assert first["chat/share"] == 0 and first["addition/share"] == 1 and "rm_score" not in first
    for r in later:  # 4 prompts a step, weights 1:1
        assert r["chat/share"] == 0.5 and r["addition/share"] == 0.5
        for key in ("rm_score", "chat/helpful", "chat/rm_score", "chat/language", "chat/hack_rule_rate",
                    "chat/completion_len", "chat/reward_mean", "addition/accuracy", "addition/reward_mean",
                    "accuracy", "reward/helpful"):
            assert key in r, key
        assert "chat/accuracy" not in r and "addition/rm_score" not in r
    assert "test_accuracy" in records[-1]
    assert (full / "plots" / "grpo.png").stat().st_size > 10_000

    # Its step-2 checkpoint resumed: step 3 again, the mixture's carry and cursors restored.
    part = tmp_path / "part"
    shutil.copytree(full, part)
    shutil.rmtree(part / "checkpoints" / "3")
    assert main(_grpo_args(part, *RUN, *args, "train.steps=3")) == 0
    a, b = _records(full), _records(part)
    for key in ("loss", "reward_mean", "rm_score", "chat/share"):
        assert [r.get(key) for r in a] == [r.get(key) for r in b], key


def test_reward_models_are_passed_in_and_scores_mask_what_a_source_lacks():
    """A run's reward models reach its sources' rewards without entering the registry;
    rows keep their source's rewards, and a reward a source lacks is masked, not NaN."""
    from eval import rewards
    from eval.completions import Completions
    from train.rl.config import GRPOConfig
    from train.rl.rewards import RewardSet

    problem = tasks.get("addition", 2).split("train", 1)[0]
    chat = tasks.Problem(prompt="Q: hi? A: ", question="hi", fields={}, work="", answer="", key="chat")
    texts = [problem.solution, "no tags", "<think>x</think><answer>7</answer>", "words"]
    comp = Completions(tokens=np.zeros((4, 8), np.int32), logprobs=np.zeros((4, 8), np.float32),
                       lengths=np.array([5, 6, 7, 8], np.int32), texts=texts, truncated=np.zeros(4, bool))
    sources = (PromptSource(task="addition"), PromptSource(name="chat", prompts="p.jsonl", rewards="helpful:1"))
    g = GRPOConfig(sources=sources, reward_models="helpful=unused", hack_rule="integer_answer")
    reward_set = RewardSet(g, sources, {"helpful": lambda p, c, f: [float(len(x)) for x in c]})
    s = reward_set.score(np.array([0, 0, 1, 1]), [problem, problem, chat, chat], comp)
    assert "helpful" not in rewards.names() and reward_set.rm_names == ["helpful"]
    with pytest.raises(ValueError, match="unknown reward 'helpful'"):
        rewards.combine("helpful:1")
    np.testing.assert_allclose(s.reward, [1.1, 0.0, len(texts[2]), len(texts[3])], rtol=1e-6)
    np.testing.assert_array_equal(s.checked, [True, True, False, False])
    np.testing.assert_array_equal(s.scored["helpful"], [False, False, True, True])
    np.testing.assert_array_equal(s.scored["accuracy"], [True, True, False, False])
    np.testing.assert_array_equal(s.rm_scored, s.scored["helpful"])
    np.testing.assert_array_equal(s.guarded, [False, False, True, True])
    np.testing.assert_array_equal(s.rule, [0, 0, 1, 0])
    # Rows of one source only: the other source's rewards are masked there.
    both = Scores.concat([s.take(slice(0, 2)), s.take(slice(2, 4))])
    np.testing.assert_array_equal(both.scored["helpful"], s.scored["helpful"])
    np.testing.assert_array_equal(both.parts["helpful"], s.parts["helpful"])


def test_rollout_rows_stay_split_where_they_were_decoded():
    """generate(gather=False) leaves the completions split over the batch axes (the same
    tokens as gathered ones); ProcessRows reads them and gathers per-row figures with their
    dtypes; kept groups are picked on the devices; each update trains on the rows its
    devices decoded."""
    from eval.completions import ProcessRows, generate_rows, read_rows
    from train.rl.rollout import pick_rows
    from train.stages.grpo import minibatch_rows

    cfg = build_config("grpo", SMALL, all_stages())
    model = dsjax.Transformer(cfg.model.replace(attn_impl="absorb"))
    variables = dsjax.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    prompts = [p.prompt for p in tasks.get("addition", 2).split("train", 16)]
    tok = ByteTokenizer()
    width = prompt_width(tok, prompts)
    mesh = make_mesh(MeshConfig(data=2, fsdp=4))
    rules = activation_rules("fsdp")
    kwargs = dict(max_new_tokens=6, temperature=1.0, stop_token=tok.eos_id, mesh=mesh, rules=rules)
    outs = [generate_rows(model, variables, tok, prompts, width, rng=jax.random.key(k), **kwargs) for k in (1, 2)]
    whole = complete(model, variables, tok, prompts, width, rng=jax.random.key(1), **kwargs)
    assert not outs[0].tokens.sharding.is_fully_replicated and len(outs[0].tokens.sharding.device_set) == 8
    share = ProcessRows.of(outs[0].tokens)
    np.testing.assert_array_equal(share.held, np.arange(16))
    np.testing.assert_array_equal(share.own, np.arange(16))
    comp = read_rows(outs[0], tok, np.array([5, 0, 9]), tok.eos_id)
    np.testing.assert_array_equal(comp.tokens, whole.tokens[[5, 0, 9]])
    assert comp.texts == [whole.texts[i] for i in (5, 0, 9)]
    every = share.gather({"x": np.arange(16, dtype=np.float64) / 3, "ok": np.arange(16) % 3 == 0})
    assert every["x"].dtype == np.float64 and every["ok"].dtype == bool and every["x"][4] == 4 / 3

    rows = np.concatenate([np.arange(20, 24), np.arange(0, 4), np.arange(28, 32), np.arange(8, 12)])
    tokens, logprobs, lengths = pick_rows(outs, rows)
    both = np.concatenate([np.asarray(o.tokens) for o in outs])
    np.testing.assert_array_equal(np.asarray(tokens), both[rows])
    assert tokens.sharding == outs[0].tokens.sharding

    batch_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp", "expert")))
    first, second = minibatch_rows(outs[0].tokens.sharding, batch_sh, 16, 2)
    np.testing.assert_array_equal(first, np.arange(0, 16, 2))  # device k decoded rows 2k and 2k + 1
    np.testing.assert_array_equal(second, np.arange(1, 16, 2))
