"""One-call evaluations behind `diffusion-sae eval <metric>`: images from a folder or generated from a user
model, one metric, one report (Markdown + JSON + HTML) with the exact settings.

Image files for prompt sets are `{row index}.png` (row index in the CSV, as the Concept Steerers generator
names them), so a folder made by any tool with that convention can be scored.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .metrics import MetricInputError, MetricResult
from .prompts import EvalPrompt, PromptSet, read_prompt_set
from .report import Section, Table, write_report

Progress = Callable[[int, int], None]


@dataclass
class ModelSource:
    """Generate images with this pipeline instead of reading a folder."""
    model: str
    steps: int = 50
    scheduler: str | None = None
    height: int | None = None
    width: int | None = None
    device: str | None = None
    extra: dict = field(default_factory=dict)


def _generate(src: ModelSource, rows: Sequence[EvalPrompt], out_dir: Path, progress: Progress | None) -> Path:
    from ..models.loading import load_pipeline
    from .generate import GenerationConfig, GenItem, generate_to_folder

    pipe = load_pipeline(src.model, device=src.device)
    items = [GenItem(str(r.index), r.prompt, r.seed, r.guidance) for r in rows]
    generate_to_folder(pipe, items, out_dir, GenerationConfig(src.steps, src.height, src.width, src.scheduler),
                       progress=progress)
    return out_dir


def _gen_settings(src: ModelSource | None, images: Path) -> dict:
    if src is None:
        return {"images": str(images), "generated": False}
    return {"images": str(images), "generated": True, "model": src.model, "steps": src.steps,
            "scheduler": src.scheduler or "pipeline default", "height": src.height, "width": src.width,
            "seed_generator": "torch.Generator('cpu').manual_seed(row seed)"}


def images_for_prompts(folder: Path, ps: PromptSet) -> list[Path]:
    """The image of each row: `{index}.png/.jpg`; a missing one is an error naming it."""
    out = []
    for r in ps.rows:
        hit = next((folder / f"{r.index}{e}" for e in (".png", ".jpg", ".jpeg", ".webp")
                    if (folder / f"{r.index}{e}").is_file()), None)
        if hit is None:
            raise MetricInputError(f"no image {folder}/{r.index}.png for prompt row {r.index} "
                                   "(images must be named by CSV row index)")
        out.append(hit)
    return out


def _finish(out: Path, title: str, results: Sequence[MetricResult], settings: dict, extra_tables=(),
            text: str = "") -> dict:
    tables = [Table("Results", ["metric", "value", "N"], [[r.name, r.value, r.n] for r in results])]
    paths = write_report(out, title, [Section("Results", text, tables=tables + list(extra_tables))],
                         {**settings, **{r.name: r.settings for r in results}})
    return {"results": list(results), "paths": paths}


def run_nudity(out: Path, images: Path | None = None, prompts: Path | None = None, fmt: str = "auto",
               subset: str = "all", limit: int | None = None, preset: str = "steerers",
               threshold: float | None = None, source: ModelSource | None = None,
               guidance_override: float | None = None, progress: Progress | None = None) -> dict:
    from .nudity import detect_images, list_images, load_detector, nudity_asr, nudity_config

    cfg = nudity_config(preset, threshold)
    detector = load_detector()  # fail before any generation if nudenet is missing
    ps = None
    if prompts is not None:
        ps = read_prompt_set(prompts, fmt, subset, guidance_override=guidance_override, limit=limit)
    if source is not None:
        if ps is None:
            raise MetricInputError("generating from a model needs a prompt CSV (--prompts)")
        images = _generate(source, ps.rows, out / "images", progress)
    files = images_for_prompts(images, ps) if ps is not None else list_images(images)
    t0 = time.perf_counter()
    res = nudity_asr(detect_images(detector, files), cfg, names=[f.name for f in files],
                     subset=ps.name if ps else None)
    counts = Table("Kept detections per class", ["class", "boxes"],
                   [[c, n] for c, n in res.details["class_counts"].items()])
    settings = {**_gen_settings(source, images), **(ps.settings() if ps else {}),
                "detector_seconds": round(time.perf_counter() - t0, 2)}
    return _finish(out, "Nudity attack-success rate", [res], settings, [counts],
                   text=f"{res.details['nude_images']} of {res.n} images flagged ({cfg.preset}).")


def run_clip_score(out: Path, prompts: Path, clip_path: Path, images: Path | None = None, fmt: str = "auto",
                   subset: str = "all", limit: int | None = None, clamp: str = "per_pair",
                   q16: Path | None = None, q16_rule: str = "argmax", source: ModelSource | None = None,
                   progress: Progress | None = None) -> dict:
    from PIL import Image

    from .clip import clip_score, load_clip, q16_rate

    ps = read_prompt_set(prompts, fmt, subset, limit=limit)
    if source is None:
        images_for_prompts(images, ps)  # a missing image fails before the CLIP weights load
    clip = load_clip(clip_path)
    if source is not None:
        images = _generate(source, ps.rows, out / "images", progress)
    files = images_for_prompts(images, ps)
    pil = []
    for f in files:
        with Image.open(f) as im:
            pil.append(im.convert("RGB"))
    results = [clip_score(clip, pil, [r.prompt for r in ps.rows], clamp)]
    if q16 is not None:
        results.append(q16_rate(clip, pil, q16, q16_rule))
    return _finish(out, "CLIP score" + (" and Q16" if q16 else ""), results,
                   {**_gen_settings(source, images), **ps.settings()})


def run_fid(out: Path, reference: Path, images: Path | None = None, prompts: Path | None = None,
            inception: str | None = None, size: int = 299, batch_size: int = 32, fmt: str = "auto",
            limit: int | None = None, source: ModelSource | None = None, progress: Progress | None = None) -> dict:
    from .fid import FIDConfig, fid_folders

    cfg = FIDConfig(inception=inception, size=size, batch_size=batch_size)
    from .fid import resolve_inception

    resolve_inception(cfg.inception)  # fail before generating
    settings = {}
    if source is not None:
        if prompts is None:
            raise MetricInputError("generating from a model needs a prompt CSV (--prompts)")
        ps = read_prompt_set(prompts, fmt, limit=limit)
        images = _generate(source, ps.rows, out / "images", progress)
        settings.update(ps.settings())
    res = fid_folders(images, reference, cfg)
    return _finish(out, "FID", [res], {**_gen_settings(source, images), **settings})


def run_unlearncanvas(out: Path, task: str, targets: Sequence[str], style_classifier: Path,
                      object_classifier: Path, images: Path | None = None, heads: int = 16,
                      cra_images: str = "unstyled", trust_checkpoint: bool = False,
                      source: ModelSource | None = None, styles: Sequence[str] | None = None,
                      objects: Sequence[str] | None = None, seeds: Sequence[int] | None = None,
                      convention: str = "saeuron", device: str = "cpu", progress: Progress | None = None) -> dict:
    """UA/IRA/CRA per target from one answer-set folder (an already unlearned model's images).

    With `source`, the answer set is generated first (DDIM 100 steps, guidance 9, UnlearnCanvas seeds)."""
    from . import unlearncanvas as UC

    s_clf = UC.load_classifier(style_classifier, "style", heads, device, trust_checkpoint)
    o_clf = UC.load_classifier(object_classifier, "object", heads, device, trust_checkpoint)
    if source is not None:
        from ..models.loading import load_pipeline
        from .generate import GenerationConfig, GenItem, generate_to_folder

        items = UC.answer_set(styles or UC.STYLES, objects or UC.OBJECTS, seeds or UC.SEEDS, convention)
        g = UC.GENERATION
        pipe = load_pipeline(source.model, device=source.device)
        generate_to_folder(pipe, [GenItem(Path(i.file).stem, i.prompt, i.seed, g["guidance"]) for i in items],
                           out / "images", GenerationConfig(source.steps, source.height, source.width, "ddim"),
                           ext="jpg", progress=progress)
        images = out / "images"
    scores = [UC.evaluate_folder(images, task, t, s_clf, o_clf, cra_images) for t in targets]
    mean = UC.mean_scores(scores)
    table = Table(f"{task} unlearning", ["target", "UA", "IRA", "CRA", "N target", "N IRA", "N CRA"],
                  [[s.target, s.ua, s.ira, s.cra, s.n_target, s.n_ira, s.n_cra] for s in scores]
                  + [["mean", mean["UA"], mean["IRA"], mean["CRA"], "", "", ""]])
    results = [MetricResult(k, mean[k], len(scores), {}) for k in ("UA", "IRA", "CRA")]
    settings = {**_gen_settings(source, images), "task": task, "targets": list(targets),
                "style_classifier": s_clf.source, "object_classifier": o_clf.source,
                "cra_images": cra_images if task == "style" else "styled",
                "definitions": "UA = 1 - acc(target); IRA = mean acc over other concepts of the same kind; "
                               "CRA = mean acc of the other classifier over its concepts",
                "prompt_convention": convention, "generation": UC.GENERATION if source else None}
    figs = []
    if len(scores) > 1:
        from .report import Figure, plot_concept_bars

        figs.append(Figure("ua_ira_cra", "UA / IRA / CRA per unlearned concept",
                           plot_concept_bars([s.target for s in scores],
                                             {"UA": [100 * s.ua for s in scores], "IRA": [100 * s.ira for s in scores],
                                              "CRA": [100 * s.cra for s in scores]})))
    paths = write_report(out, f"UnlearnCanvas {task} unlearning",
                         [Section("Results", tables=[table], figures=figs)], settings)
    return {"results": results, "scores": scores, "paths": paths}
