"""meshplan: a declarative compiler for MoE parallelism plans (trace -> plan -> schedule -> run)."""
__version__ = "0.1.0"

from .api import CompiledModel, compile
from .runtime.verify import PlanVerificationError

__all__ = ["CompiledModel", "compile", "PlanVerificationError"]
