"""SAeUron: unlearn concepts by scaling their timestep-specific SAE features in a denoiser block.

At every denoiser call the block output x (every patch token, both guidance halves) is encoded
with per-token TopK. For each concept c, the latents F_c(t) selected for the current step t are
rescaled where they fire above the all-concept average ν_j(t):

    z'_j = z_j · γ_c · μ_c,j(t)    if j ∈ F_c(t) and z_j > ν_j(t),   else z'_j = z_j

(the scale is γ·μ, an activation-scaled factor, exactly as the official code and the paper do it —
the official SAeUron repository; γ < 0 flips the feature). `scaling="latent"` uses z'_j = γ_c · z_j
instead: a dimensionless knob (γ = 0 deletes the feature, γ = −1 flips it) whose meaning does not
depend on how large the concept's mean activation happens to be at step t. The block output becomes

    x_out = x + W_dec (z' − z)                       (ours: the SAE error is kept as is)
    x_out = W_dec z' + b_dec + (x̂ − x)               (faithful=True: the official sign, = x + Δ − 2e)

so with nothing selected, ours returns x exactly while the faithful mode changes every patch.
Several blocks at once: pass lists of SAEs and dictionaries (one per block); every block gets the
same edits, each with its own per-step feature selection (a concept that a model spreads over
several cross-attention blocks is only removed when all of them are edited).

`selection="specific"` (ours, concepts/dictionary.py) ranks latents by how far the concept's patches
rise above the other concepts' per-patch q-quantile and uses that quantile as the firing bar, so an
edit touches at most 1 − q of the other concepts' patches; "paper" is the official s_c with bar ν.
The step t is the pipeline's real step (read from the timestep the denoiser receives, via
StepTracker), and the dictionary's step grid must equal the sampler's.

`min_fire=m` (ours, default 1 = the paper) edits a patch for concept c only where at least m of c's
selected features fire above their bars together: one feature of c crossing its bar on another
concept's patch is common, several at once much rarer.

`exclusive=True` (ours) is for several concepts at once: on a patch where several concepts' features
fire, only the concept with the most firing features is edited. On ShapesCanvas, unlearning dotted and
checkered together broke wavy (each edit alone left it intact; their flips summed on wavy patches did not).

Any read mode works: an SAE trained on a block's `:update` (or `:input`) edits that tensor, so an SAE on
a cross-attention layer's own output (`…transformer_blocks.0.attn2`, what the text writes into the
image tokens) edits only the text-injected part of the block.

`edit="replace"` (ours, "detect-then-replace") keeps the detection (selection, bars, evidence gate,
window) but sets each firing selected latent to a concept-free reference value instead of scaling it:

    z'_j = ref_c,j(t) = mean over the other concepts c' ≠ c of μ_c',j(t)

The scale edit with γ < 0 flips a feature to a large negative value that no real patch ever encodes, which
pushes the block output off the activation manifold (and changes images whose plain version never showed
the concept where the gate misfires); the replacement is a value the other concepts' patches do produce on
average, so a misfire moves a patch only by the feature's own excess. The multiplier is ignored by replace.

Two patch-level replacements (ours) keep the same detection but replace the whole token vector of a patch
where the gate fires, so neither the SAE error term nor the latents outside the selected set survive there:

    edit="replace_patch":  x_out = W_dec z' + b_dec   (z' = the patch's code with the firing selected latents
                           set to ref_c(t), as "replace"; the reconstruction error x − x̂ is dropped)
    edit="mean_patch":     x_out = W_dec ref_c(t) + b_dec   (the decoding of the other concepts' mean code: the
                           mean block output of their patches at step t, up to the error term's mean)

(both in the SAE's units: a per-token normalising SAE de-normalises with the patch's own statistics). A patch
replaced whole by mean_patch takes no other concept's edit; with several concepts firing on one patch the
order of precedence is mean_patch, then replace_patch, then the code-level edits with the error kept.
What these edits do on the bundled model (tuning-split sweeps) is in the README's SAeUron paragraph.

`ConceptEdit.detector` (ours): an image-side verdict per sample (e.g. `concepts.probe.ConceptDetector`, read
at its step on its guidance branch). With one, the concept's edits act only on the samples it flags, and
only after its step (none before: the verdict is not in yet), whatever the prompt says. A seed that is
not heading to the concept is then generated as the plain model draws it, so a misfiring feature on
another concept's patch cannot change it. Several detectors (a tuple) gate with "any of them": each
opens the edit on the samples it flags from the step after its own. A probe of the conditional branch
at an early step knows what the prompt asks for before the image has decided (named, paraphrased or
adversarial prompts), and one of the unconditional branch later catches the samples of prompts that
never ask for the concept.

`ConceptEdit.rewind` (ours, with a detector): a verdict that comes late leaves the steps before it unedited, and an
object's layout is decided early. `interventions.rewind.generate(pipe, ...)` (in place of `pipe(...)`) generates
once with the gate, then denoises again, from its own first latent and with the edit from its first step, every
sample a rewinding edit's detectors flagged only after that step; the rest keep the gated images.

`mode="add"` runs the opposite direction: z'_j = z_j + α · μ_c,j(t) on every patch for the
selected latents, which paints a concept in even where it does not fire (e.g. from an empty
prompt); several concepts add up.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..concepts.dictionary import ConceptDictionary, DictionaryError
from ..concepts.probe import branch_rows
from ..errors import DiffusionSAEError
from ..models import StepTracker, as_tokens, from_tokens, register_edit, resolve_hookpoint
from .rewind import open_gate


def _sync_free(x: torch.Tensor) -> bool:
    """Whether the scale edit takes its path without host-device syncs (on accelerators; on the CPU the
    row subset is cheaper because nothing waits)."""
    return x.device.type != "cpu"


class StepGridError(DiffusionSAEError, ValueError):
    """The dictionary was built on another step grid than the sampler uses."""


EDITS = ("scale", "replace", "replace_patch", "mean_patch")   # ConceptEdit.edit
PATCH_EDITS = ("replace_patch", "mean_patch")              # replace the whole token where the gate fires


@dataclass
class ConceptEdit:
    concept: str
    multiplier: float = -1.0          # γ (ablate) or α (add)
    percentile: float | None = None
    top_n: int | None = None
    scaling: str = "mean"             # "mean": z·γ·μ_c(t) (official); "latent": z·γ
    selection: str = "paper"          # "paper": s_c and bar ν; "specific": excess_c and the others' quantile
    # Evidence gate (ours): edit a patch only where at least this many of the concept's selected features
    # fire above their bars together. 1 is the paper's rule (every firing feature is edited on its own).
    min_fire: int = 1
    # Several concepts at once (ours): on a patch where several exclusive edits fire, only the one with
    # the most firing features is applied (a patch shows one style; two concepts' flips summed on it break
    # a third concept that each alone leaves intact).
    exclusive: bool = False
    # Timestep window (ours): edit only at denoising steps start <= t < stop (step indices, 0 = the first,
    # noisiest step); None edits every step as the paper does. The concept's layout is decided early and its
    # texture late, so a window trades removal against how much of the rest of the image moves.
    window: tuple[int, int] | None = None
    # How a firing selected latent is edited: "scale" (the paper's z·γ·μ or z·γ) or "replace" (ours: set it
    # to the concept-free reference, the other concepts' mean activation at the step; γ is ignored);
    # "replace_patch" / "mean_patch" (ours) replace the firing patch's whole token (module docstring).
    edit: str = "scale"
    # Per-sample gate (ours): a callable with .hookpoint and .step (ConceptDetector) flagging the samples to
    # edit from the step after its own on, or a tuple of them (a sample any of them flagged is edited from
    # the step after that detector's); None edits every sample.
    detector: object | None = None
    # Rewind (ours, needs a detector): a sample its detectors flagged only after the edit's first step has missed
    # the steps before the verdict; `interventions.rewind.generate` denoises such samples again from their first
    # latent with the edit from its first step on (a second pass over those samples; plain `pipe(...)` cannot).
    rewind: bool = False

    @property
    def detectors(self) -> tuple:
        if self.detector is None:
            return ()
        return tuple(self.detector) if isinstance(self.detector, (list, tuple)) else (self.detector,)

    def __post_init__(self):
        if self.percentile is None and self.top_n is None:
            self.top_n = 1
        if not isinstance(self.min_fire, int) or isinstance(self.min_fire, bool) or self.min_fire < 1:
            raise DictionaryError(f"min_fire must be a positive integer (features firing together), not {self.min_fire!r}")
        if self.scaling not in ("mean", "latent"):
            raise DictionaryError(f"scaling must be 'mean' (z·γ·μ, official) or 'latent' (z·γ), not {self.scaling!r}")
        if self.window is not None:
            w = tuple(self.window)
            if len(w) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in w) or not 0 <= w[0] < w[1]:
                raise DictionaryError(f"window must be two step indices (start, stop) with 0 <= start < stop, not {self.window!r}")
            self.window = w
        if self.selection not in ("paper", "specific"):
            raise DictionaryError(f"selection must be 'paper' (official scores, bar ν) or 'specific' (per-patch "
                                  f"specificity), not {self.selection!r}")
        if isinstance(self.detector, (list, tuple)) and not self.detector:
            raise DictionaryError("detector: give a detector, a tuple of detectors, or None (an empty tuple gates nothing)")
        for det in self.detectors:
            if not (callable(det) and isinstance(getattr(det, "hookpoint", None), str)
                    and isinstance(getattr(det, "step", None), int)):
                raise DictionaryError(f"detector must be a callable with .hookpoint and .step (e.g. "
                                      f"ConceptProbe.detector(concept)) or a tuple of them, not {det!r}")
        if self.rewind and not self.detectors:
            raise DictionaryError(f"rewind=True ({self.concept}) redoes the samples a detector flagged late: give the "
                                  "edit a detector")
        if self.edit not in EDITS:
            raise DictionaryError(f"edit must be 'scale' (z·γ·μ or z·γ, the paper) or 'replace' (set the firing "
                                  f"features to the other concepts' mean), 'replace_patch' (that code decoded "
                                  f"without the SAE error) or 'mean_patch' (the other concepts' mean patch), "
                                  f"not {self.edit!r}")


def _as_edits(concepts, multiplier, percentile, top_n, scaling="mean", selection="paper",
              min_fire=1, exclusive=False, window=None, edit="scale") -> list[ConceptEdit]:
    if isinstance(concepts, (str, ConceptEdit)):
        concepts = [concepts]
    edits = []
    for c in concepts:
        if isinstance(c, ConceptEdit):
            edits.append(c)
        else:
            edits.append(ConceptEdit(str(c), multiplier, percentile, top_n if percentile is None else None, scaling,
                                     selection, min_fire, exclusive, window, edit))
    if not edits:
        raise DictionaryError("no concept to unlearn given")
    return edits


def reference_means(dictionary: ConceptDictionary, concept: str) -> torch.Tensor:
    """ref_c(t) of edit="replace" (and "replace_patch", "mean_patch"): the mean over the other concepts (each weighted equally, as ν and the
    'specific' bars weight them) of their per-step mean activations μ_c',j(t), [S, L].

    The dictionary's means are patch means with the zeros included (a latent TopK dropped on a patch counts
    as 0), so ref is what a latent contributes to an average patch of another concept, not its typical value
    where it fires. A "mean where active" would need the firing rate, which the dictionary does not keep (the
    per-patch histograms are reduced to bars and excess at build time); and the zero-inclusive mean is the
    better reference anyway: it is the least-squares estimate of z_j on a concept-free patch, so a firing
    feature is brought back to what the rest of the dictionary looks like on average rather than to another
    concept's firing level.
    """
    c = dictionary.index(concept)
    if len(dictionary.concepts) < 2:
        raise DictionaryError(f"edit='replace' (or a patch replacement) needs other concepts in the dictionary at {dictionary.hookpoint} "
                              f"for its reference; it holds only {concept!r}")
    means = dictionary.means.float()
    keep = torch.ones(means.shape[0], dtype=torch.bool)
    keep[c] = False
    return means[keep].mean(0)


class SAeUronHook:
    """Precomputed per-step tables (selected mask, scale, offset, bar) and the forward hook itself.

    A firing selected latent becomes z·scale + offset: (γ·μ or γ, 0) for edit="scale", (0, ref) for
    edit="replace", "replace_patch" and "mean_patch" (0·z + ref is ref exactly for the non-negative, finite z of
    a TopK SAE). `patch[e]`: 0 keeps the patch's SAE error, 1 (replace_patch) drops it, 2 (mean_patch) replaces
    the patch by decode_dense(ref_e[t]) (`ref_dense`, [E, S, L], zero for the other edits)."""

    def __init__(self, sae, dictionary: ConceptDictionary, edits: list[ConceptEdit], mode: str = "ablate",
                 faithful: bool = False):
        if mode not in ("ablate", "add"):
            raise ValueError(f"mode must be 'ablate' or 'add', not {mode!r}")
        L = sae.cfg.num_latents
        if dictionary.means.shape[-1] != L:
            raise DictionaryError(f"dictionary has {dictionary.means.shape[-1]} latents but the SAE has {L}: "
                                  "build the dictionary with this SAE")
        replace = [e for e in edits if e.edit != "scale"]
        if replace and (faithful or mode != "ablate"):
            raise DictionaryError(f"edit={replace[0].edit!r} ({replace[0].concept}) is an ablation of ours: use it "
                                  "with mode='ablate' and faithful=False (the official sign-flipped path and 'add' "
                                  "scale features)")
        self.sae, self.dictionary, self.edits, self.mode, self.faithful = sae, dictionary, edits, mode, faithful
        S = len(dictionary.timesteps)
        nu = dictionary.average()
        # One (selected, scale, bar) table per concept. Several concepts: the union of their edits, each
        # feature scaled by its own concept's γ·μ_c where that concept's rule fires (a latent picked by two
        # concepts that both fire keeps the later one's scale, deterministically).
        self.features: dict[str, list[list[int]]] = {}
        E = len(edits)
        selected = torch.zeros(E, S, L, dtype=torch.bool)
        scale = torch.ones(E, S, L)
        offset = torch.zeros(E, S, L)
        bar = nu.float().expand(E, S, L).clone()
        ref_dense = torch.zeros(E, S, L) if any(e.edit == "mean_patch" for e in edits) else None
        for i, e in enumerate(edits):
            c = dictionary.index(e.concept)
            idx = dictionary.select(e.concept, percentile=e.percentile, top_n=e.top_n, method=e.selection)
            self.features[e.concept] = [ids.tolist() for ids in idx]
            mu = dictionary.means[c].float()
            ref = reference_means(dictionary, e.concept) if e.edit != "scale" else None
            if e.selection == "specific":
                bar[i] = dictionary.concept_bar(e.concept).float()
            for t, ids in enumerate(idx):
                if e.window is not None and not e.window[0] <= t < e.window[1]:
                    continue
                selected[i, t, ids] = True
                if e.edit == "mean_patch":
                    ref_dense[i, t] = ref[t]
                if ref is None:
                    scale[i, t, ids] = e.multiplier * (mu[t, ids] if e.scaling == "mean" else 1.0)
                else:
                    scale[i, t, ids] = 0.0
                    offset[i, t, ids] = ref[t, ids]
        dev, dt = sae.device, sae.dtype
        self.selected, self.scale, self.bar = selected.to(dev), scale.to(dev, dt), bar.to(dev, dt)  # [E, S, L]
        self.offset = offset.to(dev, dt)
        self.replace = bool(replace)
        self.patch = [PATCH_EDITS.index(e.edit) + 1 if e.edit in PATCH_EDITS else 0 for e in edits]
        self.ref_dense = ref_dense.to(dev, dt) if ref_dense is not None else None
        self.min_fire = [e.min_fire for e in edits]
        self.exclusive = torch.tensor([e.exclusive for e in edits], device=dev)
        self.tracker: StepTracker | None = None
        self.checked = False
        # ConceptEdit.detector: the verdicts live in one SampleVerdicts shared by every block's hook
        self.verdicts: SampleVerdicts | None = None

    def check_grid(self, pipe) -> None:
        want = [float(t) for t in self.dictionary.timesteps]
        have = [float(t) for t in pipe.scheduler.timesteps]
        if len(want) != len(have) or any(abs(a - b) > 1e-3 * max(1.0, abs(a)) for a, b in zip(want, have)):
            raise StepGridError(
                f"the concept dictionary for {self.dictionary.hookpoint} was built on {len(want)} steps "
                f"(timesteps {want[0]:g}..{want[-1]:g}) but the sampler runs {len(have)} "
                f"({have[0]:g}..{have[-1]:g}): generate with num_inference_steps={len(want)} and the same "
                f"scheduler ({self.dictionary.meta.get('scheduler', '?')}), or rebuild the dictionary")

    @torch.no_grad()
    def edit_tokens(self, x: torch.Tensor, t: int, allowed: list | None = None) -> torch.Tensor:
        """x: [N, d] block-output tokens at step t -> edited tokens. allowed[e]: None (edit e may touch every
        token) or a bool [N] (the tokens of the samples its detector flagged)."""
        sae = self.sae
        if self.selected.device != x.device:
            # An SAE left on the CPU under a GPU pipeline: its encode/decode return results on the
            # activations' device, so the selection tables follow them there (once).
            self.selected, self.scale, self.offset, self.bar, self.exclusive = (
                t_.to(x.device) for t_ in (self.selected, self.scale, self.offset, self.bar, self.exclusive))
            if self.ref_dense is not None:
                self.ref_dense = self.ref_dense.to(x.device)
        xs = x.to(sae.dtype)
        # faithful: per-token TopK(k) as the official loader encodes (ours: the SAE's own inference encoding,
        # the calibrated threshold for a BatchTopK SAE)
        acts, idx = sae.encode_topk(xs) if self.faithful else sae.encode(xs)
        if self.mode == "ablate":
            fires = []
            for e in range(len(self.min_fire)):
                f = self.selected[e, t][idx] & (acts > self.bar[e, t][idx])        # [N, k]
                if self.min_fire[e] > 1:
                    f &= (f.sum(-1, keepdim=True) >= self.min_fire[e])
                if allowed is not None and allowed[e] is not None:
                    f &= allowed[e].to(f.device)[:, None]
                fires.append(f)
            if len(fires) > 1 and bool(self.exclusive.any()):
                counts = torch.stack([f.sum(-1) for f in fires])                    # [E, N]
                winner = counts.masked_fill(~self.exclusive[:, None], -1).argmax(0)  # first on ties
                fires = [f & (winner == e)[:, None] if self.exclusive[e] else f for e, f in enumerate(fires)]
            fire = torch.zeros_like(idx, dtype=torch.bool)
            new = acts
            for e, f in enumerate(fires):
                val = acts * self.scale[e, t][idx]
                if self.replace:                     # scale-only hooks keep the paper's arithmetic bit for bit
                    val = val + self.offset[e, t][idx]
                new = torch.where(f, val, new)
                fire |= f
            if self.faithful:
                recon_new = sae.decode(new, idx, x=xs)
                recon_old = sae.decode(acts, idx, x=xs)
                return (recon_new + (recon_old - xs)).to(x.dtype)
            delta = new - acts
            touched = fire.any(-1)
            if not any(self.patch) and _sync_free(x):
                # On a GPU, asking which rows fired (touched.any(), nonzero) makes the host wait for the device
                # at every step, and the UNet's later kernels queue up behind that wait. Decoding every row's
                # change (zero where nothing fired) needs no answer from the device; untouched rows keep x.
                d = sae.decode_change(delta, idx, x=xs)
                return torch.where(touched[:, None], (xs + d).to(x.dtype), x)
            if not bool(touched.any()):
                return x
            out = x.clone()
            rows = touched.nonzero().flatten()
            if not any(self.patch):
                d = sae.decode_change(delta[rows], idx[rows], x=xs[rows])
                out[rows] = (xs[rows] + d).to(x.dtype)
                return out
            # Patch replacements: which rows drop the SAE error (replace_patch) or become the reference patch
            # (mean_patch, the last firing such edit wins; it overrides every other edit of the patch).
            xr, ir, nr = xs[rows], idx[rows], new[rows]
            drop = torch.zeros(len(rows), dtype=torch.bool, device=rows.device)
            mean_of = torch.full((len(rows),), -1, dtype=torch.long, device=rows.device)
            for e, f in enumerate(fires):
                if self.patch[e]:
                    fr = f[rows].any(-1)
                    if self.patch[e] == 1:
                        drop |= fr
                    else:
                        mean_of = torch.where(fr, e, mean_of)
            keep = ~drop & (mean_of < 0)
            y = xr.clone()
            if bool(keep.any()):
                y[keep] = xr[keep] + sae.decode_change(delta[rows][keep], ir[keep], x=xr[keep])
            dr = drop & (mean_of < 0)
            if bool(dr.any()):
                y[dr] = sae.decode(nr[dr], ir[dr], x=xr[dr])          # x̂(z'): the error x − x̂(z) is dropped
            for e in sorted(set(mean_of[mean_of >= 0].tolist())):
                m = mean_of == e
                y[m] = sae.decode_dense(self.ref_dense[e, t].expand(int(m.sum()), -1), add_bias=True, x=xr[m])
            out[rows] = y.to(x.dtype)
            return out
        # mode == "add": every patch gets α μ_c,j(t) (or α, scaling="latent") of each selected latent.
        add = torch.where(self.selected[:, t], self.scale[:, t], torch.zeros_like(self.scale[:, t])).sum(0)
        d = sae.decode_dense(add[None].expand(xs.shape[0], -1), add_bias=False, x=xs)
        return (xs + d).to(x.dtype)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        """Edit the tensor the block's hookpoint reads ([B,C,H,W] or [B,T,d]) at the current step."""
        tr = self.tracker
        t = tr.step_index if tr is not None else None
        if t is None:
            raise StepGridError(f"timestep {getattr(tr, 'timestep', '?')} is not in the sampler's schedule: "
                                "SAeUron needs the pipeline's denoising step")
        if not self.checked:
            self.check_grid(tr.pipe)
            self.checked = True
        tok, grid = as_tokens(h)
        b, n, d = tok.shape
        allowed = None
        if self.verdicts is not None:
            rows = self.verdicts.rows_allowed(t, b)          # per edit: None or bool [b]
            if all(r is not None and not bool(r.any()) for r in rows):
                return h                                      # no sample to edit at this step
            if all(r is not None for r in rows):
                keep = torch.stack(rows).any(0)
                if not bool(keep.all()):
                    # Encode only the rows of flagged samples: the others cannot change, and the SAE encode is
                    # most of the hook's cost (a prompt that names the concept flags 1 sample in a batch of 4).
                    sel = keep.nonzero().flatten().to(tok.device)
                    sub = tok[sel]
                    flat = sub.reshape(-1, d)
                    new = self.edit_tokens(flat, t, [r[keep].repeat_interleave(n) for r in rows])
                    if new is flat:
                        return h
                    out = tok.clone()
                    out[sel] = new.reshape(len(sel), n, d)
                    return from_tokens(out, grid)
            allowed = [None if r is None else r.repeat_interleave(n) for r in rows]
        flat = tok.reshape(b * n, d)
        new = self.edit_tokens(flat, t, allowed)
        return h if new is flat else from_tokens(new.reshape(b, n, d), grid)


class SampleVerdicts:
    """The per-sample verdicts of the edits' detectors (ConceptEdit.detector) for the current generation.

    `observe(i, h)` is a block hook: at detector i's step it flags the samples from the rows of its branch
    (unconditional by default; the conditional ones without guidance). `rows_allowed(t, rows)` gives, per
    edit, None (no detector) or the rows of a denoiser batch its edit may touch at step t: the rows (both
    guidance halves) of the samples flagged by any of its detectors whose step is before t; none before
    the first verdict is in. A generation restarts at step 0 and forgets the verdicts of the previous one."""

    def __init__(self, detectors: list, edit_detector: list[tuple[int, ...] | None], tracker: StepTracker,
                 edits: list[ConceptEdit]):
        self.detectors, self.edit_detector, self.tracker = detectors, edit_detector, tracker
        self.edits = list(edits)
        self.flags: list[torch.Tensor | None] = [None] * len(detectors)
        # Rewind's second pass (interventions.rewind): per edit, None or the samples to edit from the edit's first
        # step whatever the detectors say.
        self.forced: list[torch.Tensor | None] = [None] * len(edit_detector)

    @property
    def rewinds(self) -> bool:
        """Whether any edit asks for the rewind (interventions.rewind.generate reads only such gates)."""
        return any(e.rewind for e in self.edits)

    def rewind_rows(self) -> list:
        """Per edit: the samples rewind redoes for it (its late-flagged ones), or None (no rewind, no verdict)."""
        return [self.late_samples(e) if edit.rewind else None for e, edit in enumerate(self.edits)]

    def late_samples(self, e: int) -> torch.Tensor | None:
        """The samples of the last generation that edit e's detectors flagged after its first step, so that it
        missed steps it would have edited (bool [samples]), or None when no verdict is in."""
        first = self.edits[e].window[0] if self.edits[e].window else 0
        idx = self.edit_detector[e] or ()
        early = late = None
        for i in idx:
            f = self.flags[i]
            if f is None:
                continue
            # a sample flagged at detector step s is edited from step s + 1
            if self.detectors[i].step + 1 <= first:
                early = f if early is None else early | f
            else:
                late = f if late is None else late | f
        if late is None:
            return None
        return late & ~early if early is not None else late

    def observe(self, i: int, h: torch.Tensor) -> torch.Tensor:
        det, tr = self.detectors[i], self.tracker
        t = tr.step_index
        if t is None:
            return h
        if t < det.step:
            self.flags[i] = None
        elif t == det.step:
            tok, _ = as_tokens(h)
            br = tr.branches(tok.shape[0])
            self.flags[i] = det(tok[branch_rows(br, getattr(det, "branch", "uncond"))]).flatten().bool().cpu()
        return h

    def rows_allowed(self, t: int, rows: int) -> list:
        out: list = []
        for idx in self.edit_detector:
            if idx is None:
                out.append(None)
                continue
            allowed = torch.zeros(rows, dtype=torch.bool)
            forced = self.forced[len(out)]
            if forced is not None:
                if rows % len(forced):
                    raise StepGridError(f"rewind: the block has {rows} rows for {len(forced)} samples")
                allowed |= forced.repeat(rows // len(forced))
            for i in idx:
                f = self.flags[i]
                if f is None or t <= self.detectors[i].step:
                    continue
                if rows % len(f):
                    raise StepGridError(f"detector: the block has {rows} rows for {len(f)} detected samples; generate "
                                        "with the batch the detector read")
                allowed |= f.repeat(rows // len(f))
            out.append(allowed)
        return out




def block_pairs(sae, dictionary) -> list[tuple]:
    """[(sae, dictionary), ...] from one SAE and dictionary or from parallel lists (one per block)."""
    saes = list(sae) if isinstance(sae, (list, tuple)) else [sae]
    dicts = list(dictionary) if isinstance(dictionary, (list, tuple)) else [dictionary]
    if len(saes) != len(dicts) or not saes:
        raise DictionaryError(f"give one concept dictionary per SAE: got {len(saes)} SAEs and {len(dicts)} dictionaries")
    hps = [d.hookpoint for d in dicts]
    if len(set(hps)) != len(hps):
        raise DictionaryError(f"two dictionaries for the same block {hps}: give each block once")
    return list(zip(saes, dicts))


@contextlib.contextmanager
def unlearn_concepts(pipe, sae, dictionary, concepts, multiplier: float = -1.0,
                     percentile: float | None = None, top_n: int | None = None, faithful: bool = False,
                     mode: str = "ablate", scaling: str = "mean", selection: str = "paper", min_fire: int = 1,
                     exclusive: bool = False, window: tuple[int, int] | None = None, edit: str = "scale"):
    """Within the block, `pipe(...)` generates with the concepts' features scaled at the block(s).

    `sae` / `dictionary`: one SAE and its concept dictionary, or lists of them (one per block).
    `concepts`: a name, a list of names (sharing multiplier / selection / scaling), or ConceptEdit
    objects (each with its own γ, selection and window). `window` (start, stop): edit the named concepts
    only at step indices start <= t < stop (ConceptEdit.window). `edit`: "scale" (the paper) or "replace"
    (set firing features to the other concepts' mean, ConceptEdit.edit; needs faithful=False, mode="ablate"),
    "replace_patch" / "mean_patch" (replace the firing patch's whole token; module docstring). Yields the hook (one block) or the list
    of hooks. Hooks are removed on exit, also when generation raises.
    """
    pairs = block_pairs(sae, dictionary)
    edits = _as_edits(concepts, multiplier, percentile, top_n, scaling, selection, min_fire, exclusive, window, edit)
    detectors: list = []
    edit_detector: list[tuple[int, ...] | None] = []
    for e in edits:
        if not e.detectors:
            edit_detector.append(None)
            continue
        if faithful or mode != "ablate":
            raise DictionaryError(f"a detector ({e.concept}) gates our ablation: use it with mode='ablate' and "
                                  "faithful=False")
        for det in e.detectors:
            if resolve_hookpoint(pipe, det.hookpoint).kind != "denoiser":
                raise DictionaryError(f"detector hookpoint {det.hookpoint!r} ({e.concept}) is not a denoiser block")
            if det not in detectors:
                detectors.append(det)
        edit_detector.append(tuple(detectors.index(d) for d in e.detectors))
    hooks, targets = [], []
    for s_, d_ in pairs:
        hp = resolve_hookpoint(pipe, d_.hookpoint)
        if hp.kind != "denoiser":
            raise DictionaryError(f"{d_.hookpoint!r} is not a denoiser block")
        if hp.width is not None and hp.width != s_.cfg.d_in:
            raise DictionaryError(f"SAE width {s_.cfg.d_in} != width {hp.width} of block {hp.name!r}")
        hooks.append(SAeUronHook(s_, d_, edits, mode, faithful))
        targets.append(hp)
    with StepTracker.shared(pipe) as tracker:
        verdicts = SampleVerdicts(detectors, edit_detector, tracker, edits) if detectors else None
        for h in hooks:
            h.tracker = tracker
            h.verdicts = verdicts
        handles = []
        with contextlib.ExitStack() as opened:
            if verdicts is not None:
                opened.enter_context(open_gate(pipe, verdicts))
            # The SAE edits what it was trained on: the block's output, input or update (":input" / ":update").
            try:
                for h, hp in zip(hooks, targets):
                    handles.append(register_edit(hp, h, "diffusion_sae.saeuron"))
                if verdicts is not None:
                    for i, det in enumerate(detectors):
                        handles.append(register_edit(resolve_hookpoint(pipe, det.hookpoint),
                                                     lambda x, i=i, v=verdicts: v.observe(i, x),
                                                     f"diffusion_sae.saeuron_detector.{i}"))
                yield hooks[0] if len(hooks) == 1 else hooks
            finally:
                for handle in handles:
                    handle.remove()
