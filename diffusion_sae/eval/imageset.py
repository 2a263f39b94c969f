"""Image sets for evaluations: one image per (prompt, seed) and condition, with an index; resumable.

    folder/
      <condition>/<name>.png        one image per item, e.g. original/0.png, unlearned/0.png
      <condition>/.settings.json    what made that folder's images (a rerun with other settings is refused)
      index.csv, index.json         one row per (item, condition): name, prompt, seed, guidance, condition, file

A condition is a name and a zero-argument callable returning a context manager that is open while the
condition's images are generated (an intervention on the pipeline, or `contextlib.nullcontext` for the plain
model). Every condition of an item uses the item's seed on a CPU generator (the papers' scripts seed the same
way), so the images of one item differ only by the condition. Images already on disk are skipped, each file
is written atomically (a temporary name, then a rename), and the index is rewritten at the end, so an
interrupted run resumes where it stopped. `eval nudity --images folder/<condition> --prompts …` reads a
condition's folder when the names are the CSV row indices.
"""
from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Sequence

from ..errors import DiffusionSAEError

INDEX_CSV, INDEX_JSON, SETTINGS_FILE = "index.csv", "index.json", ".settings.json"
EXTS = ("png", "jpg")


class ImageSetError(DiffusionSAEError, ValueError):
    """An image folder that cannot be written or resumed (one line: what, where, how to fix)."""


@dataclass
class ImageItem:
    name: str        # file stem
    prompt: str
    seed: int
    guidance: float


@dataclass
class Condition:
    name: str
    open: Callable[[], ContextManager]
    settings: dict = field(default_factory=dict)   # what distinguishes it (strength, concept, …): checked on resume


def _inside_package(path: Path) -> bool:
    pkg = Path(__file__).resolve().parent.parent
    res = Path(path).resolve()
    return res == pkg or pkg in res.parents


def check_image_folder(folder: str | Path, option: str = "--save-images") -> Path:
    """Refuse, before any work, a folder that is a file, inside the installed package, or not writable."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ImageSetError(f"{option} {folder} is a file; give a folder")
    if _inside_package(folder):
        raise ImageSetError(f"{option} {folder}: inside the installed diffusion_sae package; write to a folder of your own")
    parent = folder.resolve()
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ImageSetError(f"{option} {folder}: cannot write in {parent} (permission denied or not a folder); "
                            "choose a writable place")
    return folder


def _check_names(items: Sequence[ImageItem], conditions: Sequence[Condition]) -> None:
    names = [it.name for it in items]
    if len(set(names)) != len(names):
        dup = next(n for i, n in enumerate(names) if n in names[:i])
        raise ImageSetError(f"two images named {dup!r}: give every (prompt, seed) item its own name")
    cnames = [c.name for c in conditions]
    if not cnames or len(set(cnames)) != len(cnames):
        raise ImageSetError(f"conditions need distinct names, got {cnames}")
    for n in names + cnames:
        if not n or Path(n).name != n or n.startswith(".") or n in (INDEX_CSV, INDEX_JSON):
            raise ImageSetError(f"{n!r} is not a plain file or folder name")


def atomic_write_text(path: Path, text: str) -> None:
    """Write `path` through a temporary file in the same folder and a rename (no half-written file is ever seen)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_image_atomic(img, path: Path) -> None:
    """Save a PIL image through a temporary file and a rename (the format follows `path`'s suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        img.save(tmp, quality=95) if path.suffix == ".jpg" else img.save(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _claim(folder: Path, settings: dict) -> None:
    """Record the settings that made a condition's images; refuse a folder made with other settings."""
    marker = folder / SETTINGS_FILE
    want = json.loads(json.dumps(settings, default=str))
    if marker.is_file():
        try:
            have = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            have = None
        if have != want:
            if isinstance(have, dict):
                what = ", ".join(sorted(k for k in set(want) | set(have) if have.get(k) != want.get(k))[:4])
            else:
                what = f"unreadable {SETTINGS_FILE}"
            raise ImageSetError(f"{folder} holds images made with other settings ({what} differ); give another "
                                f"output folder or delete {folder}")
        return
    atomic_write_text(marker, json.dumps(want, indent=1, sort_keys=True))


def _batches(todo: list[ImageItem], batch_size: int) -> list[list[ImageItem]]:
    """Consecutive items with the same guidance, at most batch_size per pipeline call."""
    out: list[list[ImageItem]] = []
    for it in todo:
        if out and len(out[-1]) < batch_size and out[-1][0].guidance == it.guidance:
            out[-1].append(it)
        else:
            out.append([it])
    return out


def generate_image_set(pipe, items: Sequence[ImageItem], folder: str | Path, conditions: Sequence[Condition],
                       steps: int, height: int | None = None, width: int | None = None,
                       negative_prompt: str | None = None, ext: str = "png", batch_size: int = 1,
                       settings: dict | None = None,
                       progress: Callable[[int, int], None] | None = None) -> dict:
    """Generate every item under every condition into `folder/<condition>/<name>.<ext>` (see module docstring).

    `settings` (model, steps, …) are recorded with each condition's own settings; a folder made with other
    ones is refused rather than mixed. With `batch_size` > 1, consecutive items of equal guidance share a
    pipeline call (each still seeded by its own generator). Returns {"folder", "files": {condition: [paths]},
    "generated", "skipped"}.
    """
    import torch

    from ..interventions.rewind import generate

    if ext not in EXTS:
        raise ImageSetError(f"image type must be one of {EXTS}, not {ext!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ImageSetError(f"batch size must be a positive number of prompts, got {batch_size!r}")
    items, conditions = list(items), list(conditions)
    _check_names(items, conditions)
    folder = check_image_folder(folder, "image folder")
    base = {"steps": steps, "height": height, "width": width, "negative_prompt": negative_prompt, "ext": ext,
            "scheduler": type(pipe.scheduler).__name__, **(settings or {})}
    kw = {k: v for k, v in (("height", height), ("width", width)) if v is not None}
    total = len(items) * len(conditions)
    done = generated = 0
    files: dict[str, list[Path]] = {}
    for cond in conditions:
        sub = folder / cond.name
        _claim(sub, {**base, "condition": cond.name, **cond.settings})
        for stale in sub.glob(".*.tmp.*"):  # left by a run killed between writing and renaming an image
            stale.unlink(missing_ok=True)
        paths = [sub / f"{it.name}.{ext}" for it in items]
        files[cond.name] = paths
        todo = [it for it, p in zip(items, paths) if not p.is_file()]
        done += len(items) - len(todo)
        if progress:
            progress(done, total)
        if not todo:
            continue
        with cond.open():
            for chunk in _batches(todo, batch_size):
                if negative_prompt is not None:
                    kw["negative_prompt"] = [negative_prompt] * len(chunk)
                with torch.no_grad():
                    # generate: pipe(...) plus the rewind of an open edit that asks for it (interventions/rewind.py)
                    out = generate(pipe, [it.prompt for it in chunk], num_inference_steps=steps,
                                   guidance_scale=chunk[0].guidance,
                                   generator=[torch.Generator("cpu").manual_seed(int(it.seed)) for it in chunk], **kw)
                for it, img in zip(chunk, out.images):
                    save_image_atomic(img.convert("RGB"), sub / f"{it.name}.{ext}")
                done += len(chunk)
                generated += len(chunk)
                if progress:
                    progress(done, total)
    write_index(folder, items, conditions, files, base)
    return {"folder": folder, "files": files, "generated": generated, "skipped": total - generated}


def write_index(folder: Path, items: Sequence[ImageItem], conditions: Sequence[Condition], files: dict,
                settings: dict) -> None:
    """index.csv (one row per item and condition) and index.json (the same plus the settings), atomically."""
    rows = [{"name": it.name, "prompt": it.prompt, "seed": int(it.seed), "guidance": float(it.guidance),
             "condition": c.name, "file": Path(files[c.name][i]).relative_to(folder).as_posix()}
            for c in conditions for i, it in enumerate(items)]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["name", "prompt", "seed", "guidance", "condition", "file"])
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(folder / INDEX_CSV, buf.getvalue())
    doc = {"settings": json.loads(json.dumps(settings, default=str)),
           "conditions": {c.name: json.loads(json.dumps(c.settings, default=str)) for c in conditions},
           "images": rows}
    atomic_write_text(folder / INDEX_JSON, json.dumps(doc, indent=1, ensure_ascii=False))


def read_index(folder: str | Path) -> dict:
    """The index.json of an image set (ImageSetError when missing or unreadable)."""
    path = Path(folder) / INDEX_JSON
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ImageSetError(f"{path}: no readable image-set index ({type(e).__name__}); regenerate the images") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise ImageSetError(f"{path}: not an image-set index (no 'images' list)")
    return doc
