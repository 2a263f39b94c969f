"""Where the shipped ShapesCanvas files live, and how they are loaded (always by local path)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"


def pipeline_dir() -> Path:
    return ASSETS / "shapescanvas"


def classifier_dir() -> Path:
    return ASSETS / "classifier"


def sae_dir() -> Path:
    return ASSETS / "saes"


def default_run_dir() -> Path:
    # Outside the work tree: a training run may span sessions on the same machine.
    return Path(os.environ.get("DIFFUSION_SAE_RUNS", Path.home() / ".cache" / "diffusion-sae" / "runs")) / "shapescanvas-unet"


def save_model_atomic(model, out: Path) -> None:
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def load_classifier(path: Path | None = None):
    from .classifier import ShapesClassifier

    path = Path(path or classifier_dir())
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no ShapesCanvas classifier at {path}: run `diffusion-sae world train-classifier`")
    m = ShapesClassifier.from_pretrained(path)
    m.eval()
    return m


def load_pipeline(path: Path | None = None):
    """The bundled StableDiffusionPipeline (or another local folder), offline, checked."""
    from diffusers import StableDiffusionPipeline

    from . import model as _registers_vae  # noqa: F401  diffusers needs PixelShuffleVAE's module imported

    path = Path(path or pipeline_dir())
    if not (path / "model_index.json").exists():
        raise FileNotFoundError(f"no pipeline at {path} (model_index.json missing): "
                                "run `diffusion-sae world train-unet --export PATH` or pass a model folder")
    pipe = StableDiffusionPipeline.from_pretrained(path, local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)
    # A tokenizer that silently failed to load comes back with a handful of tokens.
    if len(pipe.tokenizer) < 100:
        raise RuntimeError(f"tokenizer at {path}/tokenizer loaded with only {len(pipe.tokenizer)} tokens")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def training_evaluator(n_seeds: int = 1, steps: int = 25, guidance: float | None = None):
    """A callback for UNetTrainer.run: classifier agreement of the EMA weights, or None."""
    from .config import GUIDANCE

    guidance = GUIDANCE if guidance is None else guidance
    if not (classifier_dir() / "config.json").exists():
        return None
    clf = load_classifier()

    def evaluate(trainer) -> dict:
        from .evaluate import agreement, generate, grid_prompts

        pipe = trainer.pipeline(ema=True)
        pipe.set_progress_bar_config(disable=True)
        ps = grid_prompts(n_seeds)
        imgs = generate(pipe, ps.prompts, ps.seeds, steps=steps, guidance=guidance)
        return agreement(clf, imgs, ps)

    return evaluate
