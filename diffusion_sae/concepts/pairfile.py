"""A safetensors + JSON pair written atomically and read back with a check that the two belong together.

`write_pair(folder, stem, tensors, doc, ...)` writes `{stem}.safetensors` and `{stem}.json` through
temporary files (`*.tmp`, removed again whatever happens) and renames them into place, tensors first. The
JSON carries `tensors_sha256`, the hash of the tensors file it was written with, so a kill between the two
renames leaves a pair that `read_pair` refuses as mismatched instead of mixing two saves. Files written
before the hash existed (no `tensors_sha256`) still load.

Errors are the caller's: each function takes the error class to raise and message templates, formatted
with the named fields listed at each function (unused fields are ignored), so a concept dictionary and a
concept probe keep their own wording.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

SHA_KEY = "tensors_sha256"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_pair(folder: Path, stem: str, tensors: dict[str, torch.Tensor], doc: dict, *,
               error: type[Exception], cannot_write: str) -> Path:
    """Write {stem}.safetensors and {stem}.json (doc plus `tensors_sha256`) into folder (created if need be);
    returns the JSON's path. An OSError raises `error(cannot_write.format(folder=..., why=...))`; no temporary
    file is left behind either way. `doc` itself is not changed."""
    t, j = folder / f"{stem}.safetensors", folder / f"{stem}.json"
    t_tmp, j_tmp = Path(str(t) + ".tmp"), Path(str(j) + ".tmp")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(t_tmp))
        # the JSON names the tensors file it belongs to: a kill between the two renames below
        # leaves a pair the loader recognises as mismatched instead of mixing two saves
        j_tmp.write_text(json.dumps({**doc, SHA_KEY: _sha256(t_tmp)}, indent=1))
        os.replace(t_tmp, t)
        os.replace(j_tmp, j)
    except OSError as e:
        raise error(cannot_write.format(folder=folder, why=e.strerror or e)) from None
    finally:
        for tmp in (t_tmp, j_tmp):
            if tmp.is_file():
                tmp.unlink()
    return j


def read_pair(folder: str | Path, stem: str, *, error: type[Exception], missing: str, bad_json: str,
              mismatch: str, bad_tensors: str, check_doc: Callable[[object, Path], None] | None = None,
              exists: Callable[[Path], bool] = Path.is_file) -> tuple[dict, dict[str, torch.Tensor]]:
    """(doc, tensors) of the pair {stem}.json / {stem}.safetensors in folder, checked in this order:

    missing      either file absent (`exists`, default Path.is_file)        fields: folder, stem
    bad_json     the JSON unreadable (not UTF-8, not JSON, ...)             fields: json, why
    check_doc    the caller's own check of the parsed doc (raises itself), called as check_doc(doc, json_path)
    mismatch     `tensors_sha256` given and not the tensors file's hash     fields: tensors, json
    bad_tensors  the tensors file unreadable as safetensors                 fields: tensors, why

    Each template is raised as `error(template.format(...))`."""
    folder = Path(folder)
    j, t = folder / f"{stem}.json", folder / f"{stem}.safetensors"
    if not exists(j) or not exists(t):
        raise error(missing.format(folder=folder, stem=stem))
    try:
        doc = json.loads(j.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # truncated, not JSON, not UTF-8, a folder
        why = e.msg if isinstance(e, json.JSONDecodeError) else (getattr(e, "strerror", None) or type(e).__name__)
        raise error(bad_json.format(json=j, why=why)) from None
    if check_doc is not None:
        check_doc(doc, j)
    want = doc.get(SHA_KEY) if isinstance(doc, dict) else None
    if want is not None and _sha256(t) != want:
        raise error(mismatch.format(tensors=t, json=j))
    try:
        tensors = load_file(str(t))
    except Exception as e:  # truncated / not safetensors
        raise error(bad_tensors.format(tensors=t, why=str(e).splitlines()[0] if str(e) else type(e).__name__)) from None
    return doc, tensors
