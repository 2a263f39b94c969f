"""The UI on the bundled ShapesCanvas model: its SAE folders, concept prompts and a ready Engine.

The app's one module that imports the benchmark world (diffusion_sae.world); app/engine.py stays
model-agnostic and the layering test (tests/test_layering.py) lists this module next to the CLI.
"""
from __future__ import annotations

from pathlib import Path

from ..world import assets, bundle
from .engine import Engine, find_dictionaries


def default_prompts(per_concept: int = 8) -> tuple[list[str], list[int]]:
    """The ShapesCanvas concept prompts of every kind (24 concepts x per_concept), one seed each."""
    prompts = [p for kind in bundle.KINDS for ps in bundle.concept_prompts(kind, per_concept).values() for p in ps]
    return prompts, list(range(len(prompts)))


def sae_folders(block_sae: Path | None = None, text_sae: Path | None = None) -> tuple[Path, Path | None]:
    """(block SAE folder, text SAE folder): the shipped ones where none is given (no text SAE when only
    a block SAE is given: the shipped text SAE belongs to the shipped model)."""
    block = Path(block_sae) if block_sae else assets.sae_dir() / bundle.BLOCK_HOOKPOINT
    text = Path(text_sae) if text_sae else (assets.sae_dir() / bundle.TEXT_HOOKPOINT if not block_sae else None)
    return block, text


def bundled_engine(**kw) -> Engine:
    """An Engine on the bundled pipeline with its shipped SAEs and concept dictionaries."""
    folder = assets.sae_dir() / bundle.BLOCK_HOOKPOINT
    if "stats_prompts" not in kw:
        kw["stats_prompts"], kw["stats_seeds"] = default_prompts(per_concept=4)
    return Engine(assets.load_pipeline(), bundle.load_block_sae(), bundle.load_text_sae(),
                  find_dictionaries(folder), roots=[assets.sae_dir(), assets.pipeline_dir()],
                  block_folder=folder, guidance=bundle.GUIDANCE, default_steps=bundle.STEPS, **kw)
