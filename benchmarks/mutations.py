"""Mutation check: each deliberate bug below, applied to a temporary copy of the repository, must make at least
one of its listed tests fail. A mutation that no test catches means the suite cannot see that bug.

    python benchmarks/mutations.py [--only ID,ID] [--out benchmarks/results/mutations.json]

Each mutation is one exact text replacement in one source file (the run refuses a mutation whose text is not
found exactly once, so an edit of the source cannot silently turn a mutation into a no-op). The tests run with
pytest -x in the copy; the result records, per mutation, which listed tests failed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    id: str
    what: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTATIONS = [
    Mutation("gae-sign", "GAE: the lambda term's sign flipped",
             "meshplan/rl/advantages.py", "running = (delta + gamma * lam", "running = (delta - gamma * lam",
             ("tests/rl/test_advantages.py::test_three_token_episode_by_hand",
              "tests/rl/test_trainer.py::test_value_pretraining_fits_monte_carlo_returns")),
    Mutation("reward-flip", "the rule-based reward given to wrong answers",
             "meshplan/rl/rollout.py", "reward(bool(c), wrong_reward)", "reward(not bool(c), wrong_reward)",
             ("tests/rl/test_trainer.py::test_value_pretraining_fits_monte_carlo_returns",)),
    Mutation("drop-grad-reduce", "data-parallel gradient reduction skipped",
             "meshplan/runtime/data_parallel.py", "        for bucket in self.buckets:\n            grads",
             "        for bucket in []:\n            grads",
             ("tests/rl/test_trainer.py::test_cli_two_model_parallel_processes_match_one_and_resume",
              "tests/api/test_compile.py::test_compiled_model_trains_like_one_device_on_two_ranks",
              "tests/rl/test_engine.py::test_two_processes_under_model_parallel_plans")),
    Mutation("resume-no-optim", "resume forgets the AdamW state (the DCP load fills the weights only)",
             "meshplan/rl/checkpoint.py", "dcp_io.load(engine.pm, engine.optimizer, sub)",
             "dcp_io.load(engine.pm, None, sub)",
             ("tests/rl/test_trainer.py::test_resume_is_bit_identical",
              "tests/rl/test_engine.py::test_two_processes_under_model_parallel_plans")),
    Mutation("clip-copies", "global grad norm counts a replicated shard once per rank holding it",
             "meshplan/runtime/grad_clip.py", "        if all(g.index == 0 for g in piece.copies):",
             "        if True:",
             ("tests/runtime/test_zero_and_clip.py",
              "tests/rl/test_engine.py::test_two_processes_under_model_parallel_plans",
              "tests/rl/test_trainer.py::test_cli_two_model_parallel_processes_match_one_and_resume")),
    Mutation("rl-stale-rollout", "rollouts decode on weights never re-gathered after an update",
             "meshplan/rl/engine.py", "        if self._synced != self._version:", "        if False:",
             ("tests/rl/test_engine.py::test_two_processes_under_model_parallel_plans",)),
    Mutation("rl-load-no-regather", "after a checkpoint load, rollouts decode on the weights gathered before it",
             "meshplan/rl/checkpoint.py", "        engine.weights_changed()\n", "",
             ("tests/rl/test_engine.py::test_two_processes_under_model_parallel_plans",)),
    Mutation("tp-drop-all-reduce", "TP: a Partial output is used without its all-reduce",
             "meshplan/runtime/redistribute.py", "x = sum_partial(x, ch)", "x = x",
             ("tests/runtime/test_runtime_equivalence.py::test_matrix_float32[tp-tp-2]",
              "tests/runtime/test_runtime_equivalence.py::test_gradient_into_replicated_value",
              "tests/runtime/test_runtime_redistribute.py")),
    Mutation("tp-drop-reduce-scatter", "TP: a Partial output is sliced instead of reduce-scattered",
             "meshplan/runtime/redistribute.py", "x = scatter_partial(x, to.dim, ch)",
             "x = take_shard(x, to.dim, g.size, g.index)",
             ("tests/runtime/test_runtime_equivalence.py::test_matrix_float32[tp-tp-dp2,mp2]",)),
    Mutation("ulysses-a2a-swap", "Ulysses: the first all-to-all's split and concat dims swapped",
             "meshplan/runtime/ulysses_attention.py", "exchange(sp_qkv(ctx, x), 2, 1,", "exchange(sp_qkv(ctx, x), 1, 2,",  # noqa: E501
             ("tests/api/test_compile.py::test_compiled_model_trains_like_one_device_on_two_ranks",
              "tests/runtime/test_runtime_equivalence.py::test_matrix_float32[sp-ep-2]")),
    Mutation("bf16-summation", "bf16 gradient reduction sums in bf16 instead of float32",
             "meshplan/runtime/data_parallel.py", "recv.float().sum(0)", "sum(recv.unbind(0))",
             ("tests/runtime/test_wire_codecs.py::test_bf16_gradient_reduction_sums_in_float32",
              "tests/runtime/test_runtime_precision.py::test_bf16_gradient_reduction_is_close_and_summed_in_fp32")),
    Mutation("fp8-scale", "fp8 row scale amax / 240 (the e4m3fnuz maximum) instead of / 448",
             "meshplan/kernels/fp8.py", "return amax / torch.full_like(amax, FP8_MAX)",
             "return amax / torch.full_like(amax, 240.0)",
             ("tests/runtime/test_wire_codecs.py::test_fp8_row_codec_equals_the_e4m3_definition",
              "tests/runtime/test_compression_processes.py::test_loss_and_last_expert_gradients_equal_the_hand_rounded_dispatch")),
    Mutation("error-model-grad-cast", "error_model.measure's gradient reduction without the cast of the sum",
             "meshplan/measure/error_model.py", 'out["grad"]["bf16"][n] = _rel(bf(bf(parts).sum(0)), parts.sum(0))',
             'out["grad"]["bf16"][n] = _rel(bf(parts).sum(0), parts.sum(0))',
             ("tests/runtime/test_error_model_measure.py::test_measure_equals_the_numpy_codecs_errors",)),
    Mutation("mfu-per-gpu", "simulate's MFU without the GPU count in its denominator",
             "meshplan/planner/simulate.py", "/ (mc.gpus * cluster.peak_flops * bd.step)",
             "/ (cluster.peak_flops * bd.step)",
             ("tests/planner/test_baselines.py::test_simulate_numbers_by_hand",)),
    Mutation("tokens-per-microbatch", "simulate's tokens/s counts one micro-batch per step",
             "meshplan/planner/simulate.py", "tokens = global_batch * seq", "tokens = global_batch * seq // mc.m",
             ("tests/planner/test_baselines.py::test_simulate_numbers_by_hand",)),
    Mutation("run-no-reduce", "`meshplan run` (torchrun path) skips the gradient reduction",
             "meshplan/runtime/run_plan.py", "        pm.reduce_gradients()\n        opt.step()", "        opt.step()",
             ("tests/runtime/test_runtime_multiprocess.py::test_torchrun_end_to_end",)),
    Mutation("trace-head-ignored", "`meshplan trace --head value` traces the LM model",
             "meshplan/cli.py", "model = load_model(args.config, args.head)", "model = load_model(args.config)",
             ("tests/cli/test_cli_commands.py::test_trace_value_head",)),
    Mutation("train-resume-dropped", "`meshplan train --resume` starts from scratch",
             "meshplan/rl/cli.py", "train(cfg, resume=args.resume,", "train(cfg, resume=False,",
             ("tests/cli/test_cli_commands.py::test_train_resume",)),
    Mutation("demo-no-reduce", "the demo's ranks skip the gradient reduction",
             "meshplan/demo.py", "        cm.reduce_gradients()\n", "",
             ("tests/cli/test_cli_commands.py::test_demo_reduced_steps",)),
    Mutation("fp8-not-applied", "fp8 collectives silently sent unrounded (as fp32)",
             "meshplan/runtime/compression.py", 'if precision == "fp32" or not x.is_floating_point():',
             'if precision in ("fp32", "fp8") or not x.is_floating_point():',
             ("tests/runtime/test_compression.py::test_compressed_plans_stay_within_the_error_model",
              "tests/runtime/test_wire_codecs.py::test_fp8_row_codec_equals_the_e4m3_definition",
              "tests/runtime/test_compression_processes.py::test_other_gradients_within_the_formats_bounds")),
    Mutation("grad-precision-ignored", "bf16 gradient reduction silently done in fp32",
             "meshplan/runtime/data_parallel.py",
             '    if precision == "fp32" or not x.is_floating_point():\n        return _reduce_fp32(x, axes, stats)',
             "    if True:\n        return _reduce_fp32(x, axes, stats)",
             ("tests/runtime/test_compression_processes.py::test_bf16_gradient_reduction_equals_the_hand_sum_of_two_halves",
              "tests/runtime/test_compression_processes.py::test_bytes_moved_are_the_compressed_sizes")),
    Mutation("fp8-dispatch-scales-float64", "the fp8 dispatch's per-row scales sent as float64",
             "meshplan/runtime/expert_parallel.py", "scales = _a2a_single_raw(scales, recv, send, ch, FWD)",
             "scales = _a2a_single_raw(scales.double(), recv, send, ch, FWD).float()",
             ("tests/runtime/test_compression_processes.py::test_bytes_moved_are_the_compressed_sizes",)),
    Mutation("error-model-bwd-layout", "error_model.measure's backward move with per-row instead of block scales",
             "meshplan/measure/error_model.py", 'roundtrip(x, dt, "block") for x in attn_grad',
             'roundtrip(x, dt, "row") for x in attn_grad',
             ("tests/runtime/test_error_model_measure.py::test_measure_equals_the_numpy_codecs_errors",)),
    Mutation("moe-combine-float32", "the runtime's MoE weighted sum in float32 for a float64 model",
             "meshplan/runtime/moe_routing.py", "acc = accumulation_dtype(y.dtype)", "acc = torch.float32",
             ("tests/runtime/test_runtime_equivalence.py::test_random_configs_random_plans",)),
    Mutation("rope-reversed", "RoPE rotates by -angle (shared by the reference and the parallel attention)",
             "meshplan/models/moe_transformer.py", "[x1 * c - x2 * s, x1 * s + x2 * c]",
             "[x1 * c + x2 * s, x2 * c - x1 * s]",
             ("tests/models/test_attention_rope.py",)),
    Mutation("rope-float32", "RoPE computed in float32 for a float64 model",
             "meshplan/models/moe_transformer.py",
             "compute = accumulation_dtype(x.dtype)\n    x1, x2 = x.to(compute).unflatten",
             "compute = torch.float32\n    x1, x2 = x.to(compute).unflatten",
             ("tests/models/test_attention_rope.py",)),
    Mutation("attention-not-causal", "attention without its causal mask (shared by every strategy)",
             "meshplan/models/moe_transformer.py", "is_causal=True,", "is_causal=False,",
             ("tests/models/test_attention_rope.py",)),
    Mutation("gqa-head-order", "GQA: KV heads tiled (h % Hkv) instead of grouped (h // rep)",
             "meshplan/models/moe_transformer.py",
             "k = k.repeat_interleave(rep, dim=2)\n        v = v.repeat_interleave(rep, dim=2)",
             "k = k.repeat(1, 1, rep, 1)\n        v = v.repeat(1, 1, rep, 1)",
             ("tests/models/test_attention_rope.py",)),
]


def copy_repo(dst: Path) -> None:
    """The tracked and untracked-but-not-ignored files of the repository (what git would commit)."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True).stdout.split(b"\0")
    for f in filter(None, files):
        src = ROOT / f.decode()
        if src.is_file():
            out = dst / f.decode()
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(src.read_bytes())


def apply(m: Mutation, root: Path) -> None:
    path = root / m.path
    text = path.read_text()
    if text.count(m.old) != 1:
        raise SystemExit(f"mutation {m.id}: {m.old!r} occurs {text.count(m.old)} times in {m.path}, not once")
    path.write_text(text.replace(m.old, m.new))


def run_tests(root: Path, tests: tuple[str, ...]) -> dict[str, str]:
    """pytest on each test separately: its outcome, 'failed' or 'passed'."""
    out = {}
    env = {**os.environ, "PYTHONPATH": str(root)}
    for t in tests:
        r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:logging",
                            t], cwd=root, env=env, capture_output=True, text=True, check=False)
        out[t] = "passed" if r.returncode == 0 else ("failed" if r.returncode == 1 else f"error rc={r.returncode}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="", help="comma-separated mutation ids")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mutations.json"))
    args = ap.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.id in args.only.split(",")]
    results = []
    for m in chosen:
        with tempfile.TemporaryDirectory(prefix=f"mut-{m.id}-") as tmp:
            root = Path(tmp)
            copy_repo(root)
            apply(m, root)
            t0 = time.time()
            outcome = run_tests(root, m.tests)
        caught = [t for t, o in outcome.items() if o == "failed"]
        results.append({"id": m.id, "what": m.what, "file": m.path, "tests": outcome, "caught_by": caught,
                        "caught": bool(caught), "seconds": round(time.time() - t0, 1)})
        print(f"{m.id:22s} {'CAUGHT' if caught else 'MISSED'} by {len(caught)}/{len(m.tests)}  ({m.what})",
              flush=True)
    n = sum(r["caught"] for r in results)
    print(f"caught {n}/{len(results)}")
    Path(args.out).write_text(json.dumps({"caught": n, "total": len(results), "mutations": results}, indent=1))
    return 0 if n == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
