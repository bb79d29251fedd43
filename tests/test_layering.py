"""Import rules, read from the source with `ast` (nothing is imported to check them).

- `meshplan/ir/` is what every stage shares: it imports nothing of meshplan above it (only `ir` itself and the
  `inputs`/`resources` helpers for reading files); meshplan's own blocks register as leaves from `models/leaves.py`.
- Only `meshplan/hf/` imports transformers (the optional `meshplan[hf]` extra), and only inside functions
  outside it would be a bug too: the core never does.
Mutation tried: putting `from ..models import moe_transformer` back at the top of ir/ops.py fails the first test.
"""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "meshplan"


def _imports(path: Path) -> list[tuple[str, int]]:
    """(absolute module name, line) of every import in the file, relative ones resolved."""
    rel = path.relative_to(PKG.parent).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                out.append((".".join(base + ([node.module] if node.module else [])), node.lineno))
            else:
                out.append((node.module or "", node.lineno))
    return out


def test_ir_imports_nothing_above_it():
    allowed = ("meshplan.ir", "meshplan.inputs", "meshplan.resources")
    bad = [f"{p.relative_to(PKG.parent)}:{line} imports {mod}"
           for p in sorted((PKG / "ir").rglob("*.py")) for mod, line in _imports(p)
           if (mod == "meshplan" or mod.startswith("meshplan.")) and not mod.startswith(allowed)]
    assert bad == []


def test_only_the_hf_package_imports_transformers():
    bad = [f"{p.relative_to(PKG.parent)}:{line}" for p in sorted(PKG.rglob("*.py"))
           if "hf" not in p.relative_to(PKG).parts[:1]
           for mod, line in _imports(p) if mod == "transformers" or mod.startswith("transformers.")]
    assert bad == []


def test_file_helpers_are_leaves():
    """The file-reading helpers the IR may use import nothing of meshplan but each other."""
    for name in ("inputs.py", "resources.py"):
        assert [m for m, _ in _imports(PKG / name) if m.startswith("meshplan")
                and m not in ("meshplan.inputs", "meshplan.resources")] == [], name


def _violations(package: str, forbidden: tuple[str, ...]) -> list[str]:
    """Imports in meshplan/<package>/ of any meshplan package named in `forbidden` (lazy imports included)."""
    banned = tuple(f"meshplan.{f}" for f in forbidden)
    return [f"{p.relative_to(PKG.parent)}:{line} imports {mod}"
            for p in sorted((PKG / package).rglob("*.py")) for mod, line in _imports(p)
            if any(mod == b or mod.startswith(b + ".") for b in banned)]


def test_planner_imports_no_later_stage_and_no_measurement():
    """The planner reads YAML (clusters, error_model.yaml) that measure/ writes; it never runs what it plans, and
    it prices the IR, not the reference model (its config errors derive from inputs.ConfigError, not models')."""
    assert _violations("planner", ("runtime", "codegen", "kernels", "measure", "models")) == []


def test_codegen_imports_no_runtime():
    """Emitted modules name runtime functions in their source text; codegen itself does not import the runtime."""
    assert _violations("codegen", ("runtime", "measure")) == []


def test_runtime_imports_no_planner_and_no_measurement():
    assert _violations("runtime", ("planner", "measure")) == []


def test_kernels_import_nothing_of_meshplan():
    bad = [f"{p.relative_to(PKG.parent)}:{line} imports {mod}"
           for p in sorted((PKG / "kernels").rglob("*.py")) for mod, line in _imports(p)
           if (mod == "meshplan" or mod.startswith("meshplan.")) and not mod.startswith("meshplan.kernels")]
    assert bad == []
