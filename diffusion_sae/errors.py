"""The one exception base class of diffusion-sae.

Every error a user can cause (a bad option, a damaged file, a model that does not fit) is a
`DiffusionSAEError`; the CLI catches it once and prints one line with exit code 2. Subclasses also
derive from the built-in type callers would expect (ValueError, RuntimeError, ...).
"""
from __future__ import annotations


class DiffusionSAEError(Exception):
    """A problem with the user's input or files, explained in one line (what, where, how to fix)."""
