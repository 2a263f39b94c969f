"""What every command shares: the one user-error type, option definitions, model / SAE / prompt loading,
output-file checks and image writing. Heavy imports (torch, diffusers) stay inside the functions so that
`--help` stays fast.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NoReturn, Optional

import typer

from ..errors import DiffusionSAEError
from ..world.config import GUIDANCE as WORLD_GUIDANCE


class UserError(DiffusionSAEError):
    """A bad input: printed as one line, exit code 2."""


def fail(msg: str) -> NoReturn:
    raise UserError(msg)


def progress_bar():
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn())


# --device / --dtype / --offload: the same three options on every command that runs a pipeline.
DEVICE_OPT = typer.Option("auto", "--device", help="auto (cuda:LOCAL_RANK, then mps, then cpu), cpu, cuda, cuda:N or mps.")
DTYPE_OPT = typer.Option("auto", "--dtype", help="Pipeline dtype: auto (CUDA: float16 for SD 1.x/SDXL, bfloat16 for "
                          "SD3/FLUX; CPU: float32), float32, float16 or bfloat16.")
OFFLOAD_OPT = typer.Option("none", "--offload", help="none, model (diffusers' enable_model_cpu_offload) or "
                            "sequential (enable_sequential_cpu_offload): for a pipeline larger than the GPU.")


def dtype_name(dtype: str, auto: str) -> str:
    """The canonical name of a --dtype value (float16 for fp16, ...); `auto` for auto."""
    from ..models.devices import parse_dtype

    dt = parse_dtype(dtype)
    return auto if dt is None else str(dt).removeprefix("torch.")


SHAPES = "shapescanvas"


def guidance_for(model, guidance: float | None) -> float:
    """The bundled model samples at its own guidance (world.config.GUIDANCE); diffusers' 7.5 otherwise."""
    if guidance is not None:
        return guidance
    return WORLD_GUIDANCE if str(model) == SHAPES else 7.5


def load_model(model: Optional[str], device: Optional[str] = None, dtype: Optional[str] = None,
                offload: Optional[str] = None):
    """The bundled ShapesCanvas pipeline (default), a local folder, a hub id, or tiny:<family>,
    placed by --device/--dtype/--offload (models/devices.py)."""
    from ..models.devices import place_pipeline

    if not sys.stderr.isatty():  # loading bars in a log (or a captured stderr) bury the one-line errors
        from diffusers.utils import logging as _diffusers_logging
        from transformers.utils import logging as _transformers_logging

        _diffusers_logging.disable_progress_bar()
        _transformers_logging.disable_progress_bar()
    try:
        if model in (None, "", SHAPES):
            from ..world import assets
            pipe = assets.load_pipeline()
            if any(v is not None for v in (device, dtype, offload)):
                place_pipeline(pipe, device or "auto", dtype or "auto", offload or "none")
            return pipe
        from ..models.loading import ModelLoadError, load_pipeline
        try:
            pipe = load_pipeline(model, device=device, dtype=dtype, offload=offload)
        except ModelLoadError as e:
            fail(str(e))
        pipe.set_progress_bar_config(disable=True)
        return pipe
    except FileNotFoundError as e:
        fail(str(e))


def load_sae_arg(path, hookpoint: Optional[str], default_loader, pipe=None):
    """--sae: a folder or a hub id (org/name[/subfolder]); the SAE goes to the pipeline's execution device."""
    from ..sae import SAEError, load_sae

    try:
        sae = default_loader() if path is None else load_sae(str(path), hookpoint=hookpoint)
    except (SAEError, FileNotFoundError, OSError) as e:
        fail(str(e).splitlines()[0])
    except (AttributeError, TypeError, KeyError, IndexError) as e:  # cfg.json of the wrong shape (a list, ...)
        fail(f"--sae {path}: not a valid SAE folder (cfg.json or the weights have the wrong structure: "
             f"{type(e).__name__}); retrain or re-download it")
    check_finite_sae(sae, path)
    if pipe is not None:
        from ..models.devices import execution_device

        sae = sae.to(execution_device(pipe))
    return sae


def sae_folder(path) -> Path:
    """The local folder of an --sae value (a hub id resolves to its snapshot in the hub cache)."""
    from ..sae import SAEError
    from ..sae.io import resolve_checkpoint

    try:
        return resolve_checkpoint(str(path))
    except SAEError as e:
        fail(str(e))


def check_finite_sae(sae, path) -> None:
    """NaN / inf weights would give blank images with exit code 0: refuse them."""
    import torch

    for name, t in sae.named_parameters():
        if not bool(torch.isfinite(t).all()):
            fail(f"--sae {path or '(bundled)'}: the SAE weight {name} holds NaN or inf values; the file is "
                 "damaged, retrain it")


def prompt_set(prompts: Optional[Path], prompt: Optional[list[str]], seed: int):
    from ..activations import PromptFileError, load_prompts
    from ..activations.prompts import PromptSet

    if prompts is not None:
        try:
            return load_prompts(prompts, default_seed=seed)
        except PromptFileError as e:
            fail(str(e))
    if not prompt:
        fail("give --prompt TEXT (repeatable) or --prompts FILE")
    return PromptSet.from_list(list(prompt), default_seed=seed)



def parse_strengths(text: str, option: str = "--strengths") -> list[float]:
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


def parse_number(text: str, option: str) -> float:
    """A finite number given as text (so that a typo is one line, not click's usage box)."""
    import math as _math

    try:
        v = float(text)
    except ValueError:
        fail(f"{option} must be a number, got {text!r}")
    if not _math.isfinite(v):
        fail(f"{option} must be a finite number, got {text!r}")
    return v


def detector_thresholds(detectors, texts) -> list[float]:
    """--detector-threshold (given once: every --detector; else once per --detector, by order) as one probability
    per --detector (default 0.5); [] without --detector (the caller says that a threshold alone does nothing)."""
    values = []
    for text in texts or []:
        v = parse_number(text, "--detector-threshold")
        if not 0.0 <= v <= 1.0:
            fail(f"--detector-threshold must be a probability in [0, 1], got {text!r}")
        values.append(v)
    n = len(detectors or [])
    if n and len(values) > 1 and len(values) != n:
        fail(f"--detector-threshold is given {len(values)} times for {n} --detector: give it once (for every "
             "probe) or once per --detector, in their order")
    return (values or [0.5]) * n if len(values) <= 1 else values


def read_probe(path: Path, option: str = "--detector"):
    """A saved concept probe (`concepts probe --out`), or one error line."""
    from ..concepts.probe import ConceptProbe, ProbeError

    try:
        return ConceptProbe.from_pretrained(path)
    except ProbeError as e:
        fail(f"{option}: {e}")


def parse_window(text: str, option: str = "--window") -> tuple[int, int]:
    """START-STOP as (start, stop): the step indices start <= t < stop of a timestep window."""
    parts = text.strip().split("-")
    try:
        if len(parts) != 2:
            raise ValueError
        a, b = int(parts[0]), int(parts[1])
    except ValueError:
        fail(f"{option} must be START-STOP (two step indices, e.g. 5-25), got {text!r}")
    if not 0 <= a < b:
        fail(f"{option} {text}: needs 0 <= START < STOP")
    return a, b


def check_generation(steps: int, guidance: float, **numbers) -> None:
    """Options every generating command shares, checked before the model loads."""
    import math as _math

    if steps <= 0:
        fail(f"--steps must be a positive number of denoising steps, got {steps}")
    if not _math.isfinite(guidance):
        fail(f"--guidance must be a finite number, got {guidance}")
    for opt, v in numbers.items():
        if v is not None and not _math.isfinite(v):
            fail(f"--{opt.replace('_', '-')} must be a finite number, got {v}")


FIGURE_EXTS = (".png", ".jpg", ".jpeg", ".pdf", ".svg", ".webp")


def inside_package(path: Path) -> bool:
    pkg = Path(__file__).resolve().parents[1]   # diffusion_sae/, not diffusion_sae/cli/
    res = Path(path).resolve()
    return res == pkg or pkg in res.parents


def check_out_file(path: Path, option: str = "--out", exts=FIGURE_EXTS) -> None:
    """An output file, checked before any image is generated: known extension, not a folder, not inside
    the package, in a folder that exists or can be made and is writable."""
    if path.is_dir():
        fail(f"{option} {path} is a folder; give a file name such as {path / ('grid' + exts[0])}")
    if path.suffix.lower() not in exts:
        fail(f"{option} {path}: unknown file type {path.suffix or '(no extension)'!r}; use one of {', '.join(exts)}")
    if inside_package(path):
        fail(f"{option} {path}: inside the installed diffusion_sae package; write to a folder of your own")
    check_writable_parent(path, option)


def check_writable_parent(path: Path, option: str) -> None:
    parent = path.resolve().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        fail(f"{option} {path}: cannot write in {parent} (permission denied or not a folder); choose a writable place")


def save_image(img, path: Path) -> None:
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


def label_grid(images, row_labels, col_labels, path: Path) -> None:
    """Save an image grid with row / column labels."""
    from ..eval.report import plot_image_grid, save_figure

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



def prompt_lines(path: Path, option: str) -> list[str]:
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


# ---------------------------------------------------------------------------------------------
# registered interventions (interventions/registry.py): `intervene`, `eval shapes`, `eval attack`
# ---------------------------------------------------------------------------------------------
METHOD_HELP = "A registered intervention (interventions/registry.py), e.g. scale, steer, saeuron."
SET_HELP = "A setting of --method as key=value (repeatable), e.g. --set features=12:0,873:3 --set steps=0,10."
METHOD_SAE_HELP = "SAE folder or hub id for --method (default: the bundled model's text or block SAE, as the method needs)."


def method_config(method: str, settings: Optional[list[str]]):
    """(spec, typed config) of --method / --set, checked before any model loads."""
    from ..interventions.registry import RegistryError, get_intervention, make_config

    try:
        spec = get_intervention(method)
        return spec, make_config(spec, list(settings or []))
    except RegistryError as e:
        fail(f"--method {method}: {e}")
    except ValueError as e:     # a config's own check (ConfigError), e.g. an empty feature table
        fail(f"--method {method}: {str(e).splitlines()[0]}")


def method_intervention(spec, config, sae: Optional[Path], pipe, model: Optional[str] = SHAPES):
    """The intervention of --method on `pipe`: the SAE given by --sae, else the bundled one of the kind the
    method registered (text or block)."""
    from ..interventions.registry import BuildContext, RegistryError

    if sae is None and model not in (None, "", SHAPES):
        fail(f"--method {spec.name}: give --sae FOLDER (the bundled SAEs belong to the bundled model)")
    if sae is None:
        from ..sae import TopKSAE
        from ..world import assets, bundle

        folder = assets.sae_dir() / (bundle.TEXT_HOOKPOINT if spec.sae == "text" else bundle.BLOCK_HOOKPOINT)
        sae_obj = load_sae_arg(None, None, lambda: TopKSAE.from_pretrained(folder), pipe)
    else:
        folder = sae_folder(sae)
        sae_obj = load_sae_arg(sae, None, None, pipe)
    try:
        iv = spec.factory(sae_obj, config, BuildContext(sae_folder=folder))
        with iv.context(pipe):   # opened once: a feature out of range or a wrong hookpoint fails before any image
            pass
    except (RegistryError, ValueError) as e:
        fail(f"--method {spec.name}: {str(e).splitlines()[0]}")
    return iv


def method_context(pipe, intervention):
    """A zero-argument context-manager factory that opens `intervention` on `pipe` (the benchmarks' form)."""
    from ..interventions.api import intervene

    return lambda: intervene(pipe, intervention)
