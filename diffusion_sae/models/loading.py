"""Load a pipeline from a local folder, a hub id, or `tiny:<family>` (random-weight test pipelines)."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import DiffusionSAEError


class ModelLoadError(DiffusionSAEError, ValueError):
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


def _class_name(model: str, local: bool) -> str | None:
    """The pipeline class named by model_index.json (read before loading, to pick the auto dtype)."""
    import json

    try:
        if local:
            return json.loads((Path(model).expanduser() / "model_index.json").read_text()).get("_class_name")
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.load_config(model, local_files_only=os.environ.get("HF_HUB_OFFLINE") == "1").get("_class_name")
    except Exception:  # unreadable / not cached: from_pretrained below reports it
        return None


def load_pipeline(model: str, device: str | None = None, dtype: str | None = None, offload: str | None = None):
    """A pipeline from a folder, hub id or tiny:<family>, placed by the device/dtype/offload options.

    device / dtype / offload: see models/devices.py (`auto` picks cuda:LOCAL_RANK → mps → cpu and the
    family's dtype). All three None keeps the weights in float32 on the CPU, as before.
    """
    import torch

    from .devices import family_of, place_pipeline, resolve_placement

    placing = any(v is not None for v in (device, dtype, offload))
    if model.startswith("tiny:"):
        from .tiny import FAMILIES, build_tiny_pipeline

        fam = model.split(":", 1)[1]
        if fam not in FAMILIES:
            raise ModelLoadError(f"unknown tiny model {model!r}; choose tiny:{', tiny:'.join(FAMILIES)}")
        if placing:  # check the options before building anything
            resolve_placement(device or "auto", dtype or "auto", offload or "none", family=fam)
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
        torch_dtype = torch.float32
        if placing:
            torch_dtype = resolve_placement(device or "auto", dtype or "auto", offload or "none",
                                            family=family_of(_class_name(model, local))).dtype
        try:
            pipe = DiffusionPipeline.from_pretrained(str(path) if local else model, torch_dtype=torch_dtype,
                                                     local_files_only=local or os.environ.get("HF_HUB_OFFLINE") == "1")
        except Exception as e:  # diffusers raises OSError/ValueError/EnvironmentError variants
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            where = "folder" if local else "hub id (not cached locally, or offline)"
            raise ModelLoadError(f"cannot load a diffusers pipeline from {where} {model!r}: {first}") from None
        pipe.set_progress_bar_config(disable=True)
    if placing:
        place_pipeline(pipe, device or "auto", dtype or "auto", offload or "none")
    return pipe
