"""From a model name on the command line to a model or a traced graph: the one loader every CLI uses.

A NAME or YAML path is a meshplan ModelConfig (models/); a path ending in `.json` is a Hugging Face config.json,
built through meshplan.hf on the meta device (only meshplan.hf imports transformers).
"""
from __future__ import annotations

# Anything past CPU size stays on the meta device, so a typo'd vocab_size or n_experts never allocates terabytes.
CPU_PARAM_LIMIT = 50_000_000


def load_model(config: str, head: str = "lm"):
    """The model of `config`: real weights on the CPU when small, on the meta device otherwise (trace, show)."""
    from .models import build_model, load_config

    if str(config).endswith(".json"):
        from .hf.config_json import meta_model

        return meta_model(config)
    cfg = load_config(config)
    # an estimate of the parameter count: embeddings, attention, every expert
    per_layer = 4 * cfg.dim * cfg.dim + 3 * cfg.dim * cfg.ffn_dim * (cfg.n_experts + cfg.n_shared_experts + 1)
    big = 2 * cfg.vocab_size * cfg.dim + cfg.n_layers * per_layer > CPU_PARAM_LIMIT
    return build_model(cfg, head=head, device="meta" if big else "cpu")


def load_graph(config: str, floor_check=None):
    """(IR graph, config) of `config`, traced on the meta device (planning needs shapes only: never allocate
    weights). floor_check(name, total_params) runs before tracing, so a model that cannot fit is told at once;
    a Hugging Face config.json's floor is checked by the search."""
    from .ir import trace
    from .models import build_model, load_config

    if str(config).endswith(".json"):
        from .hf.config_json import trace_config

        return trace_config(config)
    cfg = load_config(config)
    if floor_check is not None:
        floor_check(cfg.name, cfg.param_count())
    return trace(build_model(cfg, device="meta")), cfg
