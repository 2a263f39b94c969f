"""Named hookpoints of a diffusers pipeline: registry, resolution, and the tensor layout of each module.

A hookpoint name is a dotted module path from the pipeline object, optionally with a read-mode suffix:
`unet.up_blocks.1.attentions.1` (output), `...:input`, `...:update` (output - input, the block's
contribution to the residual stream). Any existing module path resolves; the registry lists the ones
worth reading (text-encoder layers, UNet cross-attention transformers, DiT blocks) and is what an
unknown name is compared against.
"""
from __future__ import annotations

import difflib
import itertools
import re
from dataclasses import dataclass

import torch
from diffusers.hooks import HookRegistry, ModelHook

from ..errors import DiffusionSAEError

READ_MODES = ("output", "input", "update")
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3")
DENOISER_COMPONENTS = ("unet", "transformer")

# Dual-stream DiT blocks return (encoder_hidden_states, hidden_states): the image tokens are index 1.
_IMAGE_AT_INDEX_1 = ("FluxTransformerBlock", "FluxSingleTransformerBlock", "JointTransformerBlock")
_UNET_ATTENTION = re.compile(r"^(down_blocks|up_blocks)\.\d+\.attentions\.\d+$|^mid_block\.attentions\.\d+$")


class HookpointError(DiffusionSAEError, ValueError):
    """An unknown or unusable hookpoint."""


@dataclass
class Hookpoint:
    name: str        # canonical name: path, plus ":input"/":update" when not reading the output
    path: str        # dotted module path from the pipeline
    module: torch.nn.Module
    component: str   # "text_encoder", "text_encoder_2", "text_encoder_3", "unet", "transformer"
    kind: str        # "text" | "denoiser"
    read: str        # "output" | "input" | "update"
    width: int | None  # feature size d of the captured tokens (None when it cannot be known before a call)


def _is_clip(module) -> bool:
    return type(module).__name__.startswith("CLIPText")


def _denoiser_name(pipe) -> str | None:
    for c in DENOISER_COMPONENTS:
        if isinstance(getattr(pipe, c, None), torch.nn.Module):
            return c
    return None


def list_hookpoints(pipe, kind: str | None = None) -> list[str]:
    """Registered hookpoints of `pipe` (output read mode), text encoders first, in module order."""
    names: list[str] = []
    if kind in (None, "text"):
        for comp in TEXT_COMPONENTS:
            enc = getattr(pipe, comp, None)
            if enc is None:
                continue
            if _is_clip(enc):
                clip = getattr(enc, "text_model", enc)
                names += [f"{comp}.text_model.encoder.layers.{i}" for i in range(len(clip.encoder.layers))]
            elif hasattr(enc, "encoder") and hasattr(enc.encoder, "block"):  # T5
                names += [f"{comp}.encoder.block.{i}" for i in range(len(enc.encoder.block))]
    if kind in (None, "denoiser"):
        unet = getattr(pipe, "unet", None)
        if isinstance(unet, torch.nn.Module):
            names += [f"unet.{n}" for n, _ in unet.named_modules() if _UNET_ATTENTION.match(n)]
        tr = getattr(pipe, "transformer", None)
        if isinstance(tr, torch.nn.Module):
            for attr in ("transformer_blocks", "single_transformer_blocks"):
                names += [f"transformer.{attr}.{i}" for i in range(len(getattr(tr, attr, [])))]
    if kind not in (None, "text", "denoiser"):
        raise ValueError(f"kind must be 'text', 'denoiser' or None, not {kind!r}")
    return names


def _suggest(pipe, name: str) -> str:
    valid = list_hookpoints(pipe)
    close = difflib.get_close_matches(name.split(":")[0], valid, n=5, cutoff=0.5)
    shown = close or valid[:5]
    return f"closest valid names: {', '.join(shown)}" if shown else "this pipeline has no registered hookpoints"


def _width(pipe, component: str, module: torch.nn.Module) -> int | None:
    cls = type(module).__name__
    if cls == "Transformer2DModel":
        return int(module.config.in_channels)
    if hasattr(module, "embed_dim"):  # CLIP encoder layer
        return int(module.embed_dim)
    cfg = getattr(getattr(pipe, component), "config", None)
    if cls == "T5Block":
        return int(cfg.d_model)
    if cls in _IMAGE_AT_INDEX_1:
        return int(cfg.num_attention_heads * cfg.attention_head_dim)
    return None


def resolve_hookpoint(pipe, name: str) -> Hookpoint:
    """Find the module a hookpoint name points at; unknown names raise HookpointError with suggestions."""
    path, _, read = name.partition(":")
    read = read or "output"
    if read not in READ_MODES:
        raise HookpointError(f"hookpoint {name!r}: read mode {read!r} is not one of {', '.join(READ_MODES)}")
    parts = path.split(".")
    component = parts[0]
    obj = getattr(pipe, component, None) if component in TEXT_COMPONENTS + DENOISER_COMPONENTS else None
    if _is_clip(obj) and len(parts) > 1:
        # transformers 5 flattened CLIPTextModel (no `.text_model`); names keep the classic
        # `text_encoder.text_model.encoder.layers.N` form, which is what checkpoints and papers use.
        if parts[1] != "text_model":
            parts.insert(1, "text_model")
        path = ".".join(parts)
    for p in parts[1:]:
        if obj is None:
            break
        if p == "text_model" and not hasattr(obj, "text_model") and _is_clip(obj):
            continue
        if p.isdigit() and isinstance(obj, (torch.nn.ModuleList, torch.nn.Sequential)):
            obj = obj[int(p)] if int(p) < len(obj) else None
        else:
            obj = getattr(obj, p, None)
    if not isinstance(obj, torch.nn.Module) or len(parts) < 2:
        raise HookpointError(f"unknown hookpoint {name!r} for {type(pipe).__name__}; {_suggest(pipe, name)}")
    kind = "text" if component in TEXT_COMPONENTS else "denoiser"
    canonical = path if read == "output" else f"{path}:{read}"
    return Hookpoint(name=canonical, path=path, module=obj, component=component, kind=kind, read=read,
                     width=_width(pipe, component, obj))


# ---------------------------------------------------------------------------------------------------
# Tensor layout of module inputs/outputs
# ---------------------------------------------------------------------------------------------------
def _output_index(module: torch.nn.Module | None) -> int:
    return 1 if module is not None and type(module).__name__ in _IMAGE_AT_INDEX_1 else 0


def output_tensor(module_output, module: torch.nn.Module | None = None) -> torch.Tensor:
    """The hidden-state tensor inside a module's output.

    CLIP layer: the tensor itself (or [0] of a tuple in older transformers); T5 block: tuple [0];
    Transformer2DModel: `.sample` or tuple [0] ([B,C,H,W]); FLUX/SD3 blocks: tuple [1] (image tokens).
    """
    if isinstance(module_output, torch.Tensor):
        return module_output
    if hasattr(module_output, "sample") and isinstance(module_output.sample, torch.Tensor):
        return module_output.sample
    if isinstance(module_output, (tuple, list)):
        return module_output[_output_index(module)]
    if hasattr(module_output, "to_tuple"):  # transformers ModelOutput
        return module_output.to_tuple()[0]
    raise HookpointError(f"cannot find a tensor in a {type(module_output).__name__} module output")


def replace_output(module_output, new: torch.Tensor, module: torch.nn.Module | None = None):
    """The same output structure with its hidden-state tensor replaced by `new` (for forward hooks)."""
    if isinstance(module_output, torch.Tensor):
        return new
    if hasattr(module_output, "sample") and isinstance(module_output.sample, torch.Tensor):
        module_output.sample = new
        return module_output
    if isinstance(module_output, (tuple, list)):
        i = _output_index(module)
        items = list(module_output)
        items[i] = new
        return type(module_output)(items)
    raise HookpointError(f"cannot replace the tensor in a {type(module_output).__name__} module output")


def input_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden-state input of a block (first positional argument or `hidden_states=`)."""
    x = kwargs.get("hidden_states") if "hidden_states" in kwargs else (args[0] if args else None)
    if not isinstance(x, torch.Tensor):
        raise HookpointError("cannot find the hidden_states input of this module")
    return x


def as_tokens(x: torch.Tensor, name: str = "hookpoint") -> tuple[torch.Tensor, tuple[int, int] | None]:
    """[B,C,H,W] -> ([B, H*W, C], (H, W)) row-major over (h, w); [B,T,d] -> (itself, None)."""
    if x.dim() == 4:
        b, c, h, w = x.shape
        return x.permute(0, 2, 3, 1).reshape(b, h * w, c), (h, w)
    if x.dim() == 3:
        return x, None
    raise HookpointError(f"hookpoint {name!r} gives a {x.dim()}-D tensor of shape {list(x.shape)}; only 3-D "
                         f"[batch, tokens, d] or 4-D [batch, channels, height, width] tensors can be captured")


def from_tokens(tokens: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:
    """Inverse of as_tokens: [B, H*W, C] -> [B, C, H, W] given the grid (H, W); 3-D passes through."""
    if grid is None:
        return tokens
    b, n, c = tokens.shape
    return tokens.reshape(b, grid[0], grid[1], c).permute(0, 3, 1, 2)


def read_tensor(hp: Hookpoint, module, args: tuple, kwargs: dict, output) -> torch.Tensor:
    """What a hookpoint reads, from a forward hook registered with `with_kwargs=True`: the module's output,
    its hidden-state input, or their difference (":update", the block's contribution to the residual)."""
    if hp.read == "output":
        return output_tensor(output, module)
    if hp.read == "input":
        return input_tensor(args, kwargs)
    return output_tensor(output, module) - input_tensor(args, kwargs)


# ---------------------------------------------------------------------------------------------------
# Hooks: every edit and capture is a named ModelHook in the module's diffusers HookRegistry, so it
# chains with diffusers' offloading / caching hooks and is removed by name.
# ---------------------------------------------------------------------------------------------------
_hook_ids = itertools.count()


def hook_name(prefix: str) -> str:
    """A registry name no other hook has: `prefix#n` (registries refuse duplicate names)."""
    return f"{prefix}#{next(_hook_ids)}"


class HookHandle:
    """Removes one named hook from a module's HookRegistry (like torch's RemovableHandle)."""

    def __init__(self, module: torch.nn.Module, name: str, hook: ModelHook):
        self.module, self.name, self.hook = module, name, hook

    def remove(self) -> None:
        registry = getattr(self.module, "_diffusers_hook", None)
        if registry is not None and self.name in registry.hooks:
            registry.remove_hook(self.name, recurse=False)
            # Stateful hooks above this module cache which children carry registries.
            registry.invalidate_child_registries_cache()
            # The registry leaves the module's own bound forward as an instance attribute once empty;
            # drop it so the module is exactly as before (any other wrapper, e.g. accelerate's, stays).
            fwd = self.module.__dict__.get("forward")
            if not registry.hooks and getattr(fwd, "__self__", None) is self.module and \
                    getattr(fwd, "__func__", None) is type(self.module).forward:
                del self.module.__dict__["forward"]


def register_hook(module: torch.nn.Module, hook: ModelHook, name: str) -> HookHandle:
    """Add `hook` to `module`'s diffusers HookRegistry under `name` (made unique); returns its handle."""
    registry = HookRegistry.check_if_exists_or_initialize(module)
    name = hook_name(name)
    registry.register_hook(hook, name)
    registry.invalidate_child_registries_cache()
    return HookHandle(module, name, hook)


def registered(module: torch.nn.Module, kind: type = ModelHook) -> dict[str, ModelHook]:
    """The hooks of type `kind` in `module`'s HookRegistry, by name, in registration order."""
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None:
        return {}
    return {n: registry.hooks[n] for n in registry._hook_order if isinstance(registry.hooks[n], kind)}


class PreForwardHook(ModelHook):
    """Calls `fn(module, args, kwargs)` before the module runs (what a torch forward pre-hook would see)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def pre_forward(self, module, *args, **kwargs):
        self.fn(module, args, kwargs)
        return args, kwargs


class EditHook(ModelHook):
    """Replaces the tensor a hookpoint reads by `edit(tensor)`.

    ":input" edits the hidden-state input before the module runs; ":update" keeps the input and replaces
    the module's contribution (output = input + edit(output - input)); otherwise the output is replaced.
    `edit` may return its argument unchanged. `straight_through` (set by eval/attack.py while it needs
    gradients): when the edited output has lost the autograd graph the module's own output had (an edit
    computed under no_grad), return x + (e - x).detach(): the edit's value, the identity's gradient.
    """

    def __init__(self, read: str, edit):
        super().__init__()
        self.read, self.edit = read, edit
        self.straight_through = False
        self._inputs: list[torch.Tensor] = []

    def pre_forward(self, module, *args, **kwargs):
        if self.read == "input":
            x = input_tensor(args, kwargs)
            new = self.edit(x)
            if new is not x:
                if "hidden_states" in kwargs:
                    kwargs = {**kwargs, "hidden_states": new}
                else:
                    args = (new, *args[1:])
        elif self.read == "update":
            self._inputs.append(input_tensor(args, kwargs))
        return args, kwargs

    def post_forward(self, module, output):
        if self.read == "input":
            return output
        h = output_tensor(output, module)
        if self.read == "output":
            new = self.edit(h)
        else:
            x_in = self._inputs.pop()
            update = h - x_in
            edited = self.edit(update)
            new = h if edited is update else x_in + edited
        if new is h:
            return output
        if self.straight_through and torch.is_grad_enabled() and h.requires_grad and not new.requires_grad \
                and new.shape == h.shape:
            new = h + (new - h).detach()
        return replace_output(output, new, module)


def register_edit(hp: Hookpoint, edit, name: str = "diffusion_sae.edit") -> HookHandle:
    """Hook `hp.module` so that the tensor the hookpoint reads is replaced by `edit(tensor)` (EditHook).

    Returns the handle that removes the hook; `handle.hook.edit` is the edit object (eval/attack.py reads it).
    """
    return register_hook(hp.module, EditHook(hp.read, edit), name)
