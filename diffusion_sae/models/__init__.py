"""Model adapters: named hookpoints of diffusers pipelines, step/branch tracking, tiny test pipelines."""
from .hookpoints import (EditHook, HookHandle, Hookpoint, HookpointError, PreForwardHook, as_tokens, from_tokens,
                         input_tensor, list_hookpoints, output_tensor, read_tensor, register_edit, register_hook,
                         registered, replace_output, resolve_hookpoint)
from .step_tracker import StepTracker

__all__ = ["EditHook", "HookHandle", "Hookpoint", "HookpointError", "PreForwardHook", "StepTracker", "as_tokens",
           "from_tokens", "input_tensor", "list_hookpoints", "output_tensor", "read_tensor", "register_edit",
           "register_hook", "registered", "replace_output", "resolve_hookpoint", "build_tiny_pipeline"]


def build_tiny_pipeline(family: str, seed: int = 0, tokenizer_dir=None, config=None):
    """See tiny.build_tiny_pipeline (imported lazily: it pulls diffusers/transformers model classes)."""
    from .tiny import build_tiny_pipeline as _build

    return _build(family, seed=seed, tokenizer_dir=tokenizer_dir, config=config)
