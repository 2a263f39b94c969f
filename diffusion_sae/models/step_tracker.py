"""Where a running pipeline call is: denoising step, timestep, and which batch rows are which branch.

The official code of SAeUron (arXiv 2501.18052) and Concept Steerers (arXiv 2501.19066) counts hook calls
to infer the step and the guidance branch, which breaks with other step counts, schedulers, batch sizes
or guidance off.
Here the step comes from the timestep value the denoiser actually receives, matched against
`pipe.scheduler.timesteps`, and the branch from how the pipeline batches: diffusers SD/SDXL/SD3
concatenate [negative; positive] when `pipe.do_classifier_free_guidance`; FLUX runs the conditional
call alone and, with true CFG, a second call inside `transformer.cache_context("uncond")`.
Text-encoder calls are labelled by comparing their input ids with the tokenized prompt and negative
prompt that the pipeline passed to `encode_prompt`.
"""
from __future__ import annotations

import functools
import inspect
import math
import weakref
from contextlib import contextmanager

import torch
from diffusers.hooks import ModelHook
from diffusers.hooks.hooks import StateManager

from .hookpoints import PreForwardHook, register_hook

_TOKENIZER_OF = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2", "text_encoder_3": "tokenizer_3"}


def _texts(x) -> list[str] | None:
    if x is None:
        return None
    return [x] if isinstance(x, str) else list(x)


def patch_attribute(obj, attr: str, fn) -> None:
    """Shadow obj.attr (a method) by the instance attribute `fn`, remembering what it shadowed."""
    fn._shadowed = obj.__dict__.get(attr)
    fn._removed = False
    obj.__dict__[attr] = fn


def unpatch_attribute(obj, attr: str, fn) -> None:
    """Undo patch_attribute, in any order among several patches of the same attribute.

    On top: the newest patch that is still wanted comes back (the class method when none is). Under
    a newer patch: `fn` is marked removed and left in that patch's chain (the wrappers here only
    observe, or split an encode into the same two calls, so a removed one changes no number), and it
    is skipped when the newer one goes.
    """
    fn._removed = True
    if obj.__dict__.get(attr) is not fn:
        return
    previous = fn._shadowed
    while previous is not None and getattr(previous, "_removed", False):
        previous = previous._shadowed
    if previous is None:
        del obj.__dict__[attr]
    else:
        obj.__dict__[attr] = previous


# pipe -> [tracker, users] for StepTracker.shared
_SHARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _ContextName(StateManager):
    """Receives the denoiser's `cache_context(name)` (diffusers hands it to every stateful hook's
    StateManager) and keeps only its name: "cond" / "uncond" on FLUX true CFG, None outside."""

    def __init__(self, tracker: "StepTracker"):
        super().__init__(dict)
        self.tracker = tracker

    def set_context(self, context) -> None:
        super().set_context(context)
        self.tracker.context_name = None if context is None else context.name


class _DenoiserHook(ModelHook):
    """Reads step, timestep and batch size from each denoiser call (ModelHook in the denoiser's registry)."""

    _is_stateful = True   # so diffusers passes it the cache context

    def __init__(self, tracker: "StepTracker"):
        super().__init__()
        self.tracker = tracker
        self.context = _ContextName(tracker)

    def pre_forward(self, module, *args, **kwargs):
        self.tracker._on_denoiser(module, args, kwargs)
        return args, kwargs

    def reset_state(self, module):
        self.tracker.context_name = None
        return module


class StepTracker:
    """Context manager; while a `pipe(...)` call runs inside it, exposes the current step and branches.

    Installed as named hooks in the diffusers HookRegistry of the denoiser and the text encoders, so the
    state is set inside their `forward`: read it from hooks on their submodules (hookpoints) or after the
    call, not from torch pre-hooks on the denoiser itself (those run before `forward`).

    Attributes (valid during a denoiser call): `step_index` (position in `pipe.scheduler.timesteps`,
    None if the timestep is not in the schedule), `timestep` (the scheduler's value), `num_steps`,
    `batch_size`; `num_prompts` (prompts in the current pipeline call, from `encode_prompt`).
    """

    def __init__(self, pipe):
        self.pipe = pipe
        self.denoiser_name = next((c for c in ("unet", "transformer")
                                   if isinstance(getattr(pipe, c, None), torch.nn.Module)), None)
        self.denoiser = getattr(pipe, self.denoiser_name) if self.denoiser_name else None
        self._handles: list = []
        self._patched: list[tuple[object, str, object]] = []
        # _locate's lookups for the schedule in use: the scheduler's timesteps tensor (held, so its id cannot be
        # reused), its version, its float64 copy and {(value, dtype): hits}. A sampling loop asks for the same
        # 25-50 values every call; recomputing each was a tenth of a steering hook's cost on a small model.
        self._ts_key: tuple | None = None
        self._ts64: torch.Tensor | None = None
        self._hit_memo: dict = {}
        self._reset_call()

    # -- state ------------------------------------------------------------------------------------
    def _reset_call(self):
        self.step_index: int | None = None
        self.timestep: float = math.nan
        self.num_steps: int | None = None
        self.batch_size: int | None = None
        self.context_name: str | None = None
        self.skip_layers = False
        self.num_prompts: int | None = None
        self._pos: dict[str, list[str]] = {}
        self._neg: dict[str, list[str]] = {}
        self._text_label: dict[str, str] = {}
        self._text_seen: dict[str, int] = {}
        self._in_call = False  # check_inputs ran and no denoiser call has happened since

    # -- install / remove -------------------------------------------------------------------------
    def __enter__(self):
        try:
            if self.denoiser is not None:
                self._handles.append(register_hook(self.denoiser, _DenoiserHook(self), "diffusion_sae.step_tracker"))
            # Observers only (they call the original with the same arguments): the prompt texts, to label
            # text-encoder calls cond / uncond by their token ids.
            for attr, from_call in (("check_inputs", True), ("encode_prompt", False)):
                if hasattr(self.pipe, attr):
                    self._patch(self.pipe, attr, self._wrap(getattr(self.pipe, attr), from_call))
            for comp in _TOKENIZER_OF:
                enc = getattr(self.pipe, comp, None)
                if isinstance(enc, torch.nn.Module):
                    self._handles.append(register_hook(enc, PreForwardHook(self._text_pre_hook(comp)),
                                                       "diffusion_sae.step_tracker.text"))
        except Exception:
            self.close()
            raise
        return self

    @classmethod
    @contextmanager
    def shared(cls, pipe):
        """The pipeline's one shared tracker: the first user installs it, the last one to leave removes it
        (in any order), so several interventions on one pipeline read one set of hooks."""
        entry = _SHARED.get(pipe)
        if entry is None:
            tracker = cls(pipe).__enter__()
            entry = _SHARED[pipe] = [tracker, 0]
        entry[1] += 1
        try:
            yield entry[0]
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                if _SHARED.get(pipe) is entry:
                    del _SHARED[pipe]
                entry[0].close()

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for obj, attr, fn in reversed(self._patched):
            unpatch_attribute(obj, attr, fn)
        self._patched.clear()

    def _patch(self, obj, attr, fn):
        patch_attribute(obj, attr, fn)
        self._patched.append((obj, attr, fn))

    # -- denoiser ---------------------------------------------------------------------------------
    def _on_denoiser(self, module, args, kwargs):
        self._in_call = False
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        x = kwargs.get("hidden_states", kwargs.get("sample", args[0] if args else None))
        self.batch_size = int(x.shape[0]) if isinstance(x, torch.Tensor) else None
        self.skip_layers = kwargs.get("skip_layers") is not None
        self.step_index, self.timestep = self._locate(t)
        return None

    def _locate(self, t) -> tuple[int | None, float]:
        timesteps = getattr(self.pipe.scheduler, "timesteps", None)
        if t is None or timesteps is None or len(timesteps) == 0:
            return None, math.nan
        value = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)
        low = isinstance(t, torch.Tensor) and t.is_floating_point() and t.element_size() < 4
        key = (timesteps, getattr(timesteps, "_version", None), len(timesteps))
        if self._ts_key is None or self._ts_key[0] is not timesteps or self._ts_key[1:] != key[1:]:
            self._ts_key, self._hit_memo = key, {}
            self._ts64 = torch.as_tensor(timesteps).detach().to("cpu", torch.float64)
        ts = self._ts64
        self.num_steps = len(ts)
        memo = (value, t.dtype if low else None)
        if memo not in self._hit_memo:
            self._hit_memo[memo] = self._hits(ts, value, t.dtype if low else None)
        hits, v = self._hit_memo[memo]
        if hits:
            return self._pick(hits), float(ts[self._pick(hits)])
        return None, v

    @staticmethod
    def _hits(ts: torch.Tensor, value: float, low_dtype) -> tuple[list[int], float]:
        """Indices of the schedule entries that `value` names, and the value as the denoiser sees the scale."""
        # A half-precision pipeline passes the timestep rounded to its dtype (FLUX in bf16: 0.75 -> 0.7539):
        # match within that dtype's resolution, and take the nearest scheduler timestep.
        low = low_dtype is not None
        rtol = 2 * torch.finfo(low_dtype).eps if low else 1e-5
        # SD/SDXL/SD3 pass the scheduler timestep; FLUX passes timestep / 1000.
        for scale in (1.0, 1000.0):
            v = torch.tensor(value * scale, dtype=torch.float64)
            hits = torch.nonzero(torch.isclose(ts, v, rtol=rtol, atol=1e-3 * scale / 1000))
            hits = [int(i) for i in hits.flatten()]
            if hits and low:
                best = min(abs(float(ts[i]) - float(v)) for i in hits)
                hits = [i for i in hits if abs(float(ts[i]) - float(v)) == best]
            if hits:
                return hits, value
        return [], value

    def _pick(self, hits: list[int]) -> int:
        if len(hits) == 1:
            return hits[0]
        # Repeated timesteps (Heun, PNDM): the scheduler's own step counter says which occurrence this is.
        sched = self.pipe.scheduler
        si = getattr(sched, "step_index", None)
        if si is None:
            si = getattr(sched, "begin_index", None) or 0
        return si if si in hits else hits[0]

    def branches(self, batch_size: int | None = None) -> dict[str, slice]:
        """Rows of the current denoiser batch for each guidance branch ("uncond", "cond", "cond_skip")."""
        b = batch_size if batch_size is not None else self.batch_size
        if self.context_name in ("cond", "uncond"):  # FLUX: one branch per call
            return {self.context_name: slice(0, b)}
        if self.skip_layers:  # SD3 skip-layer guidance: an extra conditional call with layers skipped
            return {"cond_skip": slice(0, b)}
        if bool(getattr(self.pipe, "do_classifier_free_guidance", False)) and b % 2 == 0:
            return {"uncond": slice(0, b // 2), "cond": slice(b // 2, b)}
        return {"cond": slice(0, b)}

    # -- prompts and text encoders ----------------------------------------------------------------
    def _record_texts(self, bound: dict) -> None:
        pos = [_texts(bound.get(k)) for k in ("prompt", "prompt_2", "prompt_3")]
        first = next((p for p in pos if p), None)
        if first is not None:
            self.num_prompts = len(first)
        elif isinstance(bound.get("prompt_embeds"), torch.Tensor):
            self.num_prompts = int(bound["prompt_embeds"].shape[0]) // int(bound.get("num_images_per_prompt") or 1)
        n = self.num_prompts or 1
        neg = [bound.get(k) for k in ("negative_prompt", "negative_prompt_2", "negative_prompt_3")]
        # A single negative string applies to every row; diffusers' default negative prompt is "".
        neg = [[x] * n if isinstance(x, str) else _texts(x) for x in neg]
        self._pos = {"all": [tuple(p) for p in pos if p]}
        self._neg = {"all": [tuple(p) for p in neg if p] + [tuple([""] * n)]}
        self._text_seen = {}

    def _wrap(self, original, from_call: bool):
        sig = inspect.signature(original)

        # functools.wraps: a wrapper stacked on this one (a steering's) reads the real signature through it.
        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            try:
                bound = sig.bind_partial(*args, **kwargs).arguments
            except TypeError:
                bound = {}
            # check_inputs sees the call's prompt and negative prompt together; encode_prompt alone may
            # be handed the negative prompt as `prompt` (FLUX true CFG), so it only counts when called
            # outside a pipeline call (e.g. to encode prompts directly).
            if from_call or not self._in_call:
                self._record_texts(bound)
                self._in_call = from_call
            return original(*args, **kwargs)
        return wrapper

    def _text_pre_hook(self, comp: str):
        def hook(module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            self._text_label[comp] = self._classify_text(comp, ids)
            self._text_seen[comp] = self._text_seen.get(comp, 0) + 1
            return None
        return hook

    def _classify_text(self, comp: str, ids) -> str:
        tok = getattr(self.pipe, _TOKENIZER_OF[comp], None)
        do_cfg = bool(getattr(self.pipe, "do_classifier_free_guidance", False))
        if not isinstance(ids, torch.Tensor) or tok is None or not self._pos:
            return "cond" if not do_cfg else "unknown"

        def matches(groups) -> bool:
            for texts in groups:
                if len(texts) != ids.shape[0]:
                    continue
                ref = tok(list(texts), padding="max_length", max_length=ids.shape[1], truncation=True,
                          add_special_tokens=True, return_tensors="pt").input_ids
                if ref.shape == ids.shape and torch.equal(ref, ids.cpu()):
                    return True
            return False

        is_pos, is_neg = matches(self._pos["all"]), matches(self._neg["all"])
        if is_pos and is_neg:  # prompt == negative prompt: diffusers encodes the prompt first
            return "cond" if self._text_seen.get(comp, 0) == 0 else "uncond"
        if is_pos:
            return "cond"
        if is_neg:
            return "uncond"
        return "cond" if not do_cfg else "unknown"

    def text_branch(self, component: str) -> str:
        """Branch of the text-encoder call now running in `component` ("cond", "uncond" or "unknown")."""
        return self._text_label.get(component, "unknown")

    def images_per_prompt(self, rows: int) -> int:
        """Rows of one branch per prompt (num_images_per_prompt), from the prompt count of the call."""
        if self.num_prompts and rows % self.num_prompts == 0:
            return rows // self.num_prompts
        return 1
