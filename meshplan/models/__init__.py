"""Reference models. `build_model(load_config("tiny"))` gives the tiny MoE transformer."""
from . import leaves  # noqa: F401  (registers the reference blocks as IR leaves)
from .config import ConfigError, ModelConfig, load_config
from .moe_transformer import (
    Attention,
    FeedForward,
    GroupedExperts,
    MoE,
    OutputHead,
    RMSNorm,
    Transformer,
    TransformerBlock,
    apply_rope,
    build_model,
    causal_attention,
    route,
)

__all__ = [
    "ConfigError", "ModelConfig", "load_config", "Attention", "FeedForward", "GroupedExperts", "MoE", "OutputHead",
    "RMSNorm",
    "Transformer", "TransformerBlock", "apply_rope", "build_model", "causal_attention", "route",
]
