"""ModelConfig: the named sizes of the reference MoE transformer, loadable from YAML."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ..inputs import ConfigError, check_bool, check_int, check_number, check_str, find_config, mapping, read_yaml
from ..resources import shipped


@dataclass
class ModelConfig:
    name: str = "tiny"
    vocab_size: int = 256
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_dim: int = 128  # hidden size of one expert (h_ffn)
    n_experts: int = 4
    top_k: int = 2
    n_shared_experts: int = 0  # shared experts every token passes through, each ffn_dim wide
    n_dense_layers: int = 0  # the first n layers use a dense SwiGLU FFN instead of MoE
    dense_ffn_dim: int = 0  # 0 -> ffn_dim
    norm_topk_prob: bool = True  # renormalise the top-k router weights to sum to 1 (Mixtral)
    capacity_factor: float | None = None  # None: dropless
    max_seq_len: int = 128
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def gqa_ratio(self) -> int:
        """m in docs/reference.md, "Notation and model shapes": query heads per KV head."""
        return self.n_heads // self.n_kv_heads

    @property
    def dense_hidden(self) -> int:
        return self.dense_ffn_dim or self.ffn_dim

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.n_dense_layers

    def param_count(self) -> int:
        """Parameters of the LM (moe_transformer.Transformer, head="lm") from the sizes alone, without building
        it: the planner's memory floor answers an impossible request before the model is built or traced."""
        d, hd = self.dim, self.head_dim
        attention = d * hd * (2 * self.n_heads + 2 * self.n_kv_heads) + 2 * d  # wq, wk, wv, wo + both norms
        moe = d * self.n_experts + 3 * d * self.ffn_dim * (self.n_experts + self.n_shared_experts)
        dense = 3 * d * self.dense_hidden
        n_moe = self.n_layers - self.n_dense_layers
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.n_layers * attention + n_moe * moe + self.n_dense_layers * dense + d + head

    def validate(self) -> None:
        """Types (a bool is a bool, an int an int), finite numbers, ranges and cross-field constraints; the first
        violation raises one ConfigError naming the field."""
        check_str("model.name", self.name, ConfigError)
        for f in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            check_int(f"model.{f}", getattr(self, f), ConfigError, lo=1)
        for f in ("n_experts", "top_k", "n_shared_experts", "n_dense_layers", "dense_ffn_dim"):
            check_int(f"model.{f}", getattr(self, f), ConfigError, lo=0)
        for f in ("norm_topk_prob", "tie_embeddings"):
            check_bool(f"model.{f}", getattr(self, f), ConfigError)
        if self.capacity_factor is not None:
            check_number("model.capacity_factor", self.capacity_factor, ConfigError, lo=0, lo_open=True)
        check_number("model.rope_theta", self.rope_theta, ConfigError, lo=0, lo_open=True)
        check_number("model.norm_eps", self.norm_eps, ConfigError, lo=0, hi=1, lo_open=True, hi_open=True)
        if self.dim % self.n_heads:
            raise ConfigError(f"model.dim: {self.dim} is not divisible by n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"model.dim: head_dim={self.head_dim} must be even for RoPE")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"model.n_kv_heads: {self.n_kv_heads} does not divide n_heads={self.n_heads}")
        if self.n_dense_layers > self.n_layers:
            raise ConfigError(f"model.n_dense_layers: {self.n_dense_layers} > n_layers={self.n_layers}")
        if self.n_dense_layers < self.n_layers:
            if self.n_experts < 1:
                raise ConfigError("model.n_experts: MoE layers need at least one expert")
            if not 1 <= self.top_k <= self.n_experts:
                raise ConfigError(f"model.top_k: must be in [1, n_experts={self.n_experts}], got {self.top_k}")

    # ---- YAML -------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """From a YAML mapping: unknown fields and missing required ones (REQUIRED) are errors, as are wrong
        types; the optional fields default (`defaulted(d)` lists them)."""
        d = mapping("model", d, ConfigError)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(map(str, set(d) - known))
        if unknown:
            raise ConfigError(f"model.{unknown[0]}: unknown field (known: {', '.join(sorted(known))})")
        for f in REQUIRED:
            if f not in d:
                raise ConfigError(f"model.{f}: missing (a model config needs {', '.join(REQUIRED)})")
        d = dict(d)
        for f in _FLOAT_FIELDS:
            # YAML 1.1 reads "1e-5" (no dot) as a string: accept any number spelled as one.
            if isinstance(d.get(f), str):
                try:
                    d[f] = float(d[f])
                except ValueError:
                    raise ConfigError(f"model.{f}: must be a number, got {d[f]!r}") from None
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ModelConfig":
        d = read_yaml(path, "model config", ConfigError)
        if isinstance(d, dict) and "model" in d and isinstance(d["model"], dict):
            d = d["model"]
        return cls.from_dict(d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_FLOAT_FIELDS = ("rope_theta", "norm_eps", "capacity_factor")
# a YAML model config must name these; the others default (a missing n_experts must not silently become 4)
REQUIRED = ("name", "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "n_experts", "top_k",
            "max_seq_len")

CONFIG_DIR = shipped("models")


def defaults_used(name_or_path: str | Path) -> dict:
    """The optional fields a model config file leaves out, with the defaults they get (--verbose output)."""
    d = read_yaml(find_config("models", name_or_path, "model config", ConfigError), "model config", ConfigError)
    if isinstance(d, dict) and isinstance(d.get("model"), dict):
        d = d["model"]
    return {f.name: f.default for f in dataclasses.fields(ModelConfig) if isinstance(d, dict) and f.name not in d}


def load_config(name_or_path: str | Path) -> ModelConfig:
    """A path to a YAML file, or the name of one in $XDG_CONFIG_HOME/meshplan/models/ or the shipped configs
    ("tiny", "internal-352b", ...)."""
    return ModelConfig.from_yaml(find_config("models", name_or_path, "model config", ConfigError))
