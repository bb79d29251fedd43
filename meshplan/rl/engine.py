"""The seam between the RL algorithm and whatever executes the model: forward, backward, optimizer step.

CompiledEngine is THE implementation `meshplan train` uses: the policy and the value model (policy trunk + scalar
head) each go through `meshplan.compile` for the run's world and cluster (rl.plan: the planner's choice, a mesh
it must use, or a plan YAML), so a model too big for one rank gets the SP/TP/EP plan the planner picks, and a
small one may get plain data parallelism. The trainer never sees the plan: forward takes the global [B, S] batch
on every rank and returns the full output on every rank (ParallelModel's contract).

Rollouts decode with the KV cache in sampling.py on a plain module (the model given to compile, whose full
weights the compiled model no longer reads: ops run its modules with this rank's shards). rollout_model() makes
that module hold the current policy without a second full copy where the runtime allows: a parameter the plan
replicates IS the compiled model's shard (the module's parameter shares its storage, so optimizer steps show up
in it for free); only a parameter the plan shards is gathered, each time the weights changed. Decoding the compiled
model itself would need a KV cache in the runtime's executor, which it has not; decoding is data parallel over
the ranks (rollout.py) whatever the training plan is.
"""
from __future__ import annotations

import abc
import math

import torch
import torch.nn as nn

from meshplan.runtime.device_mesh import local_tensor
from meshplan.runtime.grad_clip import clip_grad_norm_, grad_pieces


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


def make_optimizer(params, lr: float, betas: tuple[float, float], weight_decay: float) -> torch.optim.Optimizer:
    # foreach=False: the same per-parameter kernels on every run, so resumed runs stay bit-identical
    return torch.optim.AdamW(list(params), lr=lr, betas=betas, weight_decay=weight_decay, foreach=False)


def pad_multiples(plan) -> tuple[int, int]:
    """(batch, sequence) multiples every op of `plan` can split: the product of the mesh axes that shard dim 0
    (resp. 1) of any op's input or output."""
    out = []
    for dim in (0, 1):
        axes = {axis for p in plan.ops.values() for placements in (p.input, p.output)
                for (axis, _), pl in zip(plan.mesh.axes, placements) if getattr(pl, "dim", None) == dim}
        out.append(math.prod(plan.mesh.axis_size(a) for a in axes))
    return out[0], out[1]


class CompiledEngine(Engine):
    """`model` compiled by meshplan.compile on the initialised torch.distributed world (world 1 included).
    compile copies the model's weights into this rank's shards, so the model must hold the weights to start from.

    plan: "auto" (the planner, on `cluster`, optionally restricted to `mesh`), a Plan, or a plan YAML path;
    strategies: op kind -> strategy forced on `mesh`'s last axis instead (compile's strategies=).
    example: the [B, S] token shape the plan is chosen for (the step's minibatch); other shapes run too, padded
    at the end to the multiples the plan splits (causal models: padding after a position never changes it).
    """

    def __init__(self, model: nn.Module, lr: float, betas=(0.9, 0.999), weight_decay: float = 0.0,
                 grad_clip: float = 1.0, *, cluster="local", mesh=None, plan="auto", strategies=None,
                 example=(8, 64), verify: bool = True, pad_id: int = 0):
        import torch.distributed as dist

        import meshplan

        if not dist.is_initialized():
            raise RuntimeError("CompiledEngine: torch.distributed is not initialised (meshplan train and "
                               "rl.distributed.launch / one_rank_world make a world, one rank included)")
        self.model = model
        self.compiled = meshplan.compile(model, cluster=cluster, mesh=mesh, plan=plan, strategies=strategies,
                                         verify=verify, example_inputs=(torch.zeros(example, dtype=torch.long),))
        self.pm = self.compiled.module
        self.plan = self.compiled.plan
        self.grad_clip = grad_clip
        self.pad_id = pad_id
        self.multiples = pad_multiples(self.plan)
        if getattr(getattr(model, "config", None), "capacity_factor", None) is not None and self.multiples != (1, 1):
            raise ValueError(f"rl.plan: the plan splits the batch/sequence by {self.multiples}, which pads the "
                             f"batch, and {type(model).__name__}'s expert capacity would count the padding tokens")
        self.optimizer = make_optimizer(self.pm.parameters(), lr, betas, weight_decay)
        self._shared = self._share_replicated()
        self._version, self._synced = 0, -1

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, s = tokens.shape
        mb, ms = self.multiples
        pb, ps = (-b) % mb, (-s) % ms
        if pb or ps:
            tokens = nn.functional.pad(tokens, (0, ps, 0, pb), value=self.pad_id)
        out = self.pm(tokens)
        return out[:b, :s].to(tokens.device)

    def step(self) -> float:
        self.pm.reduce_gradients()
        norm = float(clip_grad_norm_(grad_pieces(self.pm), self.grad_clip, self.pm.axes, self.pm.comm_stats))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._version += 1
        return norm

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return self.pm.full_state_dict()

    def weights_changed(self) -> None:
        """The shards were written in place (a checkpoint load): the next rollout_model() gathers again."""
        self._version += 1

    # ---- the rollout module ---------------------------------------------------------------------------------
    def _replicated(self, name: str) -> bool:
        return all(getattr(pl, "dim", None) is None for pl in self.pm.placement_of(name))

    @torch.no_grad()
    def _share_replicated(self) -> set[str]:
        """Point every replicated parameter of self.model at the compiled model's shard (same storage)."""
        shards = {n: local_tensor(p) for n, p in self.pm.named_parameters()}  # DTensors' local tensors
        shared = set()
        for name, p in self.model.named_parameters():
            shard = shards.get(name)
            if shard is not None and self._replicated(name) and shard.device == p.device and \
                    shard.dtype == p.dtype and shard.shape == p.shape:
                p.data = shard.data
                shared.add(name)
        return shared

    @torch.no_grad()
    def rollout_model(self) -> nn.Module:
        """The plain module holding the current weights (a collective when the plan shards a parameter)."""
        if self._synced != self._version:
            shards = {n: local_tensor(p) for n, p in self.pm.named_parameters()}
            for name, p in self.model.named_parameters():
                if name not in self._shared and name in shards:
                    p.copy_(self.pm.gathered(shards[name], self.pm.placement_of(name)))
            self._synced = self._version
        return self.model

    @property
    def shared_fraction(self) -> float:
        """The fraction of the parameters the rollout module shares with the compiled model (no copy)."""
        sizes = {n: p.numel() for n, p in self.model.named_parameters()}
        return sum(sizes[n] for n in self._shared) / max(1, sum(sizes.values()))


def build_engine(model: nn.Module, lr: float, betas=(0.9, 0.999), weight_decay: float = 0.0, grad_clip: float = 1.0,
                 **plan) -> CompiledEngine:
    """plan: CompiledEngine's keywords (cluster, mesh, plan, strategies, example, verify, pad_id)."""
    return CompiledEngine(model, lr, betas, weight_decay, grad_clip, **plan)
