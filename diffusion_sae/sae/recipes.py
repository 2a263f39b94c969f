"""The two papers' SAE recipes: collect activations, then train, with the published defaults.

- Concept Steerers (text encoder): one CLIP/T5 layer, every token position of every prompt,
  L = 4·d, per-token TopK k = 32, AuxK 1/32, batch 4096, Adam 4e-4 constant (SD 1.4: layer 9).
- SAeUron (denoiser block): a cross-attention block's output at every denoising step (conditional
  branch), L = 16·d, BatchTopK k = 32 with a calibrated inference threshold, AuxK 1/32, Adam 4e-4
  decaying linearly to 0.

Both return the trained SAE and save it in `out/<hookpoint>/` (cfg.json + sae.safetensors).
Collection and training are resumable: rerunning the same command continues where it stopped.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

from ..activations import ActivationStore
from ..activations.collect import CollectConfig, collect, store_dirname
from ..activations.prompts import PromptSet
from .model import SAEConfig, SAEError
from .train import SAETrainer, TrainConfig


@dataclass
class SAERecipe:
    expansion: int = 4
    k: int = 32
    batch_topk: bool = False
    auxk_alpha: float = 1 / 32
    batch_size: int = 4096
    lr: float = 4e-4
    lr_schedule: str = "constant"
    epochs: float = 1.0                # passes over the collected tokens
    seed: int = 0
    # collection
    steps: int = 50
    guidance: float = 7.5
    height: int | None = None
    width: int | None = None
    batch_prompts: int = 8
    dtype: str = "float16"


TEXT_DEFAULTS = SAERecipe(expansion=4, k=32, batch_topk=False, lr_schedule="constant")
BLOCK_DEFAULTS = SAERecipe(expansion=16, k=32, batch_topk=True, lr_schedule="linear_decay")


def text_layer_hookpoint(pipe, layer: int, encoder: str = "text_encoder") -> str:
    enc = getattr(pipe, encoder, None)
    if enc is None:
        raise SAEError(f"{type(pipe).__name__} has no {encoder}")
    if hasattr(getattr(enc, "encoder", None), "block"):  # T5
        return f"{encoder}.encoder.block.{layer}"
    return f"{encoder}.text_model.encoder.layers.{layer}"


def _cycle_batches(store: ActivationStore, batch_size: int, seed: int):
    for epoch in itertools.count():
        yield from store.batches(batch_size, shuffle=True, seed=seed + epoch, branch=None, drop_last=True)


def train_on_store(store: ActivationStore, hookpoint: str, out: str | Path, recipe: SAERecipe, progress: bool = True):
    tokens = store.num_tokens(branch=None)
    if not tokens:
        raise SAEError(f"{store.dir}: the activation store is empty")
    batch = min(recipe.batch_size, tokens)
    max_tokens = int(math.ceil(recipe.epochs * tokens / batch)) * batch
    d = store.width
    scfg = SAEConfig(d_in=d, num_latents=recipe.expansion * d, k=recipe.k, batch_topk=recipe.batch_topk,
                     hookpoint=hookpoint)
    tcfg = TrainConfig(lr=recipe.lr, lr_schedule=recipe.lr_schedule, auxk_alpha=recipe.auxk_alpha,
                       batch_size=batch, seed=recipe.seed, max_tokens=max_tokens, log_every=50,
                       ckpt_every=max(1, max_tokens // batch // 4))
    out = Path(out)
    # One run folder per hookpoint: several SAEs trained into one --out (the world rebuild trains twelve)
    # must not resume each other's finished run.
    trainer = SAETrainer(scfg, tcfg, run_dir=out / "runs" / store_dirname(hookpoint))
    sae = trainer.fit(_cycle_batches(store, batch, recipe.seed), progress=progress)
    sae.save_pretrained(out / store_dirname(hookpoint))
    sae.train_metrics = dict(trainer.metrics, tokens=trainer.tokens, steps=trainer.step)
    return sae


def train_text_sae(pipe, prompts: PromptSet, out: str | Path, layer: int = 9, encoder: str = "text_encoder",
                   recipe: SAERecipe = TEXT_DEFAULTS, model_id: str = "", progress=None, train_progress: bool = True):
    """Concept Steerers' SAE on one text-encoder layer (all token positions of every prompt)."""
    hookpoint = text_layer_hookpoint(pipe, layer, encoder)
    stores = collect(pipe, prompts, Path(out) / "activations",
                     CollectConfig(hookpoints=[hookpoint], dtype=recipe.dtype, model_id=model_id,
                                   batch_size=recipe.batch_prompts, text_only=True), progress=progress)
    store = next(iter(stores.values()))
    return train_on_store(store, hookpoint, out, recipe, progress=train_progress)


def train_block_sae(pipe, prompts: PromptSet, out: str | Path, hookpoint: str = "unet.up_blocks.1.attentions.1",
                    recipe: SAERecipe = BLOCK_DEFAULTS, model_id: str = "", progress=None, train_progress: bool = True):
    """SAeUron's SAE on a denoiser block's output, activations from every denoising step."""
    cfg = CollectConfig(hookpoints=[hookpoint], steps=recipe.steps, guidance=recipe.guidance, branches=("cond",),
                        batch_size=recipe.batch_prompts, dtype=recipe.dtype, height=recipe.height,
                        width=recipe.width, model_id=model_id)
    stores = collect(pipe, prompts, Path(out) / "activations", cfg, progress=progress)
    store = next(iter(stores.values()))
    return train_on_store(store, hookpoint, out, recipe, progress=train_progress)
