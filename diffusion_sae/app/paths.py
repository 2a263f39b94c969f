"""Names typed in the browser resolve only inside the folders the server was started with.

The UI never takes a path to open: it takes a *name* (e.g. a concept dictionary's file stem) and
resolves it against the configured model / SAE folders. Anything that would leave them — absolute
paths, `..`, `~`, drive letters, symlinks pointing out, NUL bytes — is refused with one line.
"""
from __future__ import annotations

import re
from pathlib import Path
from ..errors import DiffusionSAEError

_NAME = re.compile(r"^[A-Za-z0-9_.\-/]+$")


class PathError(DiffusionSAEError, ValueError):
    """A typed name that is not a file inside the allowed folders."""


def resolve_inside(roots: list[Path], name: str, suffix: str = "") -> Path:
    """The existing file `name + suffix` inside one of `roots` (first match), or PathError."""
    text = (name or "").strip()
    if not text:
        raise PathError("empty name: give a file name inside the model / SAE folders")
    shown = text if len(text) <= 80 else text[:77] + "..."
    if not _NAME.match(text) or text.startswith("/") or ".." in text.split("/"):
        raise PathError(f"{shown!r} is not a plain name inside the model / SAE folders "
                        "(letters, digits, _ . - / only; no absolute paths, no '..')")
    for root in roots:
        root = Path(root).resolve()
        p = (root / (text + suffix)).resolve()
        # resolve() follows symlinks: a link inside the folder that points out is caught here.
        if not p.is_relative_to(root):
            raise PathError(f"{shown!r} leads outside {root.name}/ (a symlink?): refused")
        if p.is_file():
            return p
    raise PathError(f"no file {text + suffix!r} in the model / SAE folders ({', '.join(Path(r).name for r in roots)})")
