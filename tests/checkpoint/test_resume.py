"""`meshplan run --checkpoint DIR [--resume]`: a run stopped after 2 steps and resumed to 4 logs the same losses,
bit for bit, as one uninterrupted 4-step run (2 ranks, sp attention, ep MoE); bad flag combinations are refused
before any rank starts."""
import json

import pytest
import yaml
from ckpt_workers import config

from meshplan.cli_args import UsageError
from meshplan.ir import Mesh, Plan, trace
from meshplan.models import build_model
from meshplan.runtime.launch import build_parser, check_run, cli_run


def _files(tmp_path):
    model = tmp_path / "model.yaml"
    model.write_text(yaml.safe_dump(config().to_dict()))
    plan = tmp_path / "plan.yaml"
    graph = trace(build_model(config(), device="meta"))
    Plan.build(graph, Mesh.of(mp=2), {"attention": "sp", "moe": "ep"}, axis="mp").to_yaml(plan)
    return ["--model", str(model), "--plan", str(plan), "--batch", "2", "--seq", "8", "--lr", "0.01", "--seed", "3"]


def _losses(path):
    return [json.loads(line)["loss"] for line in path.read_text().splitlines()]


def test_resume_is_bit_identical(tmp_path):
    common = _files(tmp_path)
    whole, part = tmp_path / "whole.jsonl", tmp_path / "part.jsonl"
    assert cli_run(common + ["--steps", "4", "--metrics", str(whole)]) == 0
    ckpt = tmp_path / "ckpt"
    assert cli_run(common + ["--steps", "2", "--metrics", str(part), "--checkpoint", str(ckpt)]) == 0
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_000002"]
    assert cli_run(common + ["--steps", "4", "--metrics", str(part), "--checkpoint", str(ckpt), "--resume"]) == 0
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_000002", "step_000004"]
    assert _losses(part) == _losses(whole)  # exact: the same shards, AdamW state and batches


def test_checkpoint_flags_refused_before_any_rank(tmp_path):
    common = _files(tmp_path)
    parse = build_parser().parse_args
    with pytest.raises(UsageError, match="--resume: needs --checkpoint"):
        check_run(parse(common + ["--resume"]))
    with pytest.raises(UsageError, match="holds no complete checkpoint"):
        check_run(parse(common + ["--resume", "--checkpoint", str(tmp_path / "none")]))
    (tmp_path / "ck" / "step_000001").mkdir(parents=True)
    with pytest.raises(UsageError, match="already holds step_000001"):
        check_run(parse(common + ["--checkpoint", str(tmp_path / "ck")]))
    with pytest.raises(UsageError, match="--check trains"):
        check_run(parse(common + ["--checkpoint", str(tmp_path / "ck"), "--resume", "--check"]))
