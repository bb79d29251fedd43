"""The seam between the RL algorithm and whatever executes the model: forward, backward, optimizer step.

RuntimeEngine is THE implementation `meshplan train` uses: the policy and the value model each run through
meshplan's runtime (meshplan.runtime.ParallelModel) under a data-parallel plan built from the model's IR. Rollouts
do not go through the engine: like verl's trainer -> vLLM weight sync, the engine's full weights are copied into
a plain rollout module each step (sync_rollout_model), which decodes with the KV cache in sampling.py.
"""
from __future__ import annotations

import abc

import torch
import torch.nn as nn


class Engine(abc.ABC):
    """One trainable model. forward(tokens [B, S]) -> the FULL output ([B, S, V] logits or [B, S] values) on every
    rank, differentiable; backward(loss) accumulates gradients; step() reduces them across ranks, clips, updates
    and zeroes them, returning the gradient norm before clipping."""

    @abc.abstractmethod
    def forward(self, tokens: torch.Tensor) -> torch.Tensor: ...

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.forward(tokens)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    @abc.abstractmethod
    def step(self) -> float: ...

    @abc.abstractmethod
    def full_state_dict(self) -> dict[str, torch.Tensor]: ...

    @abc.abstractmethod
    def optimizer_state_dict(self) -> dict: ...

    @abc.abstractmethod
    def load_optimizer_state_dict(self, state: dict) -> None: ...


def make_optimizer(params, lr: float, betas: tuple[float, float], weight_decay: float) -> torch.optim.Optimizer:
    # foreach=False: the same per-parameter kernels on every run, so resumed runs stay bit-identical
    return torch.optim.AdamW(list(params), lr=lr, betas=betas, weight_decay=weight_decay, foreach=False)


def data_parallel_plan(model: nn.Module, world: int):
    """A plan that is data parallel over all `world` ranks. Plan.build puts each op's strategy on the mesh's
    model axis (the last) and shards the batch over the others, so the model axis is a trivial mp=1 and every
    op is batch-sharded over dp (Mesh.of(dp=N) alone would make dp the model axis: TP/EP/SP, not DP)."""
    from meshplan.ir import Mesh, Plan, trace

    return Plan.build(trace(model), Mesh.of(dp=world, mp=1))


class RuntimeEngine(Engine):
    """The model under meshplan.runtime.ParallelModel with a data-parallel plan over all ranks (world 1 is the
    mesh dp=1). Call after torch.distributed is initialised. ParallelModel copies the model's weights into its
    shards at construction, so the model must already hold the weights to start from."""

    def __init__(self, model: nn.Module, lr: float, betas=(0.9, 0.999), weight_decay: float = 0.0,
                 grad_clip: float = 1.0, world: int = 1):
        from meshplan.runtime import ParallelModel

        self.plan = data_parallel_plan(model, world)
        self.pm = ParallelModel(model, self.plan)
        self.grad_clip = grad_clip
        self.optimizer = make_optimizer(self.pm.parameters(), lr, betas, weight_decay)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.pm(tokens)

    def step(self) -> float:
        self.pm.reduce_gradients()
        # under a dp plan every rank holds whole (replicated) parameters, so the local norm is the global norm
        norm = torch.nn.utils.clip_grad_norm_(list(self.pm.parameters()), self.grad_clip or float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return self.pm.full_state_dict()

    def optimizer_state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_optimizer_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)


def build_engine(model: nn.Module, lr: float, betas=(0.9, 0.999), weight_decay: float = 0.0, grad_clip: float = 1.0,
                 world: int = 1) -> Engine:
    return RuntimeEngine(model, lr, betas, weight_decay, grad_clip, world)


@torch.no_grad()
def sync_rollout_model(engine: Engine, rollout_model: nn.Module) -> None:
    """Copy the engine's current full weights into the plain module that generates rollouts."""
    rollout_model.load_state_dict(engine.full_state_dict(), strict=False)
