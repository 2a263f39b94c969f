"""`diffusion-sae` command line: a thin shell over the Python API.

Heavy imports (torch, diffusers) happen inside commands so that `--help` stays fast.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Sparse autoencoders for text-to-image diffusion: train, find concepts, steer, unlearn, evaluate.")
world_app = typer.Typer(no_args_is_help=True, help="The bundled ShapesCanvas world: data, model, classifier.")
app.add_typer(world_app, name="world")


class UserError(Exception):
    """A bad input: printed as one line, exit code 2."""


def fail(msg: str) -> None:
    raise UserError(msg)


def _progress():
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn())


# ---------------------------------------------------------------------------------------------
# world
# ---------------------------------------------------------------------------------------------
@world_app.command("train-classifier")
def world_train_classifier(out: Path = typer.Option(None, help="Output folder (default: the shipped asset)."),
                           steps: int = 1000, batch_size: int = 128, lr: float = 2e-3, seed: int = 0):
    """Train the ShapesCanvas judge (object / style / colour CNN) on fresh procedural images."""
    from .world import assets
    from .world.classifier import ClassifierTrainConfig, accuracy, train_classifier

    out = out or assets.classifier_dir()
    cfg = ClassifierTrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    with _progress() as p:
        task = p.add_task("classifier", total=steps, info="")
        model, _ = train_classifier(cfg, progress=lambda s, n, loss, el: p.update(task, completed=s, info=f"loss {loss:.4f}"))
    acc = accuracy(model)
    assets.save_model_atomic(model, out)
    typer.echo(f"accuracy on 2000 fresh images: " + ", ".join(f"{k} {v:.4f}" for k, v in acc.items()))
    typer.echo(f"saved {out}")


@world_app.command("train-unet")
def world_train_unet(run_dir: Path = typer.Option(None, help="Run folder with state.pt (resumed if present)."),
                     until: Optional[int] = typer.Option(None, help="Stop at this step (default: the schedule's end)."),
                     max_minutes: Optional[float] = typer.Option(None, help="Stop after this many minutes (resumable)."),
                     steps: int = typer.Option(30_000, help="Schedule length for a new run."),
                     batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
                     threads: int = typer.Option(0, help="torch threads (0 = default)."),
                     export: Optional[Path] = typer.Option(None, help="Write the EMA pipeline here when done."),
                     eval_every: int = 2000):
    """Train (or resume) the ShapesCanvas UNet + text encoder. Kill it any time; rerun to resume."""
    from .world import assets
    from .world.train import UNetTrainConfig, UNetTrainer, export_pipeline

    run_dir = run_dir or assets.default_run_dir()
    cfg = None if (run_dir / "state.pt").exists() else UNetTrainConfig(
        steps=steps, batch_size=batch_size, lr=lr, seed=seed, threads=threads, eval_every=eval_every)
    trainer = UNetTrainer(run_dir, cfg)
    if threads:
        import torch
        torch.set_num_threads(threads)
    evaluate = assets.training_evaluator()
    plain = not sys.stdout.isatty()
    with _progress() as p:
        task = p.add_task("unet", total=min(until or trainer.cfg.steps, trainer.cfg.steps),
                          completed=trainer.step, info="")

        def prog(step, total, loss, el, start):
            p.update(task, completed=step, info=f"loss {loss:.4f}")
            if plain and step % 100 == 0:
                rate = (step - start) / max(el, 1e-9)
                print(f"step {step}/{total} loss {loss:.4f} {rate:.2f} it/s", flush=True)

        trainer.run(until=until, max_seconds=None if max_minutes is None else 60 * max_minutes,
                    progress=prog, evaluate=evaluate)
    typer.echo(f"stopped at step {trainer.step}; state in {run_dir}")
    if export:
        export_pipeline(trainer, export)
        typer.echo(f"exported EMA pipeline to {export}")


@world_app.command("export")
def world_export(run_dir: Path = typer.Option(None), out: Path = typer.Option(None)):
    """Write a training run's EMA weights as the shipped StableDiffusionPipeline folder."""
    from .world import assets
    from .world.train import UNetTrainer, export_pipeline

    run_dir = run_dir or assets.default_run_dir()
    if not (run_dir / "state.pt").exists():
        fail(f"no training state at {run_dir}/state.pt: run `diffusion-sae world train-unet` first")
    t = UNetTrainer(run_dir)
    out = export_pipeline(t, out or assets.pipeline_dir())
    typer.echo(f"exported step {t.step} to {out}")


@world_app.command("eval")
def world_eval(model: Path = typer.Option(None, help="Pipeline folder (default: the shipped one)."),
               seeds: int = 3, steps: int = 25, guidance: float = 5.0,
               out: Path = typer.Option(Path("world-eval.png"), help="Objects x styles grid PNG.")):
    """Generate every object x style pair (colour cycle, N seeds) and print classifier agreement."""
    import torch

    from .world import assets
    from .world.evaluate import agreement, generate, grid_prompts, image_grid, save_png

    pipe = assets.load_pipeline(model)
    clf = assets.load_classifier()
    ps = grid_prompts(seeds)
    with _progress() as p:
        task = p.add_task("generate", total=len(ps.prompts), info="")
        imgs = generate(pipe, ps.prompts, ps.seeds, steps=steps, guidance=guidance,
                        progress=lambda d, n: p.update(task, completed=d))
    acc = agreement(clf, imgs, ps)
    from .world.config import OBJECTS, STYLES
    first = imgs.view(len(OBJECTS), len(STYLES), seeds, *imgs.shape[1:])[:, :, 0].reshape(-1, *imgs.shape[1:])
    save_png(image_grid(first, len(OBJECTS), len(STYLES)), out)
    for k, v in acc.items():
        typer.echo(f"{k:7s} agreement {100 * v:6.2f} %  ({len(ps.prompts)} images)")
    typer.echo(f"grid: {out}")
    _ = torch


def main() -> None:
    try:
        app()
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
