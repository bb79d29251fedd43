"""meshplan: a declarative compiler for MoE parallelism plans (trace -> plan -> schedule -> run)."""
from .api import CompiledModel, compile

__all__ = ["CompiledModel", "compile"]
