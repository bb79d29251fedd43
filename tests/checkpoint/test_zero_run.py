"""`meshplan run` under a dp x mp plan with ZeRO-1 (the default) on 4 ranks: every step's loss equals one device's
(--check, gradient clipping on), a run stopped at step 2 and resumed logs the same losses bit for bit (its first
part built on the meta device, --init meta), a ZeRO
checkpoint resumes without ZeRO (the per-parameter layout), and the AdamW state per rank is ~1/d of --no-zero's."""
import json

import pytest
import yaml
from ckpt_workers import config

from meshplan.ir import Mesh, Plan, trace
from meshplan.models import build_model
from meshplan.runtime.launch import cli_run


def _files(tmp_path):
    model = tmp_path / "model.yaml"
    model.write_text(yaml.safe_dump(config().to_dict()))
    plan = tmp_path / "plan.yaml"
    graph = trace(build_model(config(), device="meta"))
    Plan.build(graph, Mesh.of(dp=2, mp=2), {"attention": "tp", "moe": "ep"}, axis="mp").to_yaml(plan)
    return ["--model", str(model), "--plan", str(plan), "--batch", "4", "--seq", "8", "--lr", "0.01", "--seed", "3",
            "--clip-grad", "0.5"]


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_zero_run_checks_resumes_and_shards_the_state(tmp_path):
    common = _files(tmp_path)
    whole, part, plain = tmp_path / "whole.jsonl", tmp_path / "part.jsonl", tmp_path / "plain.jsonl"
    assert cli_run(common + ["--steps", "4", "--check", "--metrics", str(whole)]) == 0  # CheckError otherwise
    rows = _rows(whole)
    assert all(r["grad_norm"] > 0.5 for r in rows)  # every step clipped: the check covers the global norm
    assert [r["loss"] for r in rows] == pytest.approx([r["reference_loss"] for r in rows], rel=1e-5)

    ckpt = tmp_path / "ckpt"
    assert cli_run(common + ["--steps", "2", "--metrics", str(part), "--checkpoint", str(ckpt), "--init", "meta"]) == 0
    assert cli_run(common + ["--steps", "4", "--metrics", str(part), "--checkpoint", str(ckpt), "--resume"]) == 0
    assert [r["loss"] for r in _rows(part)] == [r["loss"] for r in rows]  # exact: shards, AdamW state, batches

    (ckpt / "step_000004").rename(tmp_path / "later")  # resume from step 2 again, now without ZeRO
    assert cli_run(common + ["--steps", "4", "--metrics", str(plain), "--checkpoint", str(ckpt), "--resume",
                             "--no-zero"]) == 0
    unsharded = _rows(plain)
    assert [r["loss"] for r in unsharded] == pytest.approx([r["loss"] for r in rows[2:]], rel=1e-6)
    # rank 0's AdamW moments: replicated parameters (norms, router) over 4 ranks, the rest over dp = 2
    ratio = rows[-1]["optimizer_state_bytes"] / unsharded[-1]["optimizer_state_bytes"]
    assert 0.25 < ratio < 0.52, ratio


def test_init_meta_with_verify_is_refused_before_any_rank(tmp_path):
    from meshplan.cli_args import UsageError
    from meshplan.runtime.launch import build_parser, check_run

    args = build_parser().parse_args(_files(tmp_path) + ["--init", "meta", "--verify"])
    with pytest.raises(UsageError, match=r"^--verify: compares against the whole model on every rank; --init meta"):
        check_run(args)
    check_run(build_parser().parse_args(_files(tmp_path) + ["--init", "meta"]))  # accepted without --verify
