"""The RL run's configuration: typed dataclasses loaded from YAML (yaml.safe_load).

An unknown or invalid field raises one RLConfigError naming it: "rl.algo.eps_hgh: unknown field (known: ...)".
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ..inputs import MAX_INT, check_int, check_number, find_config, mapping, read_yaml
from .algorithms import PRESETS, AlgoConfig
from .tasks import TASKS


class RLConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


@dataclass
class TaskConfig:
    name: str = "arithmetic"  # or "chain" (tasks_chain.py: long, uneven responses)
    min_digits: int = 1  # arithmetic: operand digits
    max_digits: int = 3
    ops: str = "+"  # "+", "-" or "+-"
    min_steps: int = 3  # chain: steps of the walk, drawn uniformly per problem (response 6n + 3 tokens)
    max_steps: int = 33
    rules: int = 9  # chain: multipliers 1..rules of the step rule (x, y) -> (y, (m*y + x) mod 10)
    eval_size: int = 256
    eval_seed: int = 12345
    wrong_reward: float = 0.0  # reward of an incorrect answer: 0 or -1 (docs/reference.md, "VAPO")


@dataclass
class WarmupConfig:
    steps: int = 300  # supervised steps on worked solutions before RL (0: none)
    batch_size: int = 64
    lr: float = 3e-3
    cache: str | None = None  # a .pt path: reuse the warmed-up weights if there, else write them there
    seed: int = -1  # the warm-up's seed (init and batches); -1: the run's seed


@dataclass
class RolloutConfig:
    prompts_per_step: int = 16  # P
    samples_per_prompt: int = 8  # K (group sampling)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 0  # 0: the task's longest correct response + 25% (room to be wrong, and to truncate)


@dataclass
class OptimConfig:
    actor_lr: float = 1e-3
    critic_lr: float = 2e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    epochs: int = 1  # passes over each step's batch
    minibatches: int = 2  # optimizer steps per pass


@dataclass
class TrainConfig:
    steps: int = 200  # RL steps (value-pretraining steps come before and are not counted here)
    max_samples: int = 0  # stop once this many RL samples were generated (0: no limit); for equal-budget runs
    eval_every: int = 20
    checkpoint_every: int = 50
    out: str = "runs/rl"
    nproc: int = 1
    # torch intra-op threads per process (0: cores // nproc). 1 by default: on a shared machine, spinning OpenMP
    # threads that lose their core to another process stall every op (measured: 30x slower steps at load 8)
    threads: int = 1
    plot: bool = True
    backend: str = "auto"  # "auto": NCCL when every local rank has a GPU of its own, else gloo; or "gloo" / "nccl"


@dataclass
class PlanConfig:
    """How meshplan.compile plans the policy and the critic (rl/planning.py)."""
    cluster: str = "local"  # a configs/clusters name or YAML path: the planner's cost model
    mesh: str | None = None  # e.g. "dp=1,mp=2" (last axis: the model axis; sizes multiply to nproc); None: searched
    plan: str = "auto"  # the policy's: "auto" (the planner) or a plan YAML path (its mesh must have nproc ranks)
    critic_plan: str = "auto"  # the value model's, likewise ("auto" with a policy plan file: on that file's mesh)
    strategies: str | None = None  # e.g. "attention=tp,moe=ep": forced on every op of that kind (no planner)
    verify: bool = True  # one step against the single-device model before training (needs it to fit one rank)


@dataclass
class RLConfig:
    name: str = "rl"
    seed: int = 0
    model: str = "tiny"  # a configs/models name or YAML path
    task: TaskConfig = field(default_factory=TaskConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=lambda: PRESETS["vapo"]())
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---- loading --------------------------------------------------------------------------------------------------
_NESTED = {"task": TaskConfig, "warmup": WarmupConfig, "rollout": RolloutConfig, "optim": OptimConfig,
           "train": TrainConfig, "plan": PlanConfig}


def _check_type(value, tp, where: str):
    """Coerce/check one YAML value against a dataclass field's annotation; raise naming `where`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _check_type(value, inner, where)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise RLConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_check_type(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise RLConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RLConfigError(f"{where}: expected an integer, got {value!r}")
        return check_int(where, value, RLConfigError, lo=-MAX_INT)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RLConfigError(f"{where}: expected a number, got {value!r}")
        return check_number(where, value, RLConfigError)  # finite: never NaN or inf
    if tp is str:
        if not isinstance(value, str):
            raise RLConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{where}: unsupported annotation {tp!r}")


def fill(obj, d: dict, where: str):
    """Set the fields of dataclass instance `obj` from mapping `d`, checking names and types."""
    if not isinstance(d, dict):
        raise RLConfigError(f"{where}: expected a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(type(obj))
    known = [f.name for f in dataclasses.fields(obj)]
    for key, value in d.items():
        if key not in known:
            raise RLConfigError(f"{where}.{key}: unknown field (known: {', '.join(known)})")
        setattr(obj, key, _check_type(value, hints[key], f"{where}.{key}"))
    return obj


def config_from_dict(d: dict) -> RLConfig:
    if not isinstance(d, dict):
        raise RLConfigError(f"rl: expected a mapping at the top level, got {type(d).__name__}")
    cfg = RLConfig()
    top = {k: v for k, v in d.items() if k not in _NESTED and k != "algo"}
    fill(cfg, top, "rl")
    for key, cls in _NESTED.items():
        setattr(cfg, key, fill(cls(), d.get(key) or {}, f"rl.{key}"))
    algo = d.get("algo") or {}
    if not isinstance(algo, dict):
        raise RLConfigError(f"rl.algo: expected a mapping (e.g. {{preset: vapo}}), got {algo!r}")
    algo = dict(algo)
    preset = algo.pop("preset", "vapo")
    if preset not in PRESETS:
        raise RLConfigError(f"rl.algo.preset: {preset!r} is not one of {', '.join(PRESETS)}")
    cfg.algo = fill(PRESETS[preset](), algo, "rl.algo")
    validate(cfg)
    return cfg


REQUIRED = ("model", "algo")  # a run must say what it trains and how; every other field has a default


def load_rl_config(path: str | Path) -> RLConfig:
    """An RL config file (a path, or a name in $XDG_CONFIG_HOME/meshplan/rl/ or the shipped configs)."""
    p = find_config("rl", path, "rl config", RLConfigError)
    d = mapping(f"rl config {str(p)!r}", read_yaml(p, "rl config", RLConfigError), RLConfigError)
    cfg = config_from_dict(d)  # unknown fields and wrong values first: they name the field that is there
    for key in REQUIRED:
        if key not in d:
            raise RLConfigError(f"rl.{key}: missing (an RL config needs {' and '.join(REQUIRED)}; see "
                                f"meshplan/configs/rl/vapo-tiny.yaml)")
    if isinstance(d["algo"], dict) and "preset" not in d["algo"]:
        raise RLConfigError(f"rl.algo.preset: missing (one of {', '.join(PRESETS)})")
    return cfg


def validate(cfg: RLConfig) -> None:
    def need(ok: bool, where: str, msg: str):
        if not ok:
            raise RLConfigError(f"rl.{where}: {msg}")

    need(isinstance(cfg.model, str) and bool(cfg.model.strip()), "model", "must name a model config")
    need(cfg.seed >= 0, "seed", "must be >= 0")
    t = cfg.task
    need(t.name in TASKS, "task.name", f"one of {', '.join(TASKS)}, got {t.name!r}")
    need(1 <= t.min_steps <= t.max_steps <= 99, "task.min_steps", "need 1 <= min_steps <= max_steps <= 99")
    need(1 <= t.rules <= 9, "task.rules", f"must be in [1, 9], got {t.rules}")
    if t.name == "chain":
        space = 100 * t.rules * (t.max_steps - t.min_steps + 1)
        need(t.eval_size <= space // 2, "task.eval_size", f"at most half of the {space} distinct chain problems")
    need(1 <= t.min_digits <= t.max_digits, "task.min_digits", "need 1 <= min_digits <= max_digits")
    need(t.max_digits <= 18, "task.max_digits", f"must be <= 18 (int64 sums), got {t.max_digits}")
    need(bool(t.ops) and not set(t.ops) - set("+-"), "task.ops", f"a string over '+-', got {t.ops!r}")
    need(t.eval_size > 0, "task.eval_size", "must be > 0")
    need(t.eval_seed >= 0, "task.eval_seed", "must be >= 0")
    need(t.wrong_reward <= 0, "task.wrong_reward", "must be <= 0 (1 is the reward of a correct answer)")
    w = cfg.warmup
    need(w.steps >= 0, "warmup.steps", "must be >= 0")
    need(w.batch_size > 0, "warmup.batch_size", "must be > 0")
    need(w.lr > 0, "warmup.lr", f"must be > 0, got {w.lr}")
    need(w.seed >= -1, "warmup.seed", f"must be >= 0, or -1 for the run's seed, got {w.seed}")
    r = cfg.rollout
    need(r.prompts_per_step > 0, "rollout.prompts_per_step", "must be > 0")
    need(r.samples_per_prompt > 0, "rollout.samples_per_prompt", "must be > 0")
    need(r.temperature >= 0, "rollout.temperature", "must be >= 0")
    need(0 < r.top_p <= 1, "rollout.top_p", "must be in (0, 1]")
    need(r.max_new_tokens >= 0, "rollout.max_new_tokens", "must be >= 0")
    _validate_optim(cfg.optim, r, need)
    tr = cfg.train
    need(tr.steps >= 0, "train.steps", "must be >= 0")
    need(tr.max_samples >= 0, "train.max_samples", "must be >= 0")
    need(tr.eval_every > 0, "train.eval_every", "must be > 0")
    need(tr.checkpoint_every > 0, "train.checkpoint_every", "must be > 0")
    need(bool(tr.out.strip()), "train.out", "must be a directory path")
    need(0 < tr.nproc <= 256, "train.nproc", f"must be in [1, 256], got {tr.nproc}")
    need(tr.threads >= 0, "train.threads", "must be >= 0")
    need(r.prompts_per_step % tr.nproc == 0, "rollout.prompts_per_step",
         f"{r.prompts_per_step} prompts do not split evenly over nproc={tr.nproc}")
    from .algorithms import validate_algo
    err = validate_algo(cfg.algo, r.samples_per_prompt)
    if err:
        raise RLConfigError(f"rl.algo.{err}")


def _validate_optim(o: OptimConfig, r: RolloutConfig, need) -> None:
    need(o.actor_lr > 0, "optim.actor_lr", f"must be > 0, got {o.actor_lr}")
    need(o.critic_lr > 0, "optim.critic_lr", f"must be > 0, got {o.critic_lr}")
    need(all(0 <= b < 1 for b in o.betas), "optim.betas", f"each must be in [0, 1), got {list(o.betas)}")
    need(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    need(o.grad_clip > 0, "optim.grad_clip", f"must be > 0, got {o.grad_clip}")
    need(o.epochs > 0, "optim.epochs", "must be > 0")
    need(o.minibatches > 0, "optim.minibatches", "must be > 0")
    need(r.prompts_per_step * r.samples_per_prompt >= o.minibatches, "optim.minibatches",
         "more minibatches than samples per step")
