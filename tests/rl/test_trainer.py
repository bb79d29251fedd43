"""The trainer end to end on tiny settings: bit-identical resume, checkpoints, metrics, value-pretraining
targets, the CLI, and data-parallel processes through the runtime.

The task is 1-digit addition after 60 warm-up steps (~1 s): the policy answers some prompts right (held-out
accuracy 0.375), so rewards, advantages and DAPO's kept groups are not all zero."""
import json
import shutil

import pytest
import torch
import yaml

from meshplan.rl import checkpoint as ckpt_io
from meshplan.rl.cli import main
from meshplan.rl.config import config_from_dict
from meshplan.rl.distributed import one_rank_world
from meshplan.rl.metrics import TIMING_KEYS, read_metrics
from meshplan.rl.trainer import Trainer, train, warmup_cache_path


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One warm-up per world size for the whole module (the cache key includes the settings and the world)."""
    return str(tmp_path_factory.mktemp("warmup"))


def tiny(out, preset="vapo", cache=None, temperature=1.0, **train_over):
    d = {"name": "t", "seed": 0, "model": "tiny",
         "task": {"max_digits": 1, "eval_size": 8},
         "warmup": {"steps": 60, "batch_size": 32, "cache": cache},
         "rollout": {"prompts_per_step": 2, "samples_per_prompt": 4, "temperature": temperature},
         "algo": {"preset": preset, **({"value_pretrain_steps": 2} if preset in ("vapo", "ppo") else {})},
         "train": {"steps": 4, "eval_every": 2, "checkpoint_every": 2, "out": str(out), "threads": 1,
                   "plot": False, "backend": "gloo", **train_over}}  # CPU ranks even where a GPU is
    return d


def _untimed(records):
    """Without wall-clock fields and the warm-up record (which says whether the weights came from the cache)."""
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records if r["phase"] != "warmup"]


@pytest.mark.parametrize("preset", ["vapo", "dapo"])
def test_resume_is_bit_identical(tmp_path, preset, cache):
    """Mutation (benchmarks/mutations.py resume-no-optim): the DCP load skipping the AdamW state: fails."""
    straight = train(config_from_dict(tiny(tmp_path / "a", preset, cache)))
    train(config_from_dict(tiny(tmp_path / "b", preset, cache, steps=2)))
    resumed = train(config_from_dict(tiny(tmp_path / "b", preset, cache)), resume=True)
    assert _untimed(straight) == _untimed(resumed)
    rl = [r for r in straight if r["phase"] == "rl" and r["step"] > 0]
    assert any(r["reward"] > 0 for r in rl), "no correct sample: the resume would only replay zero advantages"
    # a policy update happened both before and after the resume (DAPO: a mixed group survived dynamic sampling)
    trained = [r["trained"] > 0 and "pg_loss" in r for r in rl]
    assert any(trained[:2]) and any(trained[2:]), trained
    da, db = ckpt_io.latest_step(tmp_path / "a"), ckpt_io.latest_step(tmp_path / "b")
    a, b = ckpt_io.load(da / "trainer.pt"), ckpt_io.load(db / "trainer.pt")
    assert a["step"] == b["step"] == 4 and a["samples"] == b["samples"]
    for model in ("actor", "critic") if preset == "vapo" else ("actor",):
        wa, wb = ckpt_io.full_weights(da, model), ckpt_io.full_weights(db, model)  # weights and AdamW state
        assert wa.keys() == wb.keys() and any(k.startswith("optim.") and k.endswith("exp_avg") for k in wa)
        for k in wa:
            assert torch.equal(torch.as_tensor(wa[k]), torch.as_tensor(wb[k])), f"{model}.{k} differs after resume"
    assert a["sampler"] == b["sampler"]
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])


def test_checkpoint_metrics_and_plot(tmp_path, cache):
    records = train(config_from_dict(tiny(tmp_path, "ppo", cache, steps=2, plot=True)))
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["checkpoints", "curves.png", "metrics.jsonl"]
    # value pretraining saved step 0, checkpoint_every=2 step 2; no temporary directory is left
    steps = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert steps == ["step_000000", "step_000002"], steps
    last = tmp_path / "checkpoints" / "step_000002"
    assert sorted(p.name for p in last.iterdir()) == ["actor", "critic", "trainer.pt"]
    assert (last / "actor" / "step_000002" / ".metadata").is_file()  # DCP: one file per rank plus metadata
    state = ckpt_io.load(last / "trainer.pt")
    assert {"rng", "sampler", "step", "samples", "world"} <= set(state) and state["step"] == 2
    assert set(state["rng"][0]) == {"torch", "python", "numpy"}
    full = ckpt_io.full_weights(last, "critic")
    assert full["model.output.weight"].shape[0] == 1 and float(full["optim.output.weight.step"]) > 0
    rl = [r for r in records if r["phase"] == "rl" and r["step"] > 0]
    for key in ("reward", "response_len", "value_loss", "clip_frac", "entropy", "tokens_per_s", "eval_accuracy"):
        assert key in rl[-1], key
    assert [r["step"] for r in rl] == [1, 2] and rl[-1]["samples"] == 2 * 8
    assert records[0]["phase"] == "warmup" and "eval_accuracy" in records[1]


def _answer_is_right(text: str) -> bool:
    """'3+4=' + '4+3+0=07:7' -> True, from the characters alone (not the task's scorer): the text after the
    response's last ':' is the sum (tasks.py: only the answer after ':' is rewarded)."""
    prompt, response = text.split("=", 1)
    a, b = (int(x) for x in prompt.split("+"))
    return ":" in response and response.rsplit(":", 1)[1] == str(a + b)


def test_value_pretraining_fits_monte_carlo_returns(tmp_path, monkeypatch, cache):
    """The critic's targets, derived here from the decoded rollouts: gamma = 1, the reward (1 right, 0 wrong) on
    the last response token, lambda_critic = 1, so every response token's target is its episode's reward.
    Mutations tried (benchmarks/mutations.py): gae-sign, the sign of the lambda term in advantages.gae flipped:
    fails; reward-flip, score() rewarding wrong answers (reward(not c)): fails."""
    cfg = config_from_dict(tiny(tmp_path, "vapo", cache, steps=0))
    seen = []
    original = Trainer._update_critic

    def spy(self, ro, returns, old_values):
        seen.append((ro, returns, self.task.tokenizer))
        return original(self, ro, returns, old_values)

    monkeypatch.setattr(Trainer, "_update_critic", spy)
    with one_rank_world(60, "gloo"):  # the engines are compiled models: they need a process group
        trainer = Trainer(cfg)
        policy_before = trainer.actor.full_state_dict()
        trainer.run()
        after = trainer.actor.full_state_dict()
    assert len(seen) == 2  # value_pretrain_steps, and no RL step
    n_right = 0
    for ro, returns, tok in seen:
        for i in range(len(ro)):
            plen, rlen = int(ro.prompt_lens[i]), int(ro.response_lens[i])
            text = tok.decode(ro.tokens[i, 1:plen]) + tok.decode(ro.tokens[i, plen: plen + rlen])
            right = _answer_is_right(text)
            n_right += right
            want = torch.zeros(returns.shape[1])
            want[plen - 1: plen - 1 + rlen] = float(right)  # action t emits token t + 1
            assert torch.equal(returns[i], want), (text, returns[i])
    assert 0 < n_right < sum(len(ro) for ro, _, _ in seen)  # some right, some wrong
    # the policy is fixed during value pretraining
    assert all(torch.equal(policy_before[k], after[k]) for k in after)


def test_cli_train(tmp_path, capsys):
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(tiny(tmp_path / "ignored", "grpo")))
    assert main(["train", str(path), "--steps", "1", "--out", str(tmp_path / "run")]) == 0
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert records[-1]["step"] == 1 and "held-out accuracy" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({"algo": {"eps_hgh": 1}}))
    assert main(["train", str(bad)]) == 2
    assert "rl.algo.eps_hgh: unknown field" in capsys.readouterr().err


_EXACT = ("reward", "accuracy", "response_len", "truncated", "generated", "trained", "eval_accuracy",
          "eval_response_len", "samples", "step", "phase")


def test_cli_two_model_parallel_processes_match_one_and_resume(tmp_path, cache, capfd):
    """`meshplan train --nproc 2` under a model-parallel plan (mesh dp=1 x mp=2: tensor-parallel attention,
    expert-parallel MoE, for the policy and the critic) equals `meshplan train` on one process over 4 VAPO steps,
    the run of 2 stopped after 2 steps and resumed at world 2 from its DCP checkpoint; the world-2 checkpoint then
    resumes at world 1 (resharded). Both start from the same warmed-up weights (the 1-process cache entry copied:
    60 warm-up AdamW steps amplify the last-bit differences of another reduction order past greedy ties) and decode
    greedily (each rank samples its prompts with its own generator, so sampled runs differ by world).
    Mutations (benchmarks/mutations.py): clip-copies, drop-grad-reduce: fail."""
    one_cfg = tiny(tmp_path / "ignored", "vapo", cache, temperature=0.0)
    two_cfg = {**one_cfg, "plan": {"mesh": "dp=1,mp=2", "strategies": "attention=tp,moe=ep"}}
    paths = {}
    for name, d in (("one", one_cfg), ("two", two_cfg)):
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(d))
    assert main(["train", str(paths["one"]), "--out", str(tmp_path / "one")]) == 0
    src = warmup_cache_path(config_from_dict(one_cfg), 1)
    shutil.copy(src, warmup_cache_path(config_from_dict(two_cfg), 2))
    capfd.readouterr()
    two = ["train", str(paths["two"]), "--nproc", "2", "--out", str(tmp_path / "two")]
    assert main(two + ["--steps", "2"]) == 0
    assert main(two + ["--resume"]) == 0
    out, err = capfd.readouterr()
    assert "actor: plan for tiny on mesh (dp=1, mp=2)" in out and "ep: 2" in out and "tp: 2" in out, out
    assert "vloss=" in err and "len=" in err and "acc=" in err  # the progress bar, from rank 0
    one, two = (_untimed(read_metrics(tmp_path / n / "metrics.jsonl")) for n in ("one", "two"))
    assert [r["phase"] for r in one] == [r["phase"] for r in two] and len([r for r in one if r["step"]]) == 4
    assert any(r.get("reward", 0) > 0 for r in one)
    for a, b in zip(one, two):
        assert {k: a[k] for k in a if k in _EXACT} == {k: b[k] for k in b if k in _EXACT}
        for k in set(a) - set(_EXACT):
            assert b[k] == pytest.approx(a[k], rel=1e-3, abs=1e-5), (a["phase"], a["step"], k)
    state = ckpt_io.load(ckpt_io.latest_step(tmp_path / "two") / "trainer.pt")
    assert state["world"] == 2 and state["step"] == 4 and len(state["rng"]) == 2
    # the world-2 TP/EP checkpoint resumes on one rank under its default plan: DCP reshards every parameter
    saved = ckpt_io.full_weights(ckpt_io.latest_step(tmp_path / "two"), "critic")
    with one_rank_world(60, "gloo"):
        one_rank = Trainer(config_from_dict({**two_cfg, "plan": {}, "train": {**two_cfg["train"],
                                                                              "out": str(tmp_path / "two")}}),
                           resume=True)
        loaded = one_rank.critic.full_state_dict()
    assert one_rank.step == 4 and one_rank.samples == state["samples"]
    assert all(torch.equal(v, saved[f"model.{k}"]) for k, v in loaded.items() if f"model.{k}" in saved)
    assert {f"model.{n}" for n, _ in one_rank.critic.pm.named_parameters()} <= set(saved)
    assert "resuming on 1" in capfd.readouterr().out
