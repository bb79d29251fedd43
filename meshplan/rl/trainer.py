"""The RL trainer: warm-up, value pretraining, then rollout -> advantages -> policy/critic updates, with eval,
JSONL metrics, atomic checkpoints, bit-identical resume and a PNG of the curves.

The policy and the value model train through Engines (engine.py): each is compiled by meshplan.compile for the
world and the cluster of rl.plan. Rollouts decode with the KV cache on the plain policy module, which shares the
compiled model's replicated weights and gathers only the sharded ones (engine.py). Checkpoints are DCP step
directories (checkpoint.py).
Randomness that shapes a step (sampling, minibatch order) comes from generators seeded by (seed, phase, step,
rank), and the prompt stream's state is checkpointed, so a resumed run repeats the straight run exactly.
"""
from __future__ import annotations

import hashlib
import os
import random
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from meshplan.cli_args import PLOT_HINT, have
from meshplan.models import build_model, load_config

from . import checkpoint as ckpt_io
from .advantages import final_token_rewards, monte_carlo_returns
from .algorithms import advantages_and_returns, mixed_groups, shaped_scores
from .config import RLConfig, RLConfigError
from .distributed import BACKENDS, all_gather_objects, barrier, launch, set_threads
from .engine import build_engine
from .losses import clipped_pg_loss, entropy, positive_lm_loss, token_logprobs, value_loss
from .metrics import MetricsLog, plot_metrics, read_metrics
from .planning import check_plan_config, compile_options
from .progress import postfix
from .rollout import ScoredBatch, collect, evaluate
from .tasks import PromptSampler, build_task
from .warmup import cache_key, warmup


def derived_seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & ((1 << 63) - 1)


def generator(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(derived_seed(*parts))


def check_sizes(m, task, max_new: int) -> None:
    tok = task.tokenizer
    if m.vocab_size < tok.vocab_size:
        raise RLConfigError(f"rl.model: vocab_size {m.vocab_size} < the task tokenizer's {tok.vocab_size}")
    if task.max_prompt_len + max_new > m.max_seq_len:
        raise RLConfigError(f"rl.rollout.max_new_tokens: prompt {task.max_prompt_len} + {max_new} "
                            f"new tokens exceed model.max_seq_len {m.max_seq_len}")


def preflight(cfg: RLConfig) -> None:
    """The checks a rank would make at start, made in the launcher: the model config loads and fits the task."""
    task = build_task(cfg.task)
    longest = task.max_response_len
    check_sizes(load_config(cfg.model), task, cfg.rollout.max_new_tokens or longest + longest // 4)
    check_plan_config(cfg.plan, cfg.train.nproc)
    if cfg.train.backend not in BACKENDS:
        raise RLConfigError(f"rl.train.backend: {cfg.train.backend!r} is not one of {', '.join(BACKENDS)}")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if cfg.train.backend == "nccl" and gpus < min(cfg.train.nproc, int(os.environ.get("LOCAL_WORLD_SIZE", 1 << 30))):
        raise RLConfigError(f"rl.train.backend: nccl needs a GPU per local rank; this machine has {gpus} for "
                            f"train.nproc={cfg.train.nproc}")


def warmup_cache_path(cfg: RLConfig, world: int) -> Path | None:
    """Where the warmed-up weights of this config are cached (None: no cache). The world size and the plan change
    the reduction order, hence the last bits of the weights, so they are part of the key."""
    if not cfg.warmup.cache:
        return None
    seed = cfg.seed if cfg.warmup.seed < 0 else cfg.warmup.seed  # one warm-up may serve several RL seeds
    key = cache_key(load_config(cfg.model).to_dict(), vars(cfg.task), vars(cfg.warmup), seed) + f"-w{world}"
    if vars(cfg.plan) != vars(type(cfg.plan)()):
        key += "-" + derived_seed(sorted(vars(cfg.plan).items())).to_bytes(8, "little").hex()[:8]
    return Path(cfg.warmup.cache) / f"warmup-{key}.pt"


class Trainer:
    def __init__(self, cfg: RLConfig, rank: int = 0, world: int = 1, resume: bool = False):
        self.cfg, self.rank, self.world = cfg, rank, world
        self.out = Path(cfg.train.out)
        self.task = build_task(cfg.task)
        self.model_cfg = load_config(cfg.model)
        longest = self.task.max_response_len
        self.max_new = cfg.rollout.max_new_tokens or longest + longest // 4
        self._check_sizes()
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)

        found = ckpt_io.latest_step(self.out) if resume else None
        if resume and found is None and rank == 0:
            print(f"--resume: no checkpoint in {ckpt_io.checkpoint_root(self.out)}; starting from scratch")
        self.log_metrics = MetricsLog(self.out / "metrics.jsonl", int(found.name[5:]) if found else None) \
            if rank == 0 else None
        policy = build_model(self.model_cfg, "lm", seed=cfg.seed)
        if found is None:  # resuming: the checkpoint's shards overwrite whatever the engines start from
            policy.load_state_dict(self._warmed_up_weights())
        o = cfg.optim
        self.actor = build_engine(policy, o.actor_lr, o.betas, o.weight_decay, o.grad_clip, **self._plan())
        self.critic = None
        if cfg.algo.critic:
            value = build_model(self.model_cfg, "value", seed=cfg.seed + 1)
            # the critic starts from the warmed-up policy's trunk (as verl/OpenRLHF init it from the SFT model)
            # with a fresh scalar head; value pretraining then fits it to the initial policy's returns
            trunk = {k: v for k, v in policy.state_dict().items() if not k.startswith("output.")}
            value.load_state_dict(trunk, strict=False)
            self.critic = build_engine(value, o.critic_lr, o.betas, o.weight_decay, o.grad_clip,
                                       **self._plan(critic=True))
        self.sampler = PromptSampler(self.task, derived_seed(cfg.seed, "prompts"))
        self.step, self.samples, self.vp_done, self.vp_samples = 0, 0, 0, 0
        if found is not None:
            self._restore(found)

    def _plan(self, batch: int | None = None, critic: bool = False) -> dict:
        """meshplan.compile's options for an engine: rl.plan, planned for one minibatch of full-length rows."""
        r = self.cfg.rollout
        rows = batch or -(-r.prompts_per_step * r.samples_per_prompt // self.cfg.optim.minibatches)
        rows += (-rows) % self.world
        return compile_options(self.cfg.plan, (rows, self.task.max_prompt_len + self.max_new), self.task.tokenizer.PAD,
                               critic)

    def _engines(self) -> dict:
        return {"actor": self.actor, **({"critic": self.critic} if self.critic else {})}

    def _check_sizes(self) -> None:
        check_sizes(self.model_cfg, self.task, self.max_new)

    # ---- warm-up ------------------------------------------------------------------------------------------
    def _warmed_up_weights(self) -> dict:
        cfg, wc = self.cfg, self.cfg.warmup
        seed = cfg.seed if wc.seed < 0 else wc.seed
        policy = build_model(self.model_cfg, "lm", seed=seed)
        if wc.steps == 0:
            return policy.state_dict()
        cache = warmup_cache_path(cfg, self.world)
        key = cache.stem[len("warmup-"):] if cache else None
        if cache is not None and cache.exists():
            if self.rank == 0:
                self.log_metrics.log({"phase": "warmup", "step": 0, "warmup_steps": wc.steps, "cached": str(cache)})
            return ckpt_io.load(cache)["weights"]
        engine = build_engine(policy, wc.lr, cfg.optim.betas, 0.0, cfg.optim.grad_clip, **self._plan(wc.batch_size))
        t0 = time.time()
        with tqdm(total=wc.steps, desc="warm-up", disable=self.rank != 0, leave=False) as bar:
            losses = warmup(engine, self.task, wc.steps, wc.batch_size, seed, bar)
        weights = engine.full_state_dict()
        if self.rank == 0:
            self.log_metrics.log({"phase": "warmup", "step": 0, "warmup_steps": wc.steps, "loss": losses[-1],
                                  "time_s": time.time() - t0})
            if cache is not None:
                ckpt_io.save_atomic({"weights": weights, "key": key}, cache)
        barrier()
        return weights

    # ---- checkpoints --------------------------------------------------------------------------------------
    def save(self) -> None:
        """A DCP step directory (checkpoint.py): each rank's shards and AdamW state, plus the trainer's state."""
        state = {
            "step": self.step, "samples": self.samples, "vp_done": self.vp_done, "vp_samples": self.vp_samples,
            "config": self.cfg.to_dict(), "world": self.world,
            "rng": all_gather_objects(ckpt_io.rng_state()),
            "sampler": self.sampler.state_dict(),
        }
        ckpt_io.save_run(self.out, self.step, self._engines(), state)

    def _restore(self, path: Path) -> None:
        """Resume from a step directory, at any world size and plan: DCP reshards the weights and AdamW state, and
        every random draw of a step comes from generators seeded by (seed, phase, step, rank), so the run continues
        as a run at this world size would from the same state (bit-identical at the same world and plan)."""
        state = ckpt_io.load(path / "trainer.pt")
        if state["world"] != self.world and self.rank == 0:
            print(f"--resume: {path.name} was written by {state['world']} ranks, resuming on {self.world}: the "
                  f"weights are resharded; the prompts of each step split over {self.world} ranks from here on")
        ckpt_io.load_engines(path, self._engines())
        self.step, self.samples = state["step"], state["samples"]
        self.vp_done, self.vp_samples = state["vp_done"], state["vp_samples"]
        ckpt_io.set_rng_state(state["rng"][min(self.rank, len(state["rng"]) - 1)])
        self.sampler.load_state_dict(state["sampler"])

    # ---- batches ------------------------------------------------------------------------------------------
    def _collect(self, phase: str, step: int, round_: int) -> ScoredBatch:
        r = self.cfg.rollout
        problems = self.sampler.draw(r.prompts_per_step)
        return collect(self.actor.rollout_model(), self.task, problems, r.samples_per_prompt, self.max_new,
                       r.temperature, r.top_p, self.cfg.task.wrong_reward,
                       generator(self.cfg.seed, phase, step, round_, self.rank))

    def _rl_batch(self) -> tuple[ScoredBatch | None, list[ScoredBatch]]:
        """One step's training batch and every batch generated for it. Dynamic sampling (DAPO) keeps only the
        groups with mixed outcomes and generates again, up to max_sampling_rounds, to refill P groups."""
        a, r = self.cfg.algo, self.cfg.rollout
        if not a.dynamic_sampling:
            b = self._collect("rl", self.step, 0)
            return b, [b]
        kept, generated, n_groups = [], [], 0
        for round_ in range(a.max_sampling_rounds):
            b = self._collect("rl", self.step, round_)
            generated.append(b)
            keep = mixed_groups(b.correct, r.samples_per_prompt)
            if keep.any():
                kept.append(b.select_groups(keep))
                n_groups += int(keep.sum())
            if n_groups >= r.prompts_per_step:
                break
        if not kept:
            return None, generated
        batch = ScoredBatch.cat(kept, self.task.tokenizer.PAD)
        n = min(n_groups, r.prompts_per_step) * r.samples_per_prompt
        return ScoredBatch(batch.rollout.select(range(n)), batch.correct[:n], batch.rewards[:n], batch.group_size), \
            generated

    def _minibatches(self, n: int, phase: str, epoch: int) -> list[torch.Tensor]:
        perm = torch.randperm(n, generator=generator(self.cfg.seed, phase, self.step, epoch))
        return [c for c in perm.chunk(self.cfg.optim.minibatches) if len(c)]

    @staticmethod
    def _rows(idx: torch.Tensor, tokens: torch.Tensor, *per_token: torch.Tensor, lens: torch.Tensor):
        """The rows idx, cut to their longest sequence (the engine pads what its plan needs, engine.py)."""
        t = int(lens[idx].max())
        return [tokens[idx, :t]] + [x[idx, : t - 1] if x.dim() == 2 else x[idx] for x in per_token]

    @torch.no_grad()
    def _values(self, ro) -> torch.Tensor:
        """The critic's V(s_t) for every action position: output at position t (it has seen tokens[:t+1])."""
        values = torch.zeros(ro.mask.shape)
        lens = ro.prompt_lens + ro.response_lens
        for idx in torch.arange(len(ro)).chunk(self.cfg.optim.minibatches):
            (tokens,) = self._rows(idx, ro.tokens, lens=lens)
            v = self.critic(tokens)[:, :-1].float()
            values[idx, : v.shape[1]] = v
        return values * ro.mask

    # ---- updates ------------------------------------------------------------------------------------------
    def _update_policy(self, batch: ScoredBatch, advantages: torch.Tensor) -> dict:
        a, ro = self.cfg.algo, batch.rollout
        lens = ro.prompt_lens + ro.response_lens
        st = defaultdict(list)
        for epoch in range(self.cfg.optim.epochs):
            for idx in self._minibatches(len(ro), "policy", epoch):
                tokens, mask, old_lp, adv, correct = self._rows(idx, ro.tokens, ro.mask, ro.logprobs, advantages,
                                                                batch.correct, lens=lens)
                logits = self.actor(tokens)
                if self.cfg.rollout.temperature not in (0.0, 1.0):  # the sampler's distribution: logits / T
                    logits = logits / self.cfg.rollout.temperature
                lp = token_logprobs(logits, tokens)
                if epoch == 0 and not st["logprob_diff"]:  # sampler vs trainer forward: should be ~0
                    st["logprob_diff"].append(float(((lp.detach() - old_lp).abs() * mask).max()))
                pg, clip_frac = clipped_pg_loss(lp, old_lp, adv, mask, a.eps_low, a.eps_high, a.token_level_loss)
                loss = pg
                if a.pos_lm_coef > 0:
                    lm = positive_lm_loss(lp, mask, correct)
                    loss = loss + a.pos_lm_coef * lm
                    st["lm_loss"].append(lm.item())
                self.actor.backward(loss)
                st["grad_norm"].append(self.actor.step())
                st["pg_loss"].append(pg.item())
                st["clip_frac"].append(float(clip_frac))
                st["entropy"].append(float(entropy(logits.detach(), mask)))
        return {k: float(np.mean(v)) for k, v in st.items()}

    def _update_critic(self, ro, returns: torch.Tensor, old_values: torch.Tensor | None) -> dict:
        a = self.cfg.algo
        lens = ro.prompt_lens + ro.response_lens
        old = old_values if old_values is not None else torch.zeros_like(returns)
        losses = []
        for epoch in range(self.cfg.optim.epochs):
            for idx in self._minibatches(len(ro), "critic", epoch):
                tokens, mask, ret, old_v = self._rows(idx, ro.tokens, ro.mask, returns, old, lens=lens)
                v = self.critic(tokens)[:, :-1]
                loss = value_loss(v, ret, mask, True, old_v, a.value_clip or None)
                self.critic.backward(loss)
                self.critic.step()
                losses.append(loss.item())
        return {"value_loss": float(np.mean(losses))}

    # ---- phases -------------------------------------------------------------------------------------------
    def value_pretrain(self) -> None:
        """VAPO value-pretraining: fit the critic to Monte-Carlo returns (lambda = 1) of the fixed initial
        policy's rollouts for value_pretrain_steps steps before any policy update."""
        total = self.cfg.algo.value_pretrain_steps
        per_step = self.cfg.rollout.prompts_per_step * self.cfg.rollout.samples_per_prompt
        bar = tqdm(total=total, initial=self.vp_done, desc="value pretraining", disable=self.rank != 0, leave=False)
        while self.vp_done < total:
            b = self._collect("value_pretrain", self.vp_done, 0)
            ro = b.rollout
            scores = shaped_scores(self.cfg.algo, b.rewards, ro.response_lens, self.max_new)
            returns = monte_carlo_returns(final_token_rewards(scores, ro.mask), ro.mask)
            old = self._values(ro) if self.cfg.algo.value_clip else None
            rec = self._update_critic(ro, returns, old)
            self.vp_done += 1
            self.vp_samples += len(b)
            if self.rank == 0:
                self.log_metrics.log({"phase": "value_pretrain", "step": 0, "vp_step": self.vp_done,
                                      "samples": (self.vp_done - total) * per_step, "reward": float(b.rewards.mean()),
                                      **rec})
            bar.update(1)
        bar.close()

    def rl_step(self) -> dict:
        a, t0 = self.cfg.algo, time.time()
        batch, generated = self._rl_batch()
        all_gen = ScoredBatch.cat(generated, self.task.tokenizer.PAD)
        n_gen = len(all_gen)
        rec = {"phase": "rl", "reward": float(all_gen.rewards.mean()),
               "accuracy": float(all_gen.correct.float().mean()),
               "response_len": float(all_gen.rollout.response_lens.float().mean()),
               "truncated": float(all_gen.rollout.truncated.float().mean()), "generated": n_gen,
               "trained": len(batch) if batch is not None else 0}
        if batch is not None:
            ro = batch.rollout
            scores = shaped_scores(a, batch.rewards, ro.response_lens, self.max_new)
            values = self._values(ro) if self.critic else None
            out = advantages_and_returns(a, scores, ro.mask, ro.response_lens, batch.group_size, values)
            rec.update(self._update_policy(batch, out["advantages"]))
            if self.critic:
                rec.update(self._update_critic(ro, out["returns"], values))
                rec["lambda_policy"] = float(out["lambda_policy"].mean())
        self.samples += n_gen
        dt = time.time() - t0
        rec.update(step_time_s=dt, tokens_per_s=float(all_gen.rollout.response_lens.sum()) / dt)
        return rec

    def evaluate(self) -> dict:
        return evaluate(self.actor.rollout_model(), self.task, self.max_new)

    def describe_plans(self) -> str:
        """What meshplan.compile chose for each model, and how much of the policy the rollouts share."""
        lines = [f"{name}: {e.plan.summary()}" + (f"; {e.compiled.verify_report}" if e.compiled.verify_report else "")
                 for name, e in self._engines().items()]
        return "\n".join(lines + [f"rollouts decode on the policy module: {self.actor.shared_fraction:.0%} of its "
                                   f"weights shared with the compiled policy, the rest gathered after each update"])

    def run(self) -> list[dict]:
        cfg, tr = self.cfg, self.cfg.train
        t_start, cpu_start = time.time(), time.process_time()
        fresh = self.step == 0 and self.vp_done == 0
        if self.rank == 0:
            print(self.describe_plans(), flush=True)
        if fresh and self.rank == 0:
            self.log_metrics.log({"phase": "rl", "step": 0, "samples": 0, **self.evaluate(), "time_s": 0.0})
        elif fresh:
            self.evaluate()  # a collective: every rank takes part
        if self.critic and self.vp_done < cfg.algo.value_pretrain_steps:
            self.value_pretrain()
            self.save()

        def done() -> bool:
            return self.step >= tr.steps or (tr.max_samples > 0 and self.samples >= tr.max_samples)

        bar = tqdm(total=tr.steps, initial=self.step, desc=cfg.name, disable=self.rank != 0)
        held_out = None
        while not done():
            rec = self.rl_step()
            self.step += 1
            rec = {"step": self.step, "samples": self.samples, **rec}
            if self.step % tr.eval_every == 0 or done():
                rec.update(self.evaluate())
            # wall time depends on what else shares the CPUs; this process's CPU time is the cost of the run
            rec["time_s"], rec["cpu_s"] = time.time() - t_start, time.process_time() - cpu_start
            if self.rank == 0:
                self.log_metrics.log(rec)
            if self.step % tr.checkpoint_every == 0 or done():
                self.save()
            held_out = rec.get("eval_accuracy", held_out)
            bar.set_postfix(postfix(rec, held_out), refresh=False)
            bar.update(1)
        bar.close()
        records = read_metrics(self.log_metrics.path) if self.rank == 0 else []
        if self.rank == 0 and tr.plot and not have("matplotlib"):
            print(f"train.plot: curves.png skipped: it {PLOT_HINT}")
        elif self.rank == 0 and tr.plot:
            plot_metrics(records, self.out / "curves.png", f"{cfg.name} ({cfg.algo.name}, seed {cfg.seed})")
        return records


def _worker(rank: int, world: int, cfg: RLConfig, resume: bool) -> None:
    set_threads(cfg.train.threads, world)
    Trainer(cfg, rank, world, resume).run()


def train(cfg: RLConfig, resume: bool = False, timeout_s: float = 600.0) -> list[dict]:
    """Run the configured training on cfg.train.nproc ranks (distributed.launch); returns the metrics records."""
    launch(_worker, cfg.train.nproc, cfg, resume, timeout_s=timeout_s, backend=cfg.train.backend)
    return read_metrics(Path(cfg.train.out) / "metrics.jsonl")
