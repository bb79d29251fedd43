"""The spawned side of test_compression_processes: one rank of a 2-process gloo world runs the tiny model's sp/ep
plan in fp32 and with bf16 gradient reduction + fp8 MoE dispatch, and writes what it saw (no pickles: json and
npz). A module, not a test file, so the spawned processes can import it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from rt_harness import batch_for, loss_of, make_model, tiny_config, uniform_plan

from meshplan.ir import Mesh, trace
from meshplan.runtime import ParallelModel

BATCH, SEQ = 4, 16
SP_EP = {"attention": "sp", "moe": "ep"}
COMPRESSED = {"dispatch": "fp8", "grad": "bf16"}


def worker(rank: int, world: int, outdir: str) -> None:
    torch.manual_seed(0)
    cfg = tiny_config()
    tokens, targets = batch_for(cfg, BATCH, SEQ)
    graph = trace(make_model(cfg))
    report = {}
    for label, precision in (("fp32", None), ("compressed", COMPRESSED)):
        plan = uniform_plan(graph, Mesh.of(mp=world), SP_EP, precision=precision)
        pm = ParallelModel(make_model(cfg), plan, graph=graph, timeout_s=60)
        loss = loss_of(pm(tokens), targets)
        loss.backward()
        pm.reduce_gradients()
        st = pm.comm_stats
        report[label] = {"loss": loss.item(), "grad_bytes": st.total(phase="grad"),
                         "grad_kinds": sorted({k.kind for k in st.bytes if k.phase == "grad"}),
                         "dispatch_fwd": st.total(tag="dispatch", phase="fwd"),
                         "dispatch_bwd": st.total(tag="dispatch", phase="bwd")}
        np.savez(Path(outdir, f"{label}-rank{rank}.npz"), **{k: v.numpy() for k, v in pm.full_grads().items()})
    Path(outdir, f"rank{rank}.json").write_text(json.dumps(report))
