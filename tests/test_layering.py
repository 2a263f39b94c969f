"""The import graph follows the layering: models → activations → sae → concepts → interventions → eval,
the CLI and the UI on top; the ShapesCanvas world and its benchmark (eval shapes / tune / demo / attack)
beside the library, which never imports them.

Every `import` / `from … import` in diffusion_sae/ counts, function-level ones included (ast walk).
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "diffusion_sae"

# Library layers, lowest first: a module may import its own layer and the ones below.
LAYERS = ["base", "models", "activations", "sae", "concepts", "interventions", "eval"]
BASE = {"diffusion_sae.errors", "diffusion_sae.configs"}
# The benchmark on the bundled ShapesCanvas model: may import the library, never imported by it.
BENCHMARK = ("diffusion_sae.world", "diffusion_sae.eval.shapes", "diffusion_sae.eval.tune",
             "diffusion_sae.eval.demo", "diffusion_sae.eval.attack")
# On top of everything: the CLI, the front door (its names are strings resolved on use), the UI.
TOP = ("diffusion_sae.cli", "diffusion_sae.app", "diffusion_sae.__main__")
# Top-level modules that may reach into the benchmark world: the CLI modules that run it (world, the
# benchmark commands) or default to the bundled model and its SAEs (common: model loading; concepts, steer,
# unlearn: the shipped SAEs and dictionaries), and the UI's launcher for the bundled model
# (app/shapescanvas.py); the other CLI modules and the rest of app/ are model-agnostic.
TOP_USING_BENCHMARK = ("diffusion_sae.cli.common", "diffusion_sae.cli.world", "diffusion_sae.cli.benchmark",
                       "diffusion_sae.cli.concepts", "diffusion_sae.cli.steer", "diffusion_sae.cli.unlearn",
                       "diffusion_sae.app.shapescanvas")
# Edges against the order that stay for now, each with its reason.
ALLOWED = {
    # The real-architecture dry run (collect → train → dictionary → steer / unlearn on SD 1.5 shapes) lives
    # beside the architectures it builds; its imports are function-level and run only for `dry-run`.
    ("diffusion_sae.models.realscale", "diffusion_sae.activations"),
    ("diffusion_sae.models.realscale", "diffusion_sae.sae"),
    ("diffusion_sae.models.realscale", "diffusion_sae.concepts"),
    ("diffusion_sae.models.realscale", "diffusion_sae.interventions"),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_edges() -> set[tuple[str, str]]:
    """(importer, imported) for every diffusion_sae import, `from .x import y` resolved to the module y
    when y is a module and to x otherwise."""
    known = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    edges = set()
    for path in PACKAGE.rglob("*.py"):
        src = _module_name(path)
        package = src if path.name == "__init__.py" else src.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
            else:
                continue
            edges |= {(src, t) for t in targets if t == "diffusion_sae" or t.startswith("diffusion_sae.")}
    return edges


def _under(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def layer(module: str) -> str:
    """'benchmark', 'top', 'root' or a library layer name."""
    if _under(module, BENCHMARK):
        return "benchmark"
    if _under(module, TOP):
        return "top"
    if module == "diffusion_sae":
        return "root"
    if module in BASE:
        return "base"
    name = module.split(".")[1]
    assert name in LAYERS, f"{module} is in no layer: add its package to LAYERS, BENCHMARK or TOP"
    return name


def violation(src: str, dst: str) -> str | None:
    """Why the edge src -> dst is against the layering, or None."""
    if any(src == a and _under(dst, (b,)) for a, b in ALLOWED):
        return None
    ls, ld = layer(src), layer(dst)
    if ld == "root" and src != "diffusion_sae":
        return "imports the front door (diffusion_sae/__init__.py) from inside the package"
    if ls in LAYERS:
        if ld in ("benchmark", "top"):
            return f"library layer {ls} imports the {ld} module {dst}"
        if LAYERS.index(ld) > LAYERS.index(ls):
            return f"{ls} imports the higher layer {ld}"
    if ls == "benchmark" and ld == "top":
        return "the benchmark imports the CLI / UI"
    if ls == "top" and ld == "benchmark" and not _under(src, TOP_USING_BENCHMARK):
        return "a CLI / UI module not listed in TOP_USING_BENCHMARK imports the benchmark world"
    return None


def test_no_import_against_the_layering():
    bad = sorted(f"{s} -> {d}: {why}" for s, d in import_edges() if (why := violation(s, d)))
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_the_graph_walk_sees_function_level_and_relative_imports():
    edges = import_edges()
    # function-level, relative, `from ..pkg import module`: each must be seen or the check above is blind
    assert ("diffusion_sae.concepts.features", "diffusion_sae.models.text_layers") in edges
    assert ("diffusion_sae.app.shapescanvas", "diffusion_sae.world.assets") in edges
    assert ("diffusion_sae.interventions.ablate", "diffusion_sae.concepts.dictionary") in edges


def test_the_rules_reject_the_edges_issue_22_removed():
    # the two edges that existed before (concepts and the UI engine reaching into the world) and a
    # library module importing a benchmark eval module are all reported
    assert violation("diffusion_sae.concepts.features", "diffusion_sae.world.bundle")
    assert violation("diffusion_sae.app.engine", "diffusion_sae.world.assets")
    assert violation("diffusion_sae.interventions.steer", "diffusion_sae.eval.shapes")
    assert violation("diffusion_sae.models.hookpoints", "diffusion_sae.sae.model")
    assert violation("diffusion_sae.concepts.features", "diffusion_sae.interventions.steer")
    assert violation("diffusion_sae.eval.shapes", "diffusion_sae.world.config") is None
    assert violation("diffusion_sae.cli.steer", "diffusion_sae.world.bundle") is None
    assert violation("diffusion_sae.cli.collect", "diffusion_sae.world.bundle")
    assert violation("diffusion_sae.cli", "diffusion_sae.world.config")
    assert violation("diffusion_sae.sae.recipes", "diffusion_sae.activations.collect") is None
