"""The package's layers: no module imports from a layer above its own (README, module map)."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "codicodec_flow"
CORE = ("rope", "streams", "cache", "model", "flow", "solvers", "generate", "checkpoint", "train", "export", "quantize", "packing", "graphs", "plan", "rollout", "distill")
LAYERS = [("errors", "util"), ("codec",), ("config", "latents"), ("data",), CORE, ("realtime",), ("evaluation",),
          ("commands",)]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def layer_of(parts: tuple[str, ...]) -> str:
    """The first package-level name of a module path inside codicodec_flow."""
    return parts[0].removesuffix(".py")


def internal_imports(path: Path) -> set[str]:
    """Top-level names inside the package that `path` imports (relative or absolute)."""
    here = path.relative_to(PACKAGE).parts[:-1]  # the module's sub-package
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # from ..x import y: resolve against this module's package
                base = here[: len(here) - (node.level - 1)]
                target = (*base, *(node.module.split(".") if node.module else ()))
                if not target:  # from . import x at the package root
                    target = tuple(a.name for a in node.names[:1])
            elif node.module and node.module.startswith("codicodec_flow"):
                target = tuple(node.module.split(".")[1:])
            else:
                continue
            if target:
                found.add(target[0])
    return found


def test_every_module_has_a_layer():
    names = {layer_of(p.relative_to(PACKAGE).parts) for p in PACKAGE.rglob("*.py")} - {"__init__", "__main__"}
    assert names <= set(RANK), f"modules outside every layer: {sorted(names - set(RANK))}"


def test_nothing_imports_upward():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        mine = layer_of(path.relative_to(PACKAGE).parts)
        if mine in ("__init__", "__main__"):  # the package's facade may gather from every layer
            continue
        for target in internal_imports(path) - {mine}:
            if RANK[target] > RANK[mine]:
                upward.append(f"{path.relative_to(PACKAGE)} ({mine}) imports {target}")
    assert not upward, "\n".join(upward)
