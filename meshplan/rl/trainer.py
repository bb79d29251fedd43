"""The RL trainer: warm-up, value pretraining, then rollout -> advantages -> policy/critic updates, with eval,
JSONL metrics, atomic checkpoints, bit-identical resume and a PNG of the curves.

The policy and the value model train through Engines (engine.py), i.e. through meshplan.runtime.ParallelModel.
Rollouts decode with the KV cache on a plain copy of the policy's weights, synced from the engine every step.
Randomness that shapes a step (sampling, minibatch order) comes from generators seeded by (seed, phase, step,
rank), and the prompt stream's state is checkpointed, so a resumed run repeats the straight run exactly.
"""
from __future__ import annotations

import hashlib
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
from .distributed import all_gather_objects, barrier, launch, set_threads
from .engine import build_engine, sync_rollout_model
from .losses import clipped_pg_loss, entropy, positive_lm_loss, token_logprobs, value_loss
from .metrics import MetricsLog, plot_metrics, read_metrics
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


class Trainer:
    def __init__(self, cfg: RLConfig, rank: int = 0, world: int = 1, resume: bool = False):
        self.cfg, self.rank, self.world = cfg, rank, world
        self.out = Path(cfg.train.out)
        self.ckpt_path = self.out / "checkpoint.pt"
        self.task = build_task(cfg.task)
        self.model_cfg = load_config(cfg.model)
        longest = self.task.max_response_len
        self.max_new = cfg.rollout.max_new_tokens or longest + longest // 4
        self._check_sizes()
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)

        state = ckpt_io.load(self.ckpt_path) if resume and self.ckpt_path.exists() else None
        if resume and state is None and rank == 0:
            print(f"--resume: no checkpoint at {self.ckpt_path}; starting from scratch")
        self.log_metrics = MetricsLog(self.out / "metrics.jsonl", state["step"] if state else None) \
            if rank == 0 else None
        policy = build_model(self.model_cfg, "lm", seed=cfg.seed)
        policy.load_state_dict(state["actor"] if state else self._warmed_up_weights())
        o = cfg.optim
        self.actor = build_engine(policy, o.actor_lr, o.betas, o.weight_decay, o.grad_clip, world)
        self.critic = None
        if cfg.algo.critic:
            value = build_model(self.model_cfg, "value", seed=cfg.seed + 1)
            # the critic starts from the warmed-up policy's trunk (as verl/OpenRLHF init it from the SFT model)
            # with a fresh scalar head; value pretraining then fits it to the initial policy's returns
            trunk = {k: v for k, v in policy.state_dict().items() if not k.startswith("output.")}
            value.load_state_dict(state["critic"] if state else trunk, strict=state is not None)
            self.critic = build_engine(value, o.critic_lr, o.betas, o.weight_decay, o.grad_clip, world)
        self.rollout_model = build_model(self.model_cfg, "lm", seed=cfg.seed)  # weights synced before each use
        self.sampler = PromptSampler(self.task, derived_seed(cfg.seed, "prompts"))
        self.step, self.samples, self.vp_done, self.vp_samples = 0, 0, 0, 0
        if state:
            self._restore(state)

    def _check_sizes(self) -> None:
        check_sizes(self.model_cfg, self.task, self.max_new)

    # ---- warm-up ------------------------------------------------------------------------------------------
    def _warmed_up_weights(self) -> dict:
        cfg, wc = self.cfg, self.cfg.warmup
        seed = cfg.seed if wc.seed < 0 else wc.seed
        policy = build_model(self.model_cfg, "lm", seed=seed)
        if wc.steps == 0:
            return policy.state_dict()
        # the world size changes the data-parallel reduction order, hence the last bits of the weights
        key = cache_key(self.model_cfg.to_dict(), vars(cfg.task), vars(wc), seed) + f"-w{self.world}"
        cache = Path(wc.cache) / f"warmup-{key}.pt" if wc.cache else None
        if cache is not None and cache.exists():
            if self.rank == 0:
                self.log_metrics.log({"phase": "warmup", "step": 0, "warmup_steps": wc.steps, "cached": str(cache)})
            return ckpt_io.load(cache)["weights"]
        engine = build_engine(policy, wc.lr, cfg.optim.betas, 0.0, cfg.optim.grad_clip, self.world)
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
        state = {
            "step": self.step, "samples": self.samples, "vp_done": self.vp_done, "vp_samples": self.vp_samples,
            "config": self.cfg.to_dict(), "world": self.world,
            "actor": self.actor.full_state_dict(),
            "critic": self.critic.full_state_dict() if self.critic else None,
            "actor_opt": all_gather_objects(self.actor.optimizer_state_dict()),
            "critic_opt": all_gather_objects(self.critic.optimizer_state_dict()) if self.critic else None,
            "rng": all_gather_objects(ckpt_io.rng_state()),
            "sampler": self.sampler.state_dict(),
        }
        if self.rank == 0:
            ckpt_io.save_atomic(state, self.ckpt_path)
        barrier()

    def _restore(self, state: dict) -> None:
        if state["world"] != self.world:
            raise RLConfigError(f"--resume: checkpoint {self.ckpt_path} was written by {state['world']} processes; "
                                f"resume it with --nproc {state['world']}, not {self.world}")
        self.step, self.samples = state["step"], state["samples"]
        self.vp_done, self.vp_samples = state["vp_done"], state["vp_samples"]
        self.actor.load_optimizer_state_dict(state["actor_opt"][self.rank])
        if self.critic:
            self.critic.load_optimizer_state_dict(state["critic_opt"][self.rank])
        ckpt_io.set_rng_state(state["rng"][self.rank])
        self.sampler.load_state_dict(state["sampler"])

    # ---- batches ------------------------------------------------------------------------------------------
    def _collect(self, phase: str, step: int, round_: int) -> ScoredBatch:
        r = self.cfg.rollout
        problems = self.sampler.draw(r.prompts_per_step)
        return collect(self.rollout_model, self.task, problems, r.samples_per_prompt, self.max_new, r.temperature,
                       r.top_p, self.cfg.task.wrong_reward, generator(self.cfg.seed, phase, step, round_, self.rank))

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

    def _rows(self, idx: torch.Tensor, tokens: torch.Tensor, *per_token: torch.Tensor, lens: torch.Tensor):
        """The rows idx, cut to their longest sequence and padded with empty rows to a multiple of the world size
        (the data-parallel plan splits the batch evenly); padding rows are all PAD with an all-false mask."""
        t = int(lens[idx].max())
        pad = (-len(idx)) % self.world
        out = [tokens[idx, :t]] + [x[idx, : t - 1] if x.dim() == 2 else x[idx] for x in per_token]
        if pad:
            out = [torch.cat([x, torch.full((pad,) + x.shape[1:], self.task.tokenizer.PAD if i == 0 else 0,
                                            dtype=x.dtype)]) for i, x in enumerate(out)]
        return out

    @torch.no_grad()
    def _values(self, ro) -> torch.Tensor:
        """The critic's V(s_t) for every action position: output at position t (it has seen tokens[:t+1])."""
        values = torch.zeros(ro.mask.shape)
        lens = ro.prompt_lens + ro.response_lens
        for idx in torch.arange(len(ro)).chunk(self.cfg.optim.minibatches):
            (tokens,) = self._rows(idx, ro.tokens, lens=lens)
            v = self.critic(tokens)[: len(idx), :-1].float()
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
        sync_rollout_model(self.actor, self.rollout_model)
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
        sync_rollout_model(self.actor, self.rollout_model)
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
        sync_rollout_model(self.actor, self.rollout_model)
        return evaluate(self.rollout_model, self.task, self.max_new)

    def run(self) -> list[dict]:
        cfg, tr = self.cfg, self.cfg.train
        t_start, cpu_start = time.time(), time.process_time()
        fresh = self.step == 0 and self.vp_done == 0
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
            bar.update(1)
            bar.set_postfix(reward=f"{rec['reward']:.2f}", acc=f"{rec['accuracy']:.2f}",
                            len=f"{rec['response_len']:.0f}", eval=rec.get("eval_accuracy", "-"),
                            vloss=f"{rec['value_loss']:.3f}" if "value_loss" in rec else "-")
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
    """Run the configured training in cfg.train.nproc gloo processes; returns the metrics records."""
    launch(_worker, cfg.train.nproc, cfg, resume, timeout_s=timeout_s)
    return read_metrics(Path(cfg.train.out) / "metrics.jsonl")
