"""The benchmark runner (`python -m bench`), the train step the benchmarks share
(bench/common.py) and bench/vs_hf.py's arithmetic; no benchmark runs at full size (two
run on `tiny`: attention_memory through the runner, moe_cpu's kernel comparison)."""

import contextlib
import glob
import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from bench import __main__ as runner
from bench import vs_hf
from dsjax.config import load_model_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_list_names_every_benchmark_and_marks_slow_ones():
    out = subprocess.run([sys.executable, "-m", "bench", "--list"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    listed = {line.split()[0]: line for line in out.stdout.splitlines()}
    files = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "bench", "*.py"))
             if not os.path.basename(p).startswith("_")}
    assert set(listed) == files - runner.HELPERS and "vs_hf" in listed and "common" not in listed
    for name in ("r1", "decode", "fp8_quality", "fp8_ablation"):
        assert " slow " in listed[name]
    assert " gpu " in listed["gpu_check"]


def test_every_benchmark_and_recipe_imports_as_a_module():
    """Each bench/NAME.py (and each examples/ recipe) imports from the repository root as
    `bench.NAME`, with no sys.path set-up of its own: `python -m bench.NAME` resolves. A
    benchmark run as a file (`python bench/NAME.py`) puts the repository first on the path,
    and only then (see test_bench_scripts_run_as_files_from_anywhere)."""
    for name in [*runner.discover(), *runner.HELPERS]:
        importlib.import_module(f"bench.{name}")
    for path in glob.glob(os.path.join(ROOT, "examples", "*.py")):
        importlib.import_module(f"examples.{os.path.basename(path)[:-3]}")
    as_a_file = 'if __package__ in (None, ""):'
    for path in glob.glob(os.path.join(ROOT, "bench", "*.py")) + glob.glob(os.path.join(ROOT, "examples", "*.py")):
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        for i, line in enumerate(lines):
            if "sys.path" in line:
                assert "/bench/" in path and lines[i - 1].startswith(as_a_file), (path, i + 1)


def test_runner_runs_a_benchmark_as_a_module_and_tabulates_it():
    out = subprocess.run([sys.executable, "-m", "bench", "attention_memory", "--", "--preset", "tiny",
                          "--seq-len", "64"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "python -m bench.attention_memory --preset tiny --seq-len 64" in out.stderr
    (line,) = [json.loads(s) for s in out.stdout.splitlines() if s.startswith("{")]
    assert line["name"] == "attention_memory" and line["seq_len"] == 64
    assert line["dense_temp_mib"] > 0 and line["blockwise_temp_mib"] > 0
    table = out.stdout.splitlines()[-1]
    assert table.startswith("attention_memory") and " ok " in table and "seq_len=64" in table


def test_bench_train_step_is_the_trainers_step_with_or_without_a_mesh():
    """bench.common.train_step on one device and sharded over fsdp=2: the same first
    loss, the same parameters after two steps, the step counter and the router bias
    advanced (the trainer's step: AdamW and the aux-loss-free bias update)."""
    import jax

    from bench.common import random_batch, run_config, train_step
    from sharding.mesh import MeshConfig, make_mesh

    run = run_config("tiny", 4, 16, "model.num_nextn_predict_layers=0")
    batch = random_batch(run.model.vocab_size, 4, 16, 0)
    results = []
    for mesh in (None, make_mesh(MeshConfig(fsdp=2), devices=jax.devices()[:2])):
        train = train_step(run.model, run.train, mesh)
        state = train.start(train.init_variables(0))
        bias = np.asarray(jax.tree.leaves(state.moe_bias)[0])
        data = batch if mesh is None else jax.device_put(batch, train.batch_sharding)
        losses = []
        with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            for _ in range(2):
                state, metrics = train.step(state, data)
                losses.append(float(metrics["ce"]))
        assert int(state.step) == 2 and not np.array_equal(np.asarray(jax.tree.leaves(state.moe_bias)[0]), bias)
        results.append((losses, jax.tree.map(np.asarray, state.params)))
    (loss_a, params_a), (loss_b, params_b) = results
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-5)
    assert loss_a[1] < loss_a[0]
    for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_default_selection_leaves_out_slow_ones_and_names_win():
    available = runner.discover()
    default = runner.select([], available, run_all=False)
    assert "vs_hf" in default and not set(default) & set(runner.SLOW)
    assert runner.select([], available, run_all=True) == list(available)
    assert runner.select(["r1", "vs_hf"], available, run_all=False) == ["r1", "vs_hf"]
    with pytest.raises(SystemExit, match="nosuch"):
        runner.select(["nosuch"], available, run_all=False)
    assert "VARIANT" in runner.skip_reason("fp8_ablation", [])
    assert runner.skip_reason("fp8_ablation", ["forward_only"]) is None


def test_parse_output_adds_names_and_keeps_other_lines():
    text = ('compiled 1 device in 3.1 s\n'
            '{"preset": "small", "runs": [{"impl": "absorb", "context": 256, "decode_tokens_per_s": 23.8}]}\n'
            '{not json\n'
            '[1, 2]\n'
            '{"name": "own", "x": 1}\n\n')
    records, other = runner.parse_output(text, "decode")
    assert records == [{"name": "decode", "preset": "small",
                        "runs": [{"impl": "absorb", "context": 256, "decode_tokens_per_s": 23.8}]},
                       {"name": "own", "x": 1}]
    assert other == ["compiled 1 device in 3.1 s", "{not json", "[1, 2]"]


def test_table_rows_and_figures():
    vs = {"name": "vs_hf", "preset": "tiny", "measure": "train", "dsjax_per_s": 1255.9, "hf_per_s": 1884.3,
          "speedup": 0.667, "mfu": 0.0893, "target_met": False, "flops_formula": "6*N_active + ..."}
    other = {"name": "attention_memory", "preset": "small", "seq_len": 4096, "dense_temp_mib": 2111.1,
             "blockwise_temp_mib": 139.6, "reduction": 15.12, "heads": 8}
    generic = {"name": "new_one", "a": 1, "nested": {"b": 2}, "long": "x" * 40, "c": 0.123456}
    results = [{"name": "vs_hf", "status": "ok", "wall_s": 61.2, "records": [vs, dict(vs, preset="small")]},
               {"name": "attention_memory", "status": "ok", "wall_s": 7.0, "records": [other]},
               {"name": "new_one", "status": "ok", "wall_s": 1.0, "records": [generic]},
               {"name": "gpu_check", "status": "skipped", "wall_s": None, "records": [], "reason": "needs a GPU"},
               {"name": "r1", "status": "failed", "wall_s": 3.0, "records": [], "reason": "exit status 1"}]
    lines = runner.format_table(results).splitlines()
    assert lines[0].split() == ["benchmark", "status", "wall", "s", "figures"] and set(lines[1]) == {"-"}
    assert len(lines) == 2 + 6
    assert lines[2].startswith("vs_hf") and " 61 " in lines[2]
    assert "preset=tiny  measure=train  dsjax_per_s=1256  hf_per_s=1884  speedup=0.667  mfu=0.0893  " \
           "target_met=False" in lines[2]
    assert lines[3].startswith(" ") and "preset=small" in lines[3]
    assert "reduction=15.12" in lines[4] and "heads" not in lines[4]
    assert "a=1  c=0.1235" in lines[5] and "nested" not in lines[5] and "long" not in lines[5]
    assert "skipped" in lines[6] and "needs a GPU" in lines[6]
    assert "failed" in lines[7] and "exit status 1" in lines[7]
    decode = runner.key_figures({"name": "decode", "runs": [
        {"impl": "naive", "context": 256, "decode_tokens_per_s": 15.4, "cache_bytes": 1},
        {"impl": "absorb", "context": 256, "decode_tokens_per_s": 23.8, "cache_bytes": 1}]})
    assert decode == [("naive@256", 15.4), ("absorb@256", 23.8)]


def test_flops_and_bytes_against_a_hand_count():
    """tiny, MTP off: D 128, V 512, L 4 (1 dense + 3 MoE), H 4, Q 64, C 64, K 32, R 16, Vh 32,
    dense F 384, E 16 experts of F 64, k 4, 1 shared expert."""
    cfg = load_model_config("tiny").replace(num_nextn_predict_layers=0)
    D, V, H, Q, C, K, R, Vh = 128, 512, 4, 64, 64, 32, 16, 32
    attn = (D * Q + Q + Q * H * (K + R)            # wq_a, q_norm, wq_b
            + D * (C + R) + C + C * H * (K + Vh)   # wkv_a, kv_norm, wkv_b
            + H * Vh * D + 2 * D)                  # wo, the two layer norms
    dense_layer = attn + 3 * D * 384
    expert = 3 * D * 64
    moe_layer = attn + D * 16 + 4 * expert + expert  # router, 4 routed experts, 1 shared
    n_active = dense_layer + 3 * moe_layer + D + D * V  # final norm, output head
    assert vs_hf.active_params(cfg) == n_active
    T = 256
    attention_fwd = 2 * 4 * H * (K + R + Vh) * (T / 2)   # per token: 2 FLOPs x H(K+R+V) x T/2 keys x L
    assert vs_hf.train_flops_per_token(cfg, T) == 6 * n_active + 3 * attention_fwd
    assert vs_hf.prefill_flops_per_token(cfg, T) == 2 * n_active + attention_fwd
    assert vs_hf.decode_flops_per_token(cfg, 48) == 2 * n_active + 2 * 4 * H * (K + R + Vh) * 48
    from train.steps import flops_per_token
    assert vs_hf.train_flops_per_token(cfg, T) == flops_per_token(cfg, T)  # the trainer's own count

    context = 48
    one = vs_hf.decode_bytes(cfg, 1, context)
    routed_non = n_active - 3 * 4 * expert
    assert one["weight_bytes"] == 4 * (routed_non + 3 * 4 * expert + D)
    assert one["cache_bytes"] == 4 * 1 * 4 * context * (C + R)
    assert one["bytes"] == one["weight_bytes"] + one["cache_bytes"]
    eight = vs_hf.decode_bytes(cfg, 8, context)  # 8 x 4 = 32 > 16: every expert is read
    assert eight["experts_read_per_moe_layer"] == 16
    assert eight["weight_bytes"] == 4 * (routed_non + 3 * 16 * expert + 8 * D)
    assert eight["cache_bytes"] == 4 * 8 * 4 * context * (C + R)
    assert vs_hf.decode_bound(cfg, 8, context, 1e10) == pytest.approx(8 * 1e10 / eight["bytes"])


def test_copy_probe_keeps_its_arrays_and_times_each_copy():
    probe = vs_hf.CopyProbe(4 * 2 ** 20)
    src, dst = probe.src, probe.dst
    src[::7] = 3.0
    dst[:] = 0.0  # each measure copies again: the probe's warm-up copy is not enough
    rates = probe.measure(3)
    assert len(rates) == 3 and all(r > 0 for r in rates)
    assert probe.src is src and probe.dst is dst and np.array_equal(dst, src)  # the same arrays, copied

def test_targets_and_target_met():
    assert vs_hf.targets("tiny", "train") == {"target_speedup": 1.5}
    assert vs_hf.targets("small", "train") == {"target_speedup": 1.0, "target_mfu": 0.5}
    assert vs_hf.targets("small", "prefill") == {"target_speedup": 1.0}
    assert vs_hf.targets("tiny", "decode_b8") == {"target_speedup": 1.5, "target_fraction_of_bound": 0.6}
    line = {"speedup": 1.2, "mfu": 0.6, "target_speedup": 1.0, "target_mfu": 0.5}
    assert vs_hf.target_met(line)
    assert not vs_hf.target_met(dict(line, mfu=0.4))
    assert not vs_hf.target_met({"speedup": 2.0, "fraction_of_bound": 0.5, **vs_hf.targets("tiny", "decode_b1")})


def test_moe_cpu_kernel_comparison_reports_both_sides():
    import jax.numpy as jnp

    from bench import moe_cpu
    from dsjax.cpu import kernels

    cfg = load_model_config("tiny")
    out = moe_cpu.blocked_kernel(cfg, 64, 1)
    if not kernels.applies(jnp.float32):
        assert out == {}
        return
    assert out["rows"] % out["block"] == 0 and out["rows"] >= 64 * cfg.num_experts_per_tok
    for name in ("kernel_fwd", "kernel_fwd_bwd", "xla_fwd", "xla_fwd_bwd"):
        assert out[name]["gflop_per_s"] > 0


def test_profile_step_attributes_ops_to_the_model_part_in_their_scope():
    from bench import profile_step

    hlo = """
  %dot.9 = f32[8,64]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %ynn_fusion.3 = f32[8,64]{1,0} fusion(%dot.9, %b), kind=kCustom, metadata={op_name="jit(train_step)/jvp(Transformer)/Transformer.trunk/moe_layers/moe/ffn/routed_experts/while/body/dot_general" stack_frame_id=1}
  ROOT %add.1 = f32[8]{0} add(%c, %d), metadata={op_name="jit(train_step)/transpose(jvp(Transformer))/Transformer.trunk/moe_layers/attention/attn/add"}
  %select.2 = f32[8]{0} select(%p, %c, %d), metadata={op_name="jit(train_step)/jit(_where)/select_n"}
"""
    scopes = profile_step.op_scopes(hlo)
    assert {"ynn_fusion.3", "add.1", "select.2", "dot.9"} <= set(scopes)
    assert scopes["dot.9"] == scopes["ynn_fusion.3"]  # no metadata: the scope of its user
    assert [profile_step.part_of(scopes[n]) for n in ("ynn_fusion.3", "add.1", "select.2")] == [
        "routed experts", "attention (MLA)", "optimizer and guard"]
    assert profile_step.part_of("jit(train_step)/jvp(Transformer)/Transformer.trunk/moe_layers/moe/gate/top_k") == \
        "MoE router, shared expert, combine"
    assert profile_step.part_of("") == "other"
    # containers (their leaves are counted instead), cloned ones included: a cond in a scan is "cond.35.clone"
    assert all(profile_step.CONTAINERS.match(n) for n in ("while.12", "cond.35.clone", "call.1.clone.2"))
    assert not any(profile_step.CONTAINERS.match(n) for n in ("ynn_fusion.3", "while_body", "copy.clone"))


def test_profile_step_decode_counts_only_the_decoding_loop():
    from bench import profile_step

    hlo = """
%fused_computation.1 (param_0: f32[8]) -> f32[8] {
  %param_0 = f32[8]{0} parameter(0)
  ROOT %mul.1 = f32[8]{0} multiply(%param_0, %param_0)
}

%body.2 (arg: (s32[], f32[8])) -> (s32[], f32[8]) {
  %arg = (s32[], f32[8]) parameter(0)
  %gte.3 = f32[8]{0} get-tuple-element(%arg), index=1
  %fusion.4 = f32[8]{0} fusion(%gte.3), kind=kLoop, calls=%fused_computation.1
  ROOT %tuple.5 = (s32[], f32[8]) tuple(%gte.3, %fusion.4)
}

%cond.6 (arg.1: (s32[], f32[8])) -> pred[] {
  %arg.1 = (s32[], f32[8]) parameter(0)
  ROOT %constant.7 = pred[] constant(false)
}

ENTRY %main.8 (p: f32[8]) -> f32[8] {
  %p = f32[8]{0} parameter(0)
  %prefill.9 = f32[8]{0} add(%p, %p)
  %tuple.10 = (s32[], f32[8]) tuple(%p, %prefill.9)
  %experts.13 = (s32[], f32[8]) while(%tuple.10), condition=%cond.6, body=%blocks.14, metadata={op_name="jit(run)/Transformer/Transformer.trunk/moe_layers/layer_0/moe/ffn/routed_experts/while"}
  %while.11 = (s32[], f32[8]) while(%experts.13), condition=%cond.6, body=%body.2, metadata={op_name="jit(run)/while"}
  ROOT %out.12 = f32[8]{0} get-tuple-element(%while.11), index=1
}

%blocks.14 (arg.2: (s32[], f32[8])) -> (s32[], f32[8]) {
  %arg.2 = (s32[], f32[8]) parameter(0)
  ROOT %prefill_dot.15 = (s32[], f32[8]) tuple(%arg.2)
}
"""
    names = profile_step.loop_ops(hlo)
    assert {"fusion.4", "gte.3", "mul.1", "constant.7"} <= names
    # the prefill's loop over expert blocks (a while inside the model) is not the decoding loop
    assert not names & {"prefill.9", "while.11", "out.12", "experts.13", "prefill_dot.15"}
    assert {"fusion.4", "mul.1"} <= profile_step.loop_ops(hlo.replace(', metadata={op_name="jit(run)/while"}', ""))
    assert profile_step.part_of("jit(run)/while/body/argmax", decode=True) == "sampling and loop"
    assert profile_step.part_of("jit(run)/while/body/jit(log_softmax)/reduce_max", decode=True) == "sampling and loop"
    assert profile_step.part_of("jit(run)/while/body/Transformer/Transformer.trunk/moe_layers/layer_0/attention/x",
                                decode=True) == "attention (MLA)"


def test_r1_workdir_keeps_to_one_seed(tmp_path):
    """bench/r1.py reuses a workdir's finished stages, so a workdir holds one seed's runs:
    another --seed there is refused, naming both."""
    from bench import r1

    assert r1.default_workdir(0) == "bench_r1" and r1.default_workdir(3) == "bench_r1_seed3"
    r1.claim_workdir(str(tmp_path), 1)
    r1.claim_workdir(str(tmp_path), 1)
    with pytest.raises(SystemExit, match="holds the runs of --seed 1, not 2"):
        r1.claim_workdir(str(tmp_path), 2)


def test_r1_plot_docs_draws_both_runs_of_each_seed(tmp_path, monkeypatch):
    from bench import r1

    monkeypatch.chdir(tmp_path)
    for run in ("grpo", "grpo_zero"):
        os.makedirs(os.path.join(r1.default_workdir(2), run))
        with open(os.path.join(r1.default_workdir(2), run, "metrics.jsonl"), "w") as f:
            for step in range(3):
                f.write(json.dumps({"step": step, "format_rate": 0.5, "completion_len": 40.0 + step,
                                    **({"test_accuracy": 0.1, "test_format_rate": 0.2} if step != 1 else {})})
                        + "\n")
    assert os.path.getsize(r1.plot_docs(str(tmp_path / "curves.png"), [2])) > 10_000
    with pytest.raises(SystemExit, match="bench_r1_seed3/grpo_zero has no metrics.jsonl"):
        r1.plot_docs(str(tmp_path / "curves.png"), [3])


def test_r1_probe_scores_the_restated_question_and_the_worked_solution(monkeypatch):
    """`python -m bench.r1 --probe`: the share of held-out prompts continued with the
    restated question ('51+44:'), and of openings continued with the whole worked
    solution, right; scored on completions we choose (no model)."""
    import dataclasses
    import types

    import dsjax.checkpoint
    import dsjax.tokenizer
    import eval.completions
    from bench import r1
    from dsjax.tokenizer import ByteTokenizer
    from eval import tasks

    @dataclasses.dataclass
    class Cfg:
        attn_impl: str = "auto"

    problems = tasks.get("addition", 2, template="short").split("test", 4, seed=0)
    model = types.SimpleNamespace(cfg=Cfg(), clone=lambda cfg: model)
    monkeypatch.setattr(dsjax.checkpoint, "load_trained", lambda w: (model, {}, {"data": {"tokenizer": "bytes"}}))
    monkeypatch.setattr(dsjax.tokenizer, "load_tokenizer", lambda name: ByteTokenizer())

    def complete(model, variables, tokenizer, prompts, width, max_new_tokens):
        if prompts[0].endswith("<think>"):  # restate the first three right, misread the last
            texts = [p.work[:max_new_tokens] for p in problems[:3]] + ["99+99: 9+9"[:max_new_tokens]]
        else:  # the worked solution right for the first two only
            texts = [p.work.split(":", 1)[1] for p in problems[:2]] + [" 1+1+0=2 so 2"] * 2
        return types.SimpleNamespace(texts=texts)

    monkeypatch.setattr(eval.completions, "complete", complete)
    assert r1.probe_pretrained("wd", r1.load_config("r1")["grpo"], 4) == {"restates_question": 0.75,
                                                                         "worked_solution": 0.5}


def test_bench_scripts_run_as_files_from_anywhere(tmp_path):
    """`python bench/r1.py --seed 1` (the issue's spelling) and `python bench/gpu_check.py`
    run as files from any directory, like `python -m bench.r1`: each script puts the
    repository first on the path before it imports the project's packages."""
    import glob
    import re
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for name in ("r1.py", "gpu_check.py"):
        done = subprocess.run([sys.executable, os.path.join(root, "bench", name), "--help"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0 and "usage:" in done.stdout, (name, done.stderr[-2000:])
    for path in glob.glob(os.path.join(root, "bench", "*.py")):
        text = open(path).read()
        first = re.search(r"^(import|from) (jax|numpy|dsjax|bench|sharding|train|eval|yaml)\b", text, re.M)
        if '__name__ == "__main__"' in text and first and not path.endswith("__main__.py"):
            assert "sys.path.insert(0, os.path.dirname(os.path.dirname(" in text[:first.start()], path
