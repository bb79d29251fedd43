"""benchmarks/rl_compare.py's bookkeeping on a 2-step budget, and the bootstrap CI it reports."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks import rl_compare  # noqa: E402
from benchmarks.rl_stats import bootstrap_ci, check_same_start, paired_table  # noqa: E402


def test_bootstrap_ci_matches_the_normal_interval():
    rng = np.random.default_rng(0)
    small, large = rng.normal(0.3, 0.1, 5), rng.normal(0.3, 0.1, 200)
    m, lo, hi = bootstrap_ci(small)
    assert lo < m < hi and m == pytest.approx(small.mean())
    m, lo, hi = bootstrap_ci(large)
    normal = 1.96 * large.std() / np.sqrt(len(large))  # the CLT interval a large sample's bootstrap approaches
    assert lo == pytest.approx(m - normal, abs=0.15 * normal) and hi == pytest.approx(m + normal, abs=0.15 * normal)
    assert bootstrap_ci([0.2, 0.2, 0.2]) == pytest.approx((0.2, 0.2, 0.2))
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_ci([])


def _config(algo: str) -> dict:
    return {"name": algo, "model": "tiny", "algo": {"preset": algo, **({"value_pretrain_steps": 2} if algo == "vapo"
                                                                      else {})},
            "task": {"name": "chain", "min_steps": 1, "max_steps": 3, "rules": 1, "eval_size": 8},
            "warmup": {"steps": 10, "batch_size": 8},
            "rollout": {"prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 24}}


def test_comparison_bookkeeping_on_a_two_step_budget(tmp_path):
    for algo in ("vapo", "grpo"):
        (tmp_path / f"{algo}-t.yaml").write_text(yaml.safe_dump(_config(algo)))
    out = tmp_path / "results"
    rl_compare.main(["--algos", "vapo,grpo", "--task", "t", "--seeds", "0,1", "--samples", "8", "--evals", "1",
                     "--jobs", "1", "--warmup-seed", "-1", "--configs", str(tmp_path), "--runs", str(tmp_path / "runs"),
                     "--out", str(out)])
    runs = json.loads((out / "rl_compare.json").read_text())
    assert sorted((r["algo"], r["seed"]) for r in runs) == [("grpo", 0), ("grpo", 1), ("vapo", 0), ("vapo", 1)]
    for r in runs:
        assert {"algo", "seed", "start", "final", "best", "samples", "pretrain_samples"} <= set(r)
        assert r["samples"] == 8 and r["steps"] == 2  # equal RL samples: 2 steps of 2 prompts x 2 samples
        assert r["pretrain_samples"] == (8 if r["algo"] == "vapo" else 0)  # 2 value-pretraining steps, apart
        assert r["best"] >= max(r["start"], r["final"]) and len(r["curve"]) == 2
        assert r["warmup"].startswith("warmup-")  # loaded from the seed's shared cache
    for seed in (0, 1):  # every algorithm of a seed starts from the same warmed-up policy
        a, b = (r for r in runs if r["seed"] == seed)
        assert a["warmup"] == b["warmup"] and a["start"] == b["start"]
    assert runs[0]["warmup"] != runs[2]["warmup"]  # --warmup-seed -1: one warm-up per seed
    md = (out / "rl_compare.md").read_text()
    assert "| vapo - grpo | 2 |" in md and (out / "rl_compare.png").stat().st_size > 0
    bad = [dict(runs[0], start=runs[0]["start"] + 0.5), runs[1]]
    with pytest.raises(AssertionError, match="different policies"):
        check_same_start(bad)
    assert "no ppo runs" in paired_table(runs, ["vapo", "grpo"], "ppo")


def test_set_overrides_every_run_with_the_loaders_checks():
    from meshplan.rl.config import RLConfigError, load_rl_config
    cfg = rl_compare.override(load_rl_config("configs/rl/grpo-chain.yaml"),
                              ["optim.actor_lr=3e-4", "task.wrong_reward=-1", "warmup.steps=300", "seed=4"])
    assert (cfg.optim.actor_lr, cfg.task.wrong_reward, cfg.warmup.steps, cfg.seed) == (3e-4, -1.0, 300, 4)
    for bad, msg in (("optim.actor_lrr=1", "rl.optim.actor_lrr: unknown field"),
                     ("optim.actor_lr=fast", "rl.optim.actor_lr: expected a number"),
                     ("nope.x=1", "rl.nope is not a config section"), ("optim.actor_lr", "expected SECTION.FIELD")):
        with pytest.raises(RLConfigError, match=msg):
            rl_compare.override(load_rl_config("configs/rl/grpo-chain.yaml"), [bad])
