"""The layers of the library, as the README's Layout section draws them: a module imports from its
own layer or the ones below it, never above (function-local imports included)."""
import ast

from tests.scripts import ROOT

# bottom to top; the README's Layout section shows the same rows
LAYERS = [
    {"errors", "configs"},
    {"sharding", "distributed", "data"},
    {"models"},
    {"convert", "diffusion", "checkpoints"},
    {"scoring", "metrics"},
    {"calibration", "visualize", "exported"},
    {"detector", "evaluation"},
    {"train", "autoencoder"},
    {"cli"},
    {"commands"},
]
RANK = {part: i for i, layer in enumerate(LAYERS) for part in layer}


def _part(module: str) -> str | None:
    """The top-level part of diad_jax a dotted module name belongs to (None: the package's face)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "diad_jax" else None


def test_every_part_of_the_library_is_in_one_layer():
    parts = {p.stem if p.is_file() else p.name for p in (ROOT / "diad_jax").iterdir()
             if (p.suffix == ".py" or (p / "__init__.py").exists()) and p.name != "__init__.py"}
    assert parts == set(RANK), f"new or removed parts: {parts ^ set(RANK)} (add them to LAYERS and the README)"


def test_imports_run_one_way():
    wrong = []
    for path in sorted((ROOT / "diad_jax").rglob("*.py")):
        here = _part(".".join(path.relative_to(ROOT).with_suffix("").parts))
        if here not in RANK:  # diad_jax/__init__.py, the package's public face
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = ([f"diad_jax.{a.name}" for a in node.names] if node.module == "diad_jax"
                           else [node.module])
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                there = _part(target)
                if there in RANK and RANK[there] > RANK[here]:
                    wrong.append(f"{path.relative_to(ROOT)}:{node.lineno}: {here} imports {there}, a layer above it")
    assert not wrong, "\n".join(wrong)
