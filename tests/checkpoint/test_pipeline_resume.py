"""`meshplan run --checkpoint/--resume` with a pipeline plan (pp=2 x mp=2, 4 ranks): a run stopped at step 2 and
resumed logs the same losses bit for bit as an uninterrupted one (the first part built on the meta device,
--init meta); the pipeline's checkpoint (each stage saved its
own parameters) resumes under a plan without a pipeline on 2 ranks with the same losses (fp32 tolerance)."""
import json

import pytest
import yaml
from ckpt_workers import config

from meshplan.ir import Mesh, Plan, trace
from meshplan.ir.pipeline import Pipeline
from meshplan.models import build_model
from meshplan.runtime.launch import cli_run


def _plan(path, mesh, pipeline=None):
    plan = Plan.build(trace(build_model(config(), device="meta")), mesh, {"attention": "sp", "moe": "ep"}, axis="mp")
    plan.pipeline = pipeline or plan.pipeline
    plan.to_yaml(path)
    return str(path)


def _losses(path):
    return [json.loads(line)["loss"] for line in path.read_text().splitlines()]


def test_pipeline_resume_is_bit_identical_and_loads_without_pipeline(tmp_path):
    model = tmp_path / "model.yaml"
    model.write_text(yaml.safe_dump(config().to_dict()))
    pp = _plan(tmp_path / "pp.yaml", Mesh.of(mp=2), Pipeline(2, None, microbatches=2, schedule="1f1b"))
    common = ["--model", str(model), "--batch", "4", "--seq", "8", "--lr", "0.01", "--seed", "3"]
    whole, part, flat = tmp_path / "whole.jsonl", tmp_path / "part.jsonl", tmp_path / "flat.jsonl"
    ckpt = tmp_path / "ckpt"
    assert cli_run(common + ["--plan", pp, "--steps", "4", "--metrics", str(whole)]) == 0
    # --init meta: each stage allocates and fills only its shards, with the values of the full build (exact)
    assert cli_run(common + ["--plan", pp, "--steps", "2", "--metrics", str(part), "--checkpoint", str(ckpt),
                             "--init", "meta"]) == 0
    assert cli_run(common + ["--plan", pp, "--steps", "4", "--metrics", str(part), "--checkpoint", str(ckpt),
                             "--resume"]) == 0
    assert _losses(part) == _losses(whole)  # exact: every stage's shards and AdamW state, the same batches

    (ckpt / "step_000004").rename(tmp_path / "later")  # resume the step-2 checkpoint without a pipeline
    no_pp = _plan(tmp_path / "flat.yaml", Mesh.of(mp=2))
    assert cli_run(common + ["--plan", no_pp, "--steps", "4", "--metrics", str(flat), "--checkpoint", str(ckpt),
                             "--resume"]) == 0
    assert _losses(flat) == pytest.approx(_losses(whole)[2:], rel=1e-5)
