"""Config attributes meshplan does not implement: each is a one-line compile-time error naming the attribute,
never a silent substitute. A check is (attribute, honoured(value) -> bool, what meshplan implements)."""
from __future__ import annotations

from typing import Any, Callable


class HFConfigError(ValueError):
    """An HF config attribute meshplan's blocks do not implement."""


Check = tuple[str, Callable[[Any], bool], str]

_ABSENT = object()

COMMON: tuple[Check, ...] = (
    ("hidden_act", lambda v: v in ("silu", _ABSENT), "SwiGLU with silu"),
    ("attention_dropout", lambda v: v in (0, 0.0, None, _ABSENT), "no attention dropout"),
    ("mlp_bias", lambda v: v in (False, None, _ABSENT), "bias-free MLPs"),
    ("pretraining_tp", lambda v: v in (1, None, _ABSENT), "pretraining_tp=1"),
    ("attn_logit_softcapping", lambda v: v in (None, _ABSENT), "no attention logit softcapping"),
    ("final_logit_softcapping", lambda v: v in (None, _ABSENT), "no final logit softcapping"),
    ("router_jitter_noise", lambda v: v in (0, 0.0, None, _ABSENT), "no router jitter"),
    ("clip_qkv", lambda v: v in (None, _ABSENT), "no q/k/v clipping"),
    ("layer_types", lambda v: v is _ABSENT or v is None or all(t == "full_attention" for t in v),
     "full causal attention in every layer"),
)


def _rope_type(config) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return params.get("rope_type", params.get("type", "default"))


def check_config(config, family: tuple[Check, ...] = ()) -> None:
    """Raise HFConfigError for the first attribute of `config` meshplan would not honour."""
    name = f"{config.model_type}.config"
    for attr, ok, honoured in COMMON + family:
        value = getattr(config, attr, _ABSENT)
        if not ok(value):
            raise HFConfigError(f"{name}.{attr}={value!r}: not supported (meshplan implements {honoured})")
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True):
        raise HFConfigError(f"{name}.sliding_window={window!r}: not supported (meshplan implements full causal "
                            f"attention; set use_sliding_window=False or sliding_window=None)")
    from .rope import STATIC_ROPE_TYPES

    rope = _rope_type(config)
    if rope not in STATIC_ROPE_TYPES:
        raise HFConfigError(f"{name}.rope_parameters.rope_type={rope!r}: not supported "
                            f"(supported: {', '.join(STATIC_ROPE_TYPES)})")
