"""Names typed in the UI never reach files outside the configured model / SAE folders."""
from __future__ import annotations

import os

import pytest

from diffusion_sae.app.paths import PathError, resolve_inside


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "saes"
    (root / "block").mkdir(parents=True)
    (root / "block" / "concept_dictionary_style.json").write_text("{}")
    (tmp_path / "secret.json").write_text("{}")
    os.symlink(tmp_path / "secret.json", root / "block" / "leak.json")
    return root, tmp_path


def test_names_inside_resolve(tree):
    root, _ = tree
    p = resolve_inside([root], "block/concept_dictionary_style", ".json")
    assert p == (root / "block" / "concept_dictionary_style.json").resolve()
    assert resolve_inside([root / "block"], "concept_dictionary_style.json") == p


@pytest.mark.parametrize("name", [
    "../secret", "block/../../secret", str("/etc/passwd"), "~/secret", "C:\\secret", "block/leak\x00", "",
    "block/..", "%2e%2e/secret", "block\\..\\..\\secret",
])
def test_escapes_are_refused(tree, name):
    root, _ = tree
    with pytest.raises(PathError) as e:
        resolve_inside([root], name, ".json")
    assert "\n" not in str(e.value)


def test_symlink_out_of_the_folder_is_refused(tree):
    root, tmp = tree
    assert (root / "block" / "leak.json").is_file()      # the link exists and points at a real file
    with pytest.raises(PathError, match="outside"):
        resolve_inside([root], "block/leak", ".json")


def test_missing_file_is_one_line(tree):
    root, _ = tree
    with pytest.raises(PathError, match="no file"):
        resolve_inside([root], "block/nothing", ".json")


def test_engine_dictionary_field_is_confined():
    """The UI's dictionary field goes through the same check (bundled model)."""
    from diffusion_sae.app.shapescanvas import bundled_engine

    e = bundled_engine(stats_prompts=["a red circle"], stats_seeds=[0], stats_steps=2)
    assert e.use_dictionaries("unet.up_blocks.1.attentions.1/concept_dictionary_colour") == ["colour"]
    assert e.concept_names() == ["red", "green", "blue", "yellow", "purple", "orange"]
    for bad in ("../../../../etc/passwd", "/etc/hostname", "unet.up_blocks.1.attentions.1/../../../config"):
        with pytest.raises(PathError):
            e.use_dictionaries(bad)
    assert e.concept_names() == ["red", "green", "blue", "yellow", "purple", "orange"]   # unchanged
    assert sorted(e.use_dictionaries("all")) == ["colour", "object", "style"]
