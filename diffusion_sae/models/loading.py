"""Load a pipeline from a local folder, a hub id, or `tiny:<family>` (random-weight test pipelines)."""
from __future__ import annotations

import os
from pathlib import Path


class ModelLoadError(ValueError):
    """The model could not be loaded (one-line message)."""


def _import_project_components(folder: Path) -> None:
    """diffusers loads a component class from a non-diffusers library only once its module is imported;
    import the ones that belong to this project (e.g. the ShapesCanvas PixelShuffleVAE)."""
    import importlib
    import json

    index = folder / "model_index.json"
    if not index.is_file():
        return
    try:
        entries = json.loads(index.read_text())
    except ValueError:
        return
    for v in entries.values():
        if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and v[0].startswith("diffusion_sae"):
            importlib.import_module(v[0])


def load_pipeline(model: str, device: str | None = None):
    import torch

    if model.startswith("tiny:"):
        from .tiny import FAMILIES, build_tiny_pipeline

        fam = model.split(":", 1)[1]
        if fam not in FAMILIES:
            raise ModelLoadError(f"unknown tiny model {model!r}; choose tiny:{', tiny:'.join(FAMILIES)}")
        pipe = build_tiny_pipeline(fam)
    else:
        from diffusers import DiffusionPipeline

        path = Path(model).expanduser()
        local = path.exists()
        looks_like_hub_id = model.count("/") == 1 and not model.startswith((".", "/", "~")) and os.sep not in model.replace("/", "", 1)
        if not local and not looks_like_hub_id:
            raise ModelLoadError(f"model {model!r}: no such folder")
        if local:
            _import_project_components(path)
        try:
            pipe = DiffusionPipeline.from_pretrained(str(path) if local else model, torch_dtype=torch.float32,
                                                     local_files_only=local or os.environ.get("HF_HUB_OFFLINE") == "1")
        except Exception as e:  # diffusers raises OSError/ValueError/EnvironmentError variants
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            where = "folder" if local else "hub id (not cached locally, or offline)"
            raise ModelLoadError(f"cannot load a diffusers pipeline from {where} {model!r}: {first}") from None
        pipe.set_progress_bar_config(disable=True)
    if device:
        pipe.to(device)
    return pipe
