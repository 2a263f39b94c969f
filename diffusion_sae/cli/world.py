"""`diffusion-sae world ...`: the bundled ShapesCanvas world (data, model, classifier, rebuild)."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

from ..world.config import GUIDANCE as WORLD_GUIDANCE
from .common import check_generation, check_out_file, fail, progress_bar


world_app = typer.Typer(no_args_is_help=True, help="The bundled ShapesCanvas world: data, model, classifier.")


@world_app.command("train-classifier")
def world_train_classifier(out: Path = typer.Option(None, help="Output folder (default: the shipped asset)."),
                           steps: int = 1000, batch_size: int = 128, lr: float = 2e-3, seed: int = 0):
    """Train the ShapesCanvas judge (object / style / colour CNN) on fresh procedural images."""
    from ..world import assets
    from ..world.classifier import ClassifierTrainConfig, accuracy, train_classifier

    out = out or assets.classifier_dir()
    cfg = ClassifierTrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    with progress_bar() as p:
        task = p.add_task("classifier", total=steps, info="")
        model, _ = train_classifier(cfg, progress=lambda s, n, loss, el: p.update(task, completed=s, info=f"loss {loss:.4f}"))
    acc = accuracy(model)
    assets.save_model_atomic(model, out)
    typer.echo("accuracy on 2000 fresh images: " + ", ".join(f"{k} {v:.4f}" for k, v in acc.items()))
    typer.echo(f"saved {out}")


@world_app.command("train-unet")
def world_train_unet(run_dir: Path = typer.Option(None, help="Run folder with state.pt (resumed if present)."),
                     until: Optional[int] = typer.Option(None, help="Stop at this step (default: the schedule's end)."),
                     max_minutes: Optional[float] = typer.Option(None, help="Stop after this many minutes (resumable)."),
                     steps: int = typer.Option(30_000, help="Schedule length for a new run."),
                     batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
                     threads: int = typer.Option(0, help="torch threads (0 = default)."),
                     export: Optional[Path] = typer.Option(None, help="Write the EMA pipeline here when done."),
                     eval_every: int = 2000,
                     warmup: int = typer.Option(500, help="LR warm-up steps for a new run."),
                     init_from: Optional[Path] = typer.Option(None, help="Pipeline folder to fine-tune from (a new run only).")):
    """Train (or resume) the ShapesCanvas UNet + text encoder. Kill it any time; rerun to resume."""
    from ..world import assets
    from ..world.train import UNetTrainConfig, UNetTrainer, export_pipeline

    run_dir = run_dir or assets.default_run_dir()
    cfg = None if (run_dir / "state.pt").exists() else UNetTrainConfig(
        steps=steps, batch_size=batch_size, lr=lr, seed=seed, threads=threads, eval_every=eval_every,
        warmup=warmup, init_from=str(init_from) if init_from else None)
    trainer = UNetTrainer(run_dir, cfg)
    if threads:
        import torch
        torch.set_num_threads(threads)
    evaluate = assets.training_evaluator()
    plain = not sys.stdout.isatty()
    with progress_bar() as p:
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
    from ..world import assets
    from ..world.train import UNetTrainer, export_pipeline

    run_dir = run_dir or assets.default_run_dir()
    if not (run_dir / "state.pt").exists():
        fail(f"no training state at {run_dir}/state.pt: run `diffusion-sae world train-unet` first")
    t = UNetTrainer(run_dir)
    out = export_pipeline(t, out or assets.pipeline_dir())
    typer.echo(f"exported step {t.step} to {out}")


@world_app.command("rebuild")
def world_rebuild(out: Path = typer.Option(..., help="Folder for the rebuilt assets (mirrors world/assets/; "
                                           "`make world` copies it over the shipped files)."),
                  init_from: Optional[Path] = typer.Option(None, help="Pipeline folder to fine-tune from (v2 from v1)."),
                  unet_steps: int = 4000, unet_lr: float = 5e-4,
                  keep_classifier: Optional[Path] = typer.Option(None, help="Copy this classifier instead of training one."),
                  only: Optional[list[str]] = typer.Option(None, help="Run only these steps (repeatable)."),
                  guidance: float = typer.Option(WORLD_GUIDANCE, help="Guidance of every generation in the rebuild."),
                  threads: int = 0):
    """Rebuild every ShapesCanvas asset (pipeline, judge, SAEs, dictionaries, evaluation) with recorded seeds
    and wall times; resumable: a rerun skips finished steps and continues the UNet run."""
    from ..world.rebuild import Rebuild, RebuildConfig

    if unet_steps <= 0 or not unet_lr > 0:
        fail(f"--unet-steps must be > 0 and --unet-lr > 0, got {unet_steps} and {unet_lr}")
    check_generation(25, guidance)
    if init_from is not None and not (init_from / "model_index.json").exists():
        fail(f"--init-from {init_from}: no pipeline there (model_index.json missing)")
    cfg = RebuildConfig(unet_steps=unet_steps, unet_lr=unet_lr, init_from=str(init_from) if init_from else None,
                        keep_classifier=str(keep_classifier) if keep_classifier else None,
                        only=tuple(only or ()), threads=threads, guidance=guidance)
    rec = Rebuild(out, cfg, log=lambda m: typer.echo(m)).run()
    total = sum(v.get("seconds", 0) for v in rec["steps"].values())
    typer.echo(f"rebuild record: {out / 'rebuild.json'} ({total:.0f} s of steps)")


@world_app.command("eval")
def world_eval(model: Path = typer.Option(None, help="Pipeline folder (default: the shipped one)."),
               seeds: int = 3, steps: int = 25, guidance: float = WORLD_GUIDANCE,
               per_alias: int = typer.Option(5, help="Prompts per held-out name (world v2 aliases)."),
               left_out: int = typer.Option(60, help="Prompts per left-out attribute (and of the empty prompt)."),
               out: Path = typer.Option(Path("world-eval.png"), help="Objects x styles grid PNG."),
               json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the numbers here.")):
    """Prompt following: named prompts (every object x style pair), held-out names, and the marginals
    of prompts that leave an attribute out, judged by the bundled classifier."""
    import json as _json

    from ..world import assets
    from ..world.evaluate import evaluate_world, image_grid, save_png

    if model is not None and not (model / "model_index.json").is_file():
        fail(f"--model {model}: no pipeline folder there (model_index.json missing); give a folder written by "
             "`diffusion-sae world export`")
    check_generation(steps, guidance)
    if seeds <= 0:
        fail(f"--seeds must be a positive number of images per pair, got {seeds}")
    check_out_file(out, exts=(".png",))
    if json_out is not None:
        check_out_file(json_out, "--json", exts=(".json",))
    pipe = assets.load_pipeline(model)
    clf = assets.load_classifier()
    with progress_bar() as p:
        task = p.add_task("generate", total=None, info="")
        res = evaluate_world(pipe, clf, seeds, per_alias, left_out, steps, guidance,
                             progress=lambda d, n: p.update(task, advance=0, info=f"{d}/{n}"))
    imgs = res.pop("_named_images")
    from ..world.config import OBJECTS, STYLES
    first = imgs.view(len(OBJECTS), len(STYLES), seeds, *imgs.shape[1:])[:, :, 0].reshape(-1, *imgs.shape[1:])
    save_png(image_grid(first, len(OBJECTS), len(STYLES)), out)
    n = res["named"]["images"]
    for k in ("object", "style", "colour"):
        typer.echo(f"{k:7s} agreement {100 * res['named'][k]:6.2f} %  ({n} images)")
    typer.echo("held-out names: " + ", ".join(f"{k} {100 * res['held_out'][k]:.2f} %" for k in ("object", "style", "colour"))
               + f"  ({res['held_out']['images']} images)")
    for kind, d in res["left_out"].items():
        for k, shares in d.items():
            top = max(shares, key=shares.get)
            what = "empty prompt" if kind == "all" else f"{kind} left out"
            typer.echo(f"{what}: most frequent {k} {top} {100 * shares[top]:.1f} %")
    w = res["left_out_worst"]
    typer.echo(f"left-out marginals: largest share {100 * w['share']:.1f} % ({w['attribute']}, prompts leaving out {w['prompts_leave_out']})")
    typer.echo(f"grid: {out}")
    if json_out:
        tmp = json_out.with_name(json_out.name + ".tmp")
        tmp.write_text(_json.dumps(res, indent=1))
        os.replace(tmp, json_out)



@world_app.command("prompts")
def world_prompts(out: Path = typer.Option(..., help="CSV file to write (prompt, evaluation_seed)."),
                  n: int = 2000, seed: int = 0):
    """Write n ShapesCanvas captions with per-row seeds (input for collect / the recipes)."""
    import csv

    from ..world.bundle import training_captions

    if n <= 0:
        fail(f"--n must be a positive number of prompts, got {n}")
    check_out_file(out, exts=(".csv", ".txt"))
    caps, seeds = training_captions(n, seed)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["prompt", "evaluation_seed"])
            w.writerows(zip(caps, seeds))
        os.replace(tmp, out)
    except OSError as e:
        if tmp.is_file():
            tmp.unlink()
        fail(f"cannot write {out}: {e.strerror or e}; free space or choose another file")
    typer.echo(f"wrote {n} prompts to {out}")

