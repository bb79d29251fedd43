"""Rank-side code of the checkpoint tests (a module, not a test file, so spawned processes can import it)."""
from __future__ import annotations

from pathlib import Path

import torch

from meshplan.ir import Plan
from meshplan.models import ModelConfig, build_model
from meshplan.runtime import ParallelModel
from meshplan.runtime import checkpoint as ckpt

LR = 1e-2


def config() -> ModelConfig:
    return ModelConfig(name="ck", vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=32,
                       n_experts=4, top_k=2, max_seq_len=16)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    data = torch.randint(0, config().vocab_size, (4, 9), generator=g)
    return data[:, :-1], data[:, 1:]


def train_step(pm: ParallelModel, opt: torch.optim.Optimizer, step: int) -> float:
    tokens, targets = batch(step)
    opt.zero_grad(set_to_none=True)
    loss = pm.loss(tokens, targets)
    loss.backward()
    pm.reduce_gradients()
    opt.step()
    return loss.item()


def full_optim(pm: ParallelModel, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """exp_avg / exp_avg_sq gathered to full tensors on every rank, keyed like the checkpoint."""
    out = {}
    for name, p in pm.named_parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            out[f"{name}.{key}"] = pm.full_tensor(name, opt.state[p][key])
        out[f"{name}.step"] = opt.state[p]["step"].clone()
    return out


def save_worker(rank: int, world: int, plan_yaml: str, root: str) -> None:
    """Train 2 steps under the plan, save at step 2, and write the full parameters and optimizer state."""
    pm = ParallelModel(build_model(config(), seed=0), Plan.from_yaml(plan_yaml), timeout_s=60)
    opt = torch.optim.AdamW(pm.parameters(), lr=LR)
    for step in range(2):
        train_step(pm, opt, step)
    ckpt.save(pm, opt, root, step=2)
    full, optim = pm.full_state_dict(), full_optim(pm, opt)
    if rank == 0:
        torch.save({"model": full, "optim": optim}, Path(root) / "expected.pt")


def load_worker(rank: int, world: int, plan_yaml: str, root: str) -> None:
    """Build the model on the meta device with the latest checkpoint as its weight source (each rank reads only
    its shards), load the AdamW state from it too, and write what the rank holds."""
    path = ckpt.latest(root)
    pm = ParallelModel(build_model(config(), device="meta"), Plan.from_yaml(plan_yaml), timeout_s=60, init=path)
    full = pm.full_state_dict()
    opt = torch.optim.AdamW(pm.parameters(), lr=LR)
    step = ckpt.load(pm, opt, path)
    assert all(torch.equal(full[n], t) for n, t in pm.full_state_dict().items())
    optim = full_optim(pm, opt)
    loss = train_step(pm, opt, step)
    if rank == 0:
        torch.save({"model": full, "optim": optim, "step": step, "loss": loss}, Path(root) / f"loaded{world}.pt")
