"""The public API is type-checked: `diffusion_sae/__init__.py`'s TYPE_CHECKING block names exactly the
lazily resolved `_EXPORTS`, and mypy accepts tests/typing/public_api.py (the README's `ds.*` use) against
the library's signatures (`make test` runs the same mypy command)."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MYPY = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), "tests/typing/public_api.py"]


def _type_checking_names() -> dict[str, str]:
    tree = ast.parse((ROOT / "diffusion_sae" / "__init__.py").read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", None) == "TYPE_CHECKING")
    out = {}
    for node in block.body:
        assert isinstance(node, ast.ImportFrom) and node.level == 1, ast.dump(node)
        for a in node.names:
            out[a.asname or a.name] = f"diffusion_sae.{node.module}:{a.name}"
    return out


def test_type_checking_block_matches_the_exports():
    import diffusion_sae

    assert _type_checking_names() == diffusion_sae._EXPORTS


def test_every_export_is_used_in_the_typed_example():
    import diffusion_sae

    used = {n.attr for n in ast.walk(ast.parse((ROOT / "tests/typing/public_api.py").read_text()))
            if isinstance(n, ast.Attribute) and getattr(n.value, "id", None) == "ds"}
    untyped = {"evaluate", "load_shapescanvas", "load_shapescanvas_classifier", "SHAPESCANVAS_OBJECTS",
               "SHAPESCANVAS_COLOURS", "build_concept_dictionary", "collect"}   # checked through the block only
    assert set(diffusion_sae._EXPORTS) - used <= untyped, set(diffusion_sae._EXPORTS) - used - untyped


def test_mypy_accepts_the_public_api_and_catches_a_misuse(tmp_path):
    if shutil.which("mypy", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("mypy is not installed (pip install -e '.[test]')")
    r = subprocess.run(MYPY, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    bad = tmp_path / "misuse.py"      # a wrong type for a typed field must be reported: the check can fail
    bad.write_text("import diffusion_sae as ds\nx: int = ds.SteeringConfig(concept='a').strength\n"
                   "ds.apply(object(), 3)\n")
    r = subprocess.run(MYPY[:-1] + [str(bad)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 1 and 'Argument 2 to "apply"' in r.stdout, r.stdout + r.stderr
