"""RL for LLMs on meshplan: VAPO and its baselines (PPO, GRPO, DAPO) as configurations of one trainer.

Files: tasks (verifiable arithmetic + tokenizer), sampling (KV-cached rollouts), rollout (scoring, eval),
advantages / losses (the formulas), algorithms (presets and flags), engine (meshplan.compile-d forward/step),
planning (rl.plan), progress (the bar),
warmup, trainer, checkpoint, metrics, distributed, config, cli.
"""
from .algorithms import PRESETS, AlgoConfig
from .config import RLConfig, RLConfigError, config_from_dict, load_rl_config

__all__ = ["PRESETS", "AlgoConfig", "RLConfig", "RLConfigError", "config_from_dict", "load_rl_config"]
