"""`diffusion-sae train-sae`, `train-text-sae`, `train-block-sae`: SAE training and the two papers' recipes."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from .common import DEVICE_OPT, DTYPE_OPT, OFFLOAD_OPT, SHAPES, fail, load_model, progress_bar, prompt_set


def train_sae_cmd(activations: Optional[Path] = typer.Argument(None, help="Activation store folder (from `collect`) "
                                                                "or a folder of .safetensors/.pt/.npy tensors."),
                  synthetic: bool = typer.Option(False, "--synthetic", help="Train on a synthetic sparse-dictionary set."),
                  out: Optional[Path] = typer.Option(None, help="Run folder: checkpoints, metrics.jsonl, final SAE (resumed if present)."),
                  hookpoint: Optional[str] = None,
                  expansion: int = typer.Option(4, help="num_latents = expansion x d_in (unless --num-latents)."),
                  num_latents: Optional[int] = None, k: int = 32, batch_topk: bool = False,
                  normalize_input: bool = False, lr: Optional[float] = None, lr_schedule: str = "constant",
                  warmup_steps: int = 0, auxk_alpha: float = 1 / 32, k_aux: Optional[int] = None,
                  dead_tokens_threshold: int = 10_000_000, batch_size: int = 4096, grad_clip: float = 1.0,
                  seed: int = 0, log_every: int = 100, ckpt_every: int = 0, max_tokens: Optional[int] = None,
                  autocast: str = "none", b_dec_init: str = "geometric_median",
                  int8_screen: bool = typer.Option(True, help="CPU training: choose each token's 2k candidate "
                                                   "latents with an int8 product (AVX512-VNNI), then the exact top k."),
                  synthetic_d: int = typer.Option(64, help="--synthetic: input width."),
                  synthetic_atoms: int = 512, synthetic_active: int = 8,
                  synthetic_tokens: int = typer.Option(1_000_000, help="--synthetic: tokens to draw.")):
    """Train a TopK / BatchTopK SAE and print its metrics (FVU, explained variance, L0, dead fraction)."""
    from ..sae import SAEConfig, SAEError, SyntheticSparseData, TrainConfig, best_cosine, iter_activation_files

    if synthetic == (activations is not None):
        fail("give exactly one of an activation folder or --synthetic")
    try:
        data, atoms = None, None
        if synthetic:
            data = SyntheticSparseData(d=synthetic_d, num_atoms=synthetic_atoms, active=synthetic_active,
                                       num_tokens=synthetic_tokens, batch_size=batch_size, seed=seed)
            d_in, atoms = synthetic_d, data.atoms
        elif (activations / "manifest.json").is_file():
            from ..activations import ActivationStore, StoreError

            try:
                store = ActivationStore(activations)
                d_in = store.width
                data = store.batches(batch_size, shuffle=True, seed=seed)
            except StoreError as e:
                fail(str(e))
            if not d_in:
                fail(f"{activations}: the activation store is empty")
        else:
            probe = iter_activation_files(activations)
            d_in = next(probe).shape[-1]
            data = iter_activation_files(activations, d_in)
        scfg = SAEConfig(d_in=d_in, num_latents=num_latents or expansion * d_in, k=k, batch_topk=batch_topk,
                         normalize_input=normalize_input, hookpoint=hookpoint)
        tcfg = TrainConfig(lr=lr, lr_schedule=lr_schedule, warmup_steps=warmup_steps, auxk_alpha=auxk_alpha,
                           k_aux=k_aux, dead_tokens_threshold=dead_tokens_threshold, batch_size=batch_size,
                           grad_clip=grad_clip, seed=seed, log_every=log_every, ckpt_every=ckpt_every,
                           max_tokens=max_tokens, autocast=autocast, b_dec_init=b_dec_init,
                           int8_screen=int8_screen)
        from ..sae.train import SAETrainer

        trainer = SAETrainer(scfg, tcfg, run_dir=out)
        sae = trainer.fit(data, progress=sys.stdout.isatty())
    except SAEError as e:
        fail(str(e))
    m = trainer.metrics
    rows = [("tokens", f"{trainer.tokens:,}"), ("steps", str(trainer.step)), ("FVU", f"{m.get('fvu', float('nan')):.4f}"),
            ("explained variance", f"{m.get('explained_variance', float('nan')):.4f}"), ("L0", f"{m.get('l0', 0):.2f}"),
            ("dead fraction", f"{m.get('dead_fraction', 0):.4f}"), ("tokens/s", f"{m.get('tokens_per_s', 0):,.0f}")]
    if sae.cfg.batch_topk:
        rows.append(("inference threshold", f"{sae.cfg.threshold:.5f}"))
    if atoms is not None:
        rows.append(("mean best cosine to true atoms", f"{float(best_cosine(atoms, sae.W_dec.detach()).mean()):.4f}"))
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"SAE d_in={sae.cfg.d_in} L={sae.cfg.num_latents} k={sae.cfg.k}"
                        f"{' (BatchTopK)' if sae.cfg.batch_topk else ''}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for r in rows:
        table.add_row(*r)
    Console().print(table)
    if out is not None:
        typer.echo(f"saved {out / (sae.cfg.hookpoint or 'sae')}")



def train_text_sae_cmd(model: str = typer.Option(SHAPES, help="Pipeline folder, hub id, tiny:<family> or shapescanvas."),
                       layer: int = typer.Option(9, help="Text-encoder layer index (SD 1.4: 9)."),
                       encoder: str = typer.Option("text_encoder", help="text_encoder, text_encoder_2 (SDXL bigG / FLUX T5) or text_encoder_3."),
                       prompts: Path = typer.Option(..., help="Prompt file (text or CSV with a prompt column)."),
                       out: Path = typer.Option(..., help="Output folder (activations/, run/, <hookpoint>/)."),
                       expansion: int = 4, k: int = 32, batch_size: int = 4096, lr: float = 4e-4,
                       epochs: float = typer.Option(1.0, help="Passes over the collected tokens."),
                       seed: int = 0, batch_prompts: int = 32, device: str = DEVICE_OPT, dtype: str = DTYPE_OPT, offload: str = OFFLOAD_OPT):
    """Concept Steerers' recipe: collect one text-encoder layer over a prompt set, train a k-SAE."""
    from ..sae import SAEError
    from ..sae.recipes import TEXT_DEFAULTS, train_text_sae
    from dataclasses import replace

    if not epochs > 0 or epochs != epochs:
        fail(f"--epochs must be a positive number of passes, got {epochs}")
    pipe = load_model(model, device, dtype, offload)
    ps = prompt_set(prompts, None, seed)
    recipe = replace(TEXT_DEFAULTS, expansion=expansion, k=k, batch_size=batch_size, lr=lr, epochs=epochs,
                     seed=seed, batch_prompts=batch_prompts)
    try:
        with progress_bar() as p:
            task = p.add_task("collect", total=len(ps), info="")
            sae = train_text_sae(pipe, ps, out, layer=layer, encoder=encoder, recipe=recipe, model_id=model,
                                 progress=lambda d, n, info: p.update(task, completed=d, total=n, info=info),
                                 train_progress=sys.stdout.isatty())
    except (SAEError, ValueError) as e:
        fail(str(e).splitlines()[0])
    _print_recipe_result(sae, out)


def train_block_sae_cmd(model: str = typer.Option(SHAPES, help="Pipeline folder, hub id, tiny:<family> or shapescanvas."),
                        hookpoint: str = typer.Option("unet.up_blocks.1.attentions.1", help="Denoiser block."),
                        prompts: Path = typer.Option(..., help="Prompt file (text or CSV with prompt[, evaluation_seed])."),
                        out: Path = typer.Option(..., help="Output folder (activations/, run/, <hookpoint>/)."),
                        steps: int = 50, guidance: float = 7.5, expansion: int = 16, k: int = 32,
                        batch_topk: bool = True, batch_size: int = 4096, lr: float = 4e-4,
                        epochs: float = 1.0, seed: int = 0, batch_prompts: int = 16,
                        height: Optional[int] = None, width: Optional[int] = None, device: str = DEVICE_OPT, dtype: str = DTYPE_OPT, offload: str = OFFLOAD_OPT):
    """SAeUron's recipe: collect a block's output at every denoising step, train a BatchTopK SAE."""
    from dataclasses import replace

    from ..sae import SAEError
    from ..sae.recipes import BLOCK_DEFAULTS, train_block_sae

    if not epochs > 0 or epochs != epochs:
        fail(f"--epochs must be a positive number of passes, got {epochs}")
    pipe = load_model(model, device, dtype, offload)
    ps = prompt_set(prompts, None, seed)
    recipe = replace(BLOCK_DEFAULTS, expansion=expansion, k=k, batch_topk=batch_topk, batch_size=batch_size, lr=lr,
                     epochs=epochs, seed=seed, steps=steps, guidance=guidance, batch_prompts=batch_prompts,
                     height=height, width=width)
    try:
        with progress_bar() as p:
            task = p.add_task("collect", total=len(ps), info="")
            sae = train_block_sae(pipe, ps, out, hookpoint=hookpoint, recipe=recipe, model_id=model,
                                  progress=lambda d, n, info: p.update(task, completed=d, total=n, info=info),
                                  train_progress=sys.stdout.isatty())
    except (SAEError, ValueError) as e:
        fail(str(e).splitlines()[0])
    _print_recipe_result(sae, out)



def _print_recipe_result(sae, out: Path) -> None:
    m = getattr(sae, "train_metrics", {})
    typer.echo(f"saved {out / sae.cfg.hookpoint} (d={sae.cfg.d_in}, L={sae.cfg.num_latents}, k={sae.cfg.k}"
               f"{', BatchTopK threshold %.4f' % sae.cfg.threshold if sae.cfg.batch_topk else ''})")
    if m:
        typer.echo(f"trained on {m.get('tokens', 0):,} tokens ({m.get('steps', 0)} steps): FVU {m.get('fvu', float('nan')):.4f}, "
                   f"explained variance {m.get('explained_variance', float('nan')):.4f}, L0 {m.get('l0', float('nan')):.1f}, "
                   f"dead fraction {m.get('dead_fraction', float('nan')):.4f}")

