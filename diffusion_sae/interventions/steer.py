"""Concept Steerers: steer a text-encoder layer with a k-SAE (arXiv 2501.19066).

A concept prompt c is encoded by the pipeline's own text encoder; its layer output H_c [T, d] goes
through the SAE *without* TopK and is decoded *without* the decoder bias:

    S = λ · W_dec · ReLU(W_enc (H_c − b_dec) + b_enc)          S ∈ R^{T×d}

Row i of S is added to token position i of the user's prompt at the same layer (+S), and
subtracted from the negative / unconditional prompt's encoding (−S, "negative steering"), so
that with λ < 0 classifier-free guidance pushes away from the concept on both branches.

`gate="striped"` (our option, not the paper's): S is applied only to the prompts whose tokens contain
the gate text's tokens (and to those prompts' negative-prompt rows), so a prompt that never names
the concept is generated exactly as without steering — the paper's S shifts every prompt a little —
at the price of robustness: a paraphrase that avoids those tokens is not steered (leave gate=None
for adversarial settings).

Which encoding is the prompt and which the negative prompt is decided by encoding them in two
explicit calls (prompt first, then `prompt_embeds` handed back to the pipeline's own
`encode_prompt` so that only the negative prompt is encoded under the −S hooks) — never by counting
hook calls, which breaks on SDXL's zeroed negative branch, on batched prompts and on FLUX
(the Concept Steerers repository, issue tracker). `faithful=True` reproduces the official call-counting hooks.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import numbers
from dataclasses import dataclass, field

import torch
from diffusers.hooks import ModelHook

from ..models import as_tokens, resolve_hookpoint
from ..errors import DiffusionSAEError
from ..models.hookpoints import PreForwardHook, register_edit, register_hook
from ..models.step_tracker import StepTracker, patch_attribute, unpatch_attribute
from ..models.text_layers import encode_prompts as _encode_positive
from ..models.text_layers import layer_activations as _layer_activations
from ..models.text_layers import pipeline_family as _family
from ..models.text_layers import split_hookpoints as _split_hookpoints
from .rewind import open_gate


class SteeringError(DiffusionSAEError, ValueError):
    """Bad steering input; the message is one line: what, where, how to fix."""


# Pooled-embedding arguments that must travel with `prompt_embeds` when it is handed back.
_POOLED = {"pooled_prompt_embeds": 2}


@dataclass
class Steering:
    """One steering term: a [T, d] (per token) or [d] (every token) matrix at one or more layers.

    `hookpoints` has one name per text-encoder layer; with several (SDXL's CLIP-L + bigG pair) the
    matrix's feature axis is their concatenation, split by `widths`.
    """

    hookpoints: list[str]
    matrix: torch.Tensor
    widths: list[int]
    label: str = ""
    meta: dict = field(default_factory=dict)
    # gate: steer only the prompts containing these token ids (None: every prompt, the paper)
    gate: list[int] | None = None
    # rows (ours): a per-prompt scale of S read from the prompt's token ids, e.g. `FamilyGate` (1 where the
    # concept is named, 0 where a rival is, a fraction where none of its family is); the negative branch
    # reuses the prompt's scales. Exclusive with `gate`.
    rows: object = None
    # ablation (ours): a `FeatureAblation` at the same layer, applied with S on every prompt and position
    # (ungated: the SAE's own reading of each token decides how much it removes)
    ablation: "FeatureAblation | None" = None

    def scaled(self, factor: float) -> "Steering":
        return Steering(self.hookpoints, self.matrix * factor, self.widths, self.label, dict(self.meta),
                        self.gate, self.rows, self.ablation)

    def __add__(self, other: "Steering") -> "Steering":
        if other.hookpoints != self.hookpoints:
            raise SteeringError(f"cannot add steerings at {self.hookpoints} and {other.hookpoints}")
        if self.gate != other.gate or self.rows is not other.rows:
            raise SteeringError("steerings with different gates cannot be summed: pass them as a list")
        if self.ablation is not other.ablation:
            raise SteeringError("steerings with different feature ablations cannot be summed: pass them as a list")
        return Steering(self.hookpoints, self.matrix + other.matrix, self.widths,
                        f"{self.label}+{other.label}", {}, ablation=self.ablation)


def _check_strength(strength) -> float:
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real):
        try:
            strength = float(strength)
        except (TypeError, ValueError):
            raise SteeringError(f"strength must be a number, got {strength!r}") from None
    strength = float(strength)
    if strength != strength or strength in (float("inf"), float("-inf")):
        raise SteeringError(f"strength must be finite, got {strength}")
    return strength


def _text_hookpoints(pipe, names: list[str]):
    hps = []
    for n in names:
        hp = resolve_hookpoint(pipe, n)
        if hp.kind != "text":
            raise SteeringError(f"hookpoint {n!r} is not in a text encoder (it is in {hp.component}); "
                                "Concept Steerers steers text-encoder layers, e.g. "
                                "text_encoder.text_model.encoder.layers.N")
        hps.append(hp)
    return hps


def _bias_free_decode(sae, z: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
    """W_dec z in the SAE's input units, without b_dec (x: the encoded input, for per-token norms)."""
    return sae.decode_dense(z, add_bias=False, x=x)


# ---------------------------------------------------------------------------------------------
# Encoding helpers
# ---------------------------------------------------------------------------------------------
def _id_hooks(pipe, components, got: dict) -> list:
    """Pre-hooks recording into got[c] the input_ids each text-encoder component c receives."""
    handles = []
    for c in dict.fromkeys(components):
        def pre(mod, args, kwargs, c=c):
            ids = kwargs.get("input_ids", args[0] if args else None)
            got[c] = ids.detach().cpu() if isinstance(ids, torch.Tensor) else None
        handles.append(register_hook(getattr(pipe, c), PreForwardHook(pre), "diffusion_sae.input_ids"))
    return handles


@contextlib.contextmanager
def _capture_ids(pipe, components):
    """Record the input_ids each text-encoder component receives during the block."""
    got: dict[str, torch.Tensor] = {}
    handles = _id_hooks(pipe, components, got)
    try:
        yield got
    finally:
        for h in handles:
            h.remove()


def _gate_tokens(pipe, hps, text: str) -> list[int]:
    """The gate text's own token ids (no BOS / EOS / padding), as the first encoder's tokenizer gives them."""
    if not isinstance(text, str) or not text.strip():
        raise SteeringError("gate text is empty: give the word(s) a prompt must contain to be steered, e.g. 'striped'")
    comp = hps[0].component
    with _capture_ids(pipe, [comp]) as ids, torch.no_grad():
        _encode_positive(pipe, [text, ""])
    if ids.get(comp) is None:
        raise SteeringError(f"could not read the token ids of {comp}; a gate needs them")
    special = set(ids[comp][1].tolist())       # BOS / EOS / padding: everything the empty prompt has
    toks = [t for t in ids[comp][0].tolist() if t not in special]
    if not toks:
        raise SteeringError(f"gate text {text!r} has no tokens of its own")
    return toks


def _check_from_step(k, name: str = "implicit_from_step") -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:
        raise SteeringError(f"{name} must be a non-negative whole number of denoising steps "
                            f"(0: from the first step), got {k!r}")
    return int(k)


def _contains(row: list[int], seq: tuple) -> bool:
    n = len(seq)
    return any(tuple(row[i:i + n]) == seq for i in range(len(row) - n + 1))


class FamilyGate:
    """Per-prompt scale of a removal S from the prompt's tokens (ours): 1 where the concept is named, 0
    where only a rival of its family is named (the user asked for something else: leave it alone), and
    `implicit` where none of the family is named — the model then picks one of them itself, the concept
    among them, so S acts at that fraction (0 gives the plain token gate, 1 the paper on such prompts).

    `implicit_negative` (None: the same as `implicit`) is the scale on such prompts' negative branch. The
    two branches do different things there: +λS on the prompt moves its encoding off the prompts the model
    was trained on, while −λS on the negative prompt steers the unconditional branch *towards* the concept,
    so that classifier-free guidance pushes away from it the way a negative prompt naming it would.

    `matcher` decides which tokens name what: `TokenMatch` (the exact token ids of the words: a prompt
    filter, blind to synonyms) or `EmbeddingMatch` (each token goes to its nearest reference word in the
    text encoder's own token-embedding space, so words the model learned as synonyms are caught).

    `implicit_from_step` k (ours): the implicit fractions act only from the k-th denoiser call of each
    generation on; before it the denoiser receives the encoding with them at 0 (named and rival prompts
    are scaled as always). A text edit moves the whole trajectory, so letting the layout form unsteered
    costs the rest of the image less. steer_text_encoder encodes the prompt once more for this and swaps
    the encodings in a pre-hook on the denoiser; 0 (the default) is the implicit fraction at every step.

    `detector` (ours, needs implicit_from_step k >= 1): an image-side verdict per sample, e.g. a
    `concepts.probe.ConceptDetector`, read from a denoiser block at its step (< k) on its branch
    (unconditional by default), or a tuple of them (a sample any of them flags is flagged). From step k
    on, the implicit fractions act only on the flagged samples; the others keep the encoding without them
    to the end, so a seed that was not heading to the concept is left as the plain model draws it. A
    prompt naming the concept is steered whatever the detector says. A probe of the conditional branch at
    step 0 flags what the prompt asks for in the model's own reading (a paraphrase the token matcher does
    not know, an adversarial prompt), before the image has decided.

    `named_late` (ours, default 1): the scale on prompts naming the concept from implicit_from_step on (on
    the flagged samples only, with a detector). Above 1 it escalates the removal where the image still heads
    to the concept although the prompt was steered from the first step, which is what an adversarial prompt
    that overpowers S looks like from the image side.

    `rewind` (ours, needs a detector): a sample the detector flags got the late encoding (implicit fraction,
    named_late) only from step k on, and an object's layout is decided before. `interventions.rewind.generate`
    (in place of `pipe(...)`) denoises every flagged sample again from its first latent with that encoding
    from step `rewind_from_step` (default 0, the first; below k) on; unflagged samples keep the gated pass's images.

    `rival_late` (ours, default 0; needs a detector): the scale on prompts read as naming a rival, from step k on, on
    the flagged samples only. The matcher's reading of a word can be wrong (an unfamiliar name for the concept whose
    nearest reference is a rival's word), and then 0 leaves such a prompt wholly unsteered; with a scale here the image
    side still removes the concept where the sample heads to it. Unflagged rival prompts stay bit for bit plain.
    Several gates in one `steer_text_encoder` share one verdict per sample (a sample any detector flags is flagged),
    so there each gate's rival_late also acts on samples only another gate's probe flagged; the bundled presets
    leave it at 0 when removing several concepts at once.
    """

    def __init__(self, target, rivals, implicit: float, implicit_negative: float | None = None, matcher=None,
                 implicit_from_step: int = 0, detector=None, named_late: float = 1.0, rewind: bool = False,
                 rewind_from_step: int = 0, rival_late: float = 0.0):
        self.matcher = matcher if matcher is not None else TokenMatch(target, rivals)
        self.target, self.rivals = target, rivals
        self.implicit = float(implicit)
        self.implicit_negative = self.implicit if implicit_negative is None else float(implicit_negative)
        self.implicit_from_step = _check_from_step(implicit_from_step)
        if isinstance(detector, (list, tuple)) and not detector:
            raise SteeringError("detector: give a detector, a tuple of detectors, or None (an empty tuple flags nothing)")
        for det in (tuple(detector) if isinstance(detector, (list, tuple)) else (detector,) if detector is not None else ()):
            step = getattr(det, "step", None)
            if not callable(det) or not isinstance(getattr(det, "hookpoint", None), str) or not isinstance(step, int):
                raise SteeringError(f"detector must be a callable with .hookpoint and .step (e.g. "
                                    f"ConceptProbe.detector(concept)) or a tuple of them, not {det!r}")
            if self.implicit_from_step < 1 or step >= self.implicit_from_step:
                raise SteeringError(f"a detector reading step {step} needs implicit_from_step > {step} (the step from "
                                    f"which flagged samples are steered), got implicit_from_step={self.implicit_from_step}")
        self.detector = tuple(detector) if isinstance(detector, list) else detector
        self.named_late = _check_strength(named_late)
        if self.named_late != 1.0 and self.implicit_from_step < 1:
            raise SteeringError(f"named_late={self.named_late:g} needs implicit_from_step >= 1 (the step it acts from)")
        self.rewind = bool(rewind)
        if self.rewind and not self.detectors:
            raise SteeringError("rewind=True redoes the samples a detector flagged: give the gate a detector")
        self.rewind_from_step = _check_from_step(rewind_from_step, "rewind_from_step")
        self.rival_late = _check_strength(rival_late)
        if self.rival_late != 0.0 and not self.detectors:
            raise SteeringError(f"rival_late={self.rival_late:g} steers the rival prompts a detector flags: give the "
                                "gate a detector")
        if self.rewind and self.rewind_from_step >= self.implicit_from_step:
            raise SteeringError(f"rewind_from_step={self.rewind_from_step} must be below implicit_from_step="
                                f"{self.implicit_from_step} (the redo starts the late encoding earlier)")

    @property
    def detectors(self) -> tuple:
        """The detectors as a tuple (a sample any of them flags is flagged)."""
        if self.detector is None:
            return ()
        return self.detector if isinstance(self.detector, tuple) else (self.detector,)

    @property
    def delayed(self) -> bool:
        """Whether the implicit fractions wait for a later step (and are not 0, so that waiting changes anything)."""
        return self.implicit_from_step > 0 and (self.implicit != 0.0 or self.implicit_negative != 0.0
                                                or self.named_late != 1.0 or self.rival_late != 0.0)

    def branches(self, tok: torch.Tensor, step: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt scales, negative-branch scales), one per prompt row of tok; `step` (a denoiser call index,
        None: from the last one on) gives the implicit fractions as 0 before `implicit_from_step`."""
        early = step is not None and step < self.implicit_from_step
        imp, imp_neg = (0.0, 0.0) if early else (self.implicit, self.implicit_negative)
        named = 1.0 if early else self.named_late
        rival = 0.0 if early else self.rival_late
        pos, neg = [], []
        for label in self.matcher(tok):
            if label == "target":
                pos.append(named), neg.append(named)
            elif label == "rival":
                pos.append(rival), neg.append(rival)
            else:
                pos.append(imp), neg.append(imp_neg)
        return torch.tensor(pos), torch.tensor(neg)

    def __call__(self, tok: torch.Tensor) -> torch.Tensor:
        return self.branches(tok)[0]


class TokenMatch:
    """Label each prompt 'target' / 'rival' / None by exact token-id subsequences of the words."""

    def __init__(self, target: list[tuple], rivals: list[tuple]):
        self.target, self.rivals = target, rivals

    def __call__(self, tok: torch.Tensor) -> list[str | None]:
        out: list[str | None] = []
        for r in tok.tolist():
            out.append("target" if any(_contains(r, t) for t in self.target)
                       else "rival" if any(_contains(r, t) for t in self.rivals) else None)
        return out


class EmbeddingMatch:
    """Label each prompt by its tokens' nearest reference token in the input-embedding table.

    References are the tokens of the target words, of the rival words and of neutral words (everything
    else a prompt says: articles, "style", the other attributes' names). A prompt token whose nearest
    reference (cosine, after centring on the references' mean) is a target token, with a similarity of at
    least `min_similarity`, names the concept; likewise for rivals. Special tokens (BOS, EOS, padding) are
    ignored. Synonyms the text encoder learned sit near each other in this table (on the bundled model 47
    of the 48 held-out names' nearest canonical word is their own concept), which token matching misses.
    """

    def __init__(self, embeddings: torch.Tensor, target: list[int], rivals: list[int], neutral: list[int],
                 special: set[int], min_similarity: float = 0.0):
        ids = list(dict.fromkeys([*target, *rivals, *neutral]))
        self.labels = ["target" if i in set(target) else "rival" if i in set(rivals) else None for i in ids]
        e = embeddings.detach().float().cpu()
        self.mean = e[ids].mean(0)
        self.refs = torch.nn.functional.normalize(e[ids] - self.mean, dim=-1)
        self.embeddings, self.special, self.min_similarity = e, set(special), float(min_similarity)
        self._cache: dict[int, str | None] = {}

    def label_of(self, token: int) -> str | None:
        if token in self.special:
            return None
        if token not in self._cache:
            v = torch.nn.functional.normalize(self.embeddings[token] - self.mean, dim=-1)
            sims = self.refs @ v
            j = int(sims.argmax())
            self._cache[token] = self.labels[j] if float(sims[j]) >= self.min_similarity else None
        return self._cache[token]

    def __call__(self, tok: torch.Tensor) -> list[str | None]:
        out: list[str | None] = []
        for r in tok.tolist():
            labels = {self.label_of(t) for t in r}
            out.append("target" if "target" in labels else "rival" if "rival" in labels else None)
        return out


# Words of almost any prompt, the neutral references of an EmbeddingMatch when none are given.
COMMON_PROMPT_WORDS = ("a", "an", "the", "of", "in", "on", "with", "and", "image", "photo", "picture",
                       "painting", "style", "shape", "something", "art", "by", "high", "quality", "detailed")


def family_gate(pipe, hookpoint: str | list[str], concept_words: list[str], rival_words: list[str],
                implicit: float, implicit_negative: float | None = None, match: str = "tokens",
                neutral_words: list[str] | None = None, min_similarity: float = 0.0,
                implicit_from_step: int = 0, detector=None, named_late: float = 1.0,
                rewind: bool = False, rewind_from_step: int = 0, rival_late: float = 0.0) -> FamilyGate:
    """A FamilyGate from words (each word's own token ids, as the first encoder's tokenizer gives them).

    match="tokens": exact token ids (a prompt filter); "embedding": nearest reference word in the first
    text encoder's token-embedding table (`EmbeddingMatch`), with `neutral_words` (default
    COMMON_PROMPT_WORDS) as the references that name nothing. implicit_from_step, detector, named_late,
    rewind, rewind_from_step, rival_late: see FamilyGate."""
    hps = _text_hookpoints(pipe, _split_hookpoints(hookpoint))
    implicit = _check_strength(implicit)
    if implicit_negative is not None:
        implicit_negative = _check_strength(implicit_negative)
    implicit_from_step = _check_from_step(implicit_from_step)
    target = [tuple(_gate_tokens(pipe, hps, w)) for w in concept_words]
    rivals = [tuple(_gate_tokens(pipe, hps, w)) for w in rival_words]
    if match == "tokens":
        return FamilyGate(target, rivals, implicit, implicit_negative, implicit_from_step=implicit_from_step,
                          detector=detector, named_late=named_late, rewind=rewind, rewind_from_step=rewind_from_step,
                          rival_late=rival_late)
    if match != "embedding":
        raise SteeringError(f"match must be 'tokens' or 'embedding', not {match!r}")
    words = set(concept_words) | set(rival_words)
    neutral = [w for w in (COMMON_PROMPT_WORDS if neutral_words is None else neutral_words) if w not in words]
    neutral_ids = [t for w in neutral for t in _gate_tokens(pipe, hps, w)]
    encoder = getattr(pipe, hps[0].component)
    special = _special_tokens(pipe, hps)
    flat = lambda ts: [t for seq in ts for t in seq]  # noqa: E731
    matcher = EmbeddingMatch(encoder.get_input_embeddings().weight, flat(target), flat(rivals), neutral_ids,
                             special, min_similarity)
    return FamilyGate(target, rivals, implicit, implicit_negative, matcher, implicit_from_step, detector, named_late,
                      rewind, rewind_from_step, rival_late)


def _special_tokens(pipe, hps) -> set[int]:
    """The token ids of the empty prompt (BOS, EOS, padding) of the first encoder."""
    comp = hps[0].component
    with _capture_ids(pipe, [comp]) as ids, torch.no_grad():
        _encode_positive(pipe, [""])
    return set(ids[comp][0].tolist()) if ids.get(comp) is not None else set()


def layer_activations(pipe, hookpoint: str | list[str], prompts: list[str]) -> torch.Tensor:
    """[N, T, d] outputs of the named text-encoder layer(s) for prompts (models.text_layers), SteeringError if not text."""
    return _layer_activations(pipe, hookpoint, prompts, hps=_text_hookpoints(pipe, _split_hookpoints(hookpoint)),
                              error=SteeringError)


# ---------------------------------------------------------------------------------------------
# Building steering matrices
# ---------------------------------------------------------------------------------------------
def _check_width(sae, width: int, hookpoint) -> None:
    d = sae.cfg.d_in
    if d != width:
        raise SteeringError(f"SAE width {d} != width {width} of layer {hookpoint!r}: "
                            "load the SAE trained on this layer")


def _prompt_matrices(sae, pipe, names: list[str], prompts: list[str], hookpoint) -> torch.Tensor:
    """W_dec · ReLU(W_enc (H_p − b_dec) + b_enc) for every prompt p: [N, T, d] on the CPU."""
    h = layer_activations(pipe, names, prompts)           # [N, T, d]
    _check_width(sae, h.shape[-1], hookpoint)
    sae_param = next(sae.parameters())
    hs = h.to(sae_param.device, sae_param.dtype)
    return _bias_free_decode(sae, sae.pre_acts(hs), x=hs).to(h.dtype).cpu()


def orthogonalize_rows(s: torch.Tensor, keep: torch.Tensor, rtol: float = 1e-6) -> torch.Tensor:
    """Row t of s [T, d] minus its projection on the span of keep[:, t] ([K, T, d]), position by position.

    The span is taken from an SVD so that zero or collinear keep rows (a position every prompt shares
    after a baseline is subtracted) add no spurious directions.
    """
    u, sv, _ = torch.linalg.svd(keep.permute(1, 2, 0).double(), full_matrices=False)  # u [T, d, K], sv [T, K]
    live = sv > rtol * sv.amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    u = u * live.unsqueeze(1)
    sd = s.double()
    return (sd - torch.einsum("tdk,tk->td", u, torch.einsum("tdk,td->tk", u, sd))).to(s.dtype)


@torch.no_grad()
def concept_steering(sae, pipe, hookpoint: str | list[str], concept_prompt: str | list[str],
                     strength: float, baseline: str | list[str] | None = None, gate: str | None = None,
                     keep: list[str] | None = None) -> Steering:
    """S = λ · W_dec · ReLU(W_enc (H_c − b_dec) + b_enc) over the concept prompt's positions.

    A list of prompts ("several example prompts") averages their matrices. `baseline` (e.g. "")
    subtracts the same matrix of a neutral prompt, so that what every prompt shares — the BOS
    position, the padding summary of "a prompt" — is not steered away with the concept (an option
    of ours; None is the paper's formula). A list of baseline prompts averages theirs: with example
    prompts that name the concept as `concept_prompt` and the same prompts without it (or with its
    rivals: "a red ring in striped style" against "a red circle in striped style", ...) as `baseline`,
    S is the concept's own difference in context — contrastive pairs — and everything the contexts
    share cancels (on the bundled model this removes "ring" with no style damage where the single word
    needed λ = −4 and cost 62 points of style). `gate` (e.g. "striped"): steer only prompts that contain
    its tokens (see the module docstring); None steers every prompt, as the paper does.
    `keep` (ours): concepts to leave alone, e.g. the shapes and styles when removing a colour. Each
    row of S is projected onto the orthogonal complement of the keep concepts' rows at the same
    position (their matrices built the same way), so the part of the concept's direction that the
    SAE shares with them is not steered away: on the bundled model, removing "red" at λ = −0.75 cuts
    the style damage from 29 to 8 points, both removing it fully. A stronger λ makes up for the removed norm.
    """
    strength = _check_strength(strength)
    prompts = [concept_prompt] if isinstance(concept_prompt, str) else list(concept_prompt)
    if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise SteeringError("concept prompt is empty: give a word or phrase such as 'striped' or 'nudity'")
    keep = list(keep) if keep is not None else []
    if any(not isinstance(p, str) or not p.strip() for p in keep):
        raise SteeringError("a keep concept is empty: give words or phrases such as 'circle', 'striped style'")
    names = _split_hookpoints(hookpoint)
    bases = None if baseline is None else [baseline] if isinstance(baseline, str) else list(baseline)
    if bases is not None and (not bases or any(not isinstance(p, str) for p in bases)):
        raise SteeringError("baseline must be a prompt (\"\" is the empty prompt) or a non-empty list of prompts")
    s = _prompt_matrices(sae, pipe, names, prompts, hookpoint).mean(0)
    b = _prompt_matrices(sae, pipe, names, bases, hookpoint).mean(0) if bases is not None else None
    if b is not None:
        s = s - b
    if keep:
        k = _prompt_matrices(sae, pipe, names, keep, hookpoint)
        s = orthogonalize_rows(s, k - b if b is not None else k)
    widths = [resolve_hookpoint(pipe, n).width for n in names]
    label = prompts[0] if len(prompts) == 1 else f"{prompts[0]} (+{len(prompts) - 1})"
    gate_ids = _gate_tokens(pipe, _text_hookpoints(pipe, names), gate) if gate is not None else None
    return Steering(names, strength * s, widths, label, {"concept": prompts, "strength": strength,
                                                         "baseline": baseline if baseline is None or isinstance(baseline, str) else bases,
                                                         "gate": gate, "keep": keep},
                    gate_ids)


@torch.no_grad()
def feature_steering(sae, hookpoint: str | list[str], features, strength: float, pipe=None) -> Steering:
    """Steer by named SAE features: S = λ · Σ_j a_j W_dec[j], added at every token position.

    `features` is a list of indices (a_j = 1) or a {index: activation} dict.
    """
    strength = _check_strength(strength)
    feats = dict(features) if isinstance(features, dict) else {int(j): 1.0 for j in features}
    if not feats:
        raise SteeringError("no features given: pass SAE latent indices, e.g. [12, 873]")
    L = sae.cfg.num_latents
    bad = [j for j in feats if not 0 <= int(j) < L]
    if bad:
        raise SteeringError(f"feature index {bad[0]} out of range for an SAE with {L} latents")
    z = torch.zeros(1, L, device=next(sae.parameters()).device)
    for j, a in feats.items():
        z[0, int(j)] = float(a)
    s = _bias_free_decode(sae, z)[0].cpu()
    names = _split_hookpoints(hookpoint)
    if pipe is not None:
        widths = [resolve_hookpoint(pipe, n).width for n in names]
        _check_width(sae, sum(widths), hookpoint)
    else:
        widths = [s.shape[-1]] if len(names) == 1 else []
    return Steering(names, strength * s, widths, f"features {sorted(feats)}", {"features": feats, "strength": strength})


@dataclass
class FeatureAblation:
    """Per-position removal of a concept's text-SAE features (ours, after Interpret-then-Deactivate, Tian et
    al. 2025, arXiv 2503.09446): at every token position t of the steered layer,

        h_t <- h_t - scale * W_dec^T (m * ReLU(a_t - c)),    a_t = ReLU(W_enc (h_t - b_dec) + b_enc)

    with m the 0/1 mask of `features` and c their `ceiling` (0 when None: the features' whole reading goes).
    A ceiling at the level the concept's rivals reach leaves a rival's prompt as it was and clips only what
    exceeds it: features an SAE shares between related concepts (a square's and a circle's) are not taken
    from the rival. S is a per-position matrix fitted on prompts that name the concept, so an input that
    carries the concept at other positions (a white-box attack's prepended embeddings) passes under it; the
    SAE's reading follows the concept to any position and any word that evokes it. Applied on both guidance
    branches, on the rows its steering's gate says name the concept (a FamilyGate's "target" rows, a token
    gate's matching rows; every prompt when the steering has no gate or with `everywhere`). Ungated, it moves every prompt: an
    SAE's features are shared between related concepts (on the bundled model a square's top features fire
    on circles too), so it costs the rest of the model far more than S does.
    """

    sae: object
    hookpoint: str
    features: torch.Tensor        # [n] latent indices
    scale: float = 1.0
    label: str = ""
    ceiling: torch.Tensor | None = None   # [n] activation kept per feature (None: 0)
    everywhere: bool = False              # True: every prompt, whatever its steering's gate says

    def __post_init__(self):
        self.scale = _check_strength(self.scale)
        feats = torch.as_tensor(self.features).flatten().long()
        L = self.sae.cfg.num_latents
        if not len(feats):
            raise SteeringError("feature ablation: no features given; pass SAE latent indices, e.g. [12, 873]")
        if int(feats.min()) < 0 or int(feats.max()) >= L:
            raise SteeringError(f"feature ablation: feature index out of range for an SAE with {L} latents")
        self.features = feats
        c = torch.zeros(len(feats)) if self.ceiling is None else torch.as_tensor(self.ceiling, dtype=torch.float32).flatten()
        if c.shape != feats.shape or not bool(torch.isfinite(c).all()) or bool((c < 0).any()):
            raise SteeringError(f"feature ablation: ceiling must hold one finite activation >= 0 per feature "
                                f"({len(feats)}), got shape {tuple(c.shape)}")
        self.ceiling = c

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        """What the ablation subtracts from h [..., d] (same shape)."""
        p = next(self.sae.parameters())
        x = h.to(p.device, p.dtype)
        a = self.sae.pre_acts(x)[..., self.features.to(p.device)]
        z = a.new_zeros(*a.shape[:-1], self.sae.cfg.num_latents)
        z[..., self.features.to(p.device)] = torch.relu(a - self.ceiling.to(p.device, p.dtype))
        return (self.scale * _bias_free_decode(self.sae, z, x=x)).to(h.device, h.dtype)


@torch.no_grad()
def concept_feature_ablation(sae, pipe, hookpoint: str, concept_prompts: list[str], contrast_prompts: list[str],
                             n_features: int = 16, scale: float = 1.0,
                             ceiling_quantile: float | None = None) -> FeatureAblation:
    """A FeatureAblation of the concept's `n_features` latents at `hookpoint` (one text-encoder layer, the SAE's).

    ceiling_quantile None: the latents whose mean ReLU pre-activation (over prompts and positions) is highest on
    `concept_prompts` above `contrast_prompts` (e.g. the same prompts with the concept's rivals), taken out whole.
    ceiling_quantile q (e.g. 0.99): each latent's ceiling is the q-quantile of its activation over every token of
    the contrast prompts, the latents are ranked by the mean excess over it on the concept prompts, and only
    that excess is taken out."""
    names = _split_hookpoints(hookpoint)
    if len(names) != 1:
        raise SteeringError(f"feature ablation reads one layer (the SAE's), got {names}; make one per layer")
    if isinstance(n_features, bool) or not isinstance(n_features, int) or not 0 < n_features <= sae.cfg.num_latents:
        raise SteeringError(f"n_features must be a whole number in 1..{sae.cfg.num_latents}, got {n_features!r}")
    if ceiling_quantile is not None and (isinstance(ceiling_quantile, bool) or not isinstance(ceiling_quantile, float)
                                         or not 0.0 <= ceiling_quantile <= 1.0):
        raise SteeringError(f"ceiling_quantile must be a probability in [0, 1] or None, got {ceiling_quantile!r}")
    for what, ps in (("concept", concept_prompts), ("contrast", contrast_prompts)):
        # a contrast prompt may be "" (the empty prompt); a concept prompt must say something
        if isinstance(ps, str) or not ps or any(not isinstance(q, str) or (what == "concept" and not q.strip())
                                                for q in ps):
            raise SteeringError(f"{what} prompts: give a non-empty list of prompts (\"\" is the empty prompt)")
    _text_hookpoints(pipe, names)
    p = next(sae.parameters())

    def codes(prompts):
        h = layer_activations(pipe, names, prompts)
        _check_width(sae, h.shape[-1], hookpoint)
        return sae.pre_acts(h.to(p.device, p.dtype)).float().flatten(0, 1).cpu()     # [prompts * tokens, L]

    concept, contrast = codes(list(concept_prompts)), codes(list(contrast_prompts))
    if ceiling_quantile is None:
        feats = (concept.mean(0) - contrast.mean(0)).topk(n_features).indices
        ceiling = None
    else:
        level = contrast.quantile(ceiling_quantile, dim=0)
        feats = torch.relu(concept - level).mean(0).topk(n_features).indices
        ceiling = level[feats]
    return FeatureAblation(sae, names[0], feats, scale, f"{concept_prompts[0]} ({n_features} features)", ceiling)


# ---------------------------------------------------------------------------------------------
# Applying them
# ---------------------------------------------------------------------------------------------
def _add_hooks(pipe, steerings: list[Steering], sign_of_call):
    """Register one forward hook per layer adding sign * S; sign_of_call(layer_name) -> float.

    Gated steerings add S only to the batch rows whose token ids contain the gate; the rows picked
    on the prompt call (+S) are reused for the negative call (−S), expanded to its batch.
    """
    terms: dict[str, list[tuple]] = {}
    ablations: dict[str, list[tuple]] = {}
    hookpoints, components = {}, {}
    for st in steerings:
        hps = _text_hookpoints(pipe, st.hookpoints)
        widths = st.widths or [h.width for h in hps]
        if sum(widths) != st.matrix.shape[-1]:
            raise SteeringError(f"steering matrix width {st.matrix.shape[-1]} != layer width {sum(widths)} "
                                f"at {st.hookpoints}")
        off = 0
        for hp, w in zip(hps, widths):
            gate = tuple(st.gate) if st.gate else st.rows
            terms.setdefault(hp.name, []).append((st.matrix[..., off:off + w], gate))
            hookpoints[hp.name] = dataclasses.replace(hp, read="output")   # S is added to the layer's output
            components[hp.name] = hp.component
            off += w
        if st.ablation is not None:
            ab = st.ablation
            if ab.hookpoint not in hookpoints:
                raise SteeringError(f"feature ablation at {ab.hookpoint!r} is not one of its steering's layers {st.hookpoints}")
            if hookpoints[ab.hookpoint].width is not None:
                _check_width(ab.sae, hookpoints[ab.hookpoint].width, ab.hookpoint)
            ablations.setdefault(ab.hookpoint, []).append(
                (ab, None if ab.everywhere else tuple(st.gate) if st.gate else st.rows))
    ids, masks = {}, {}
    # The layer hook of a gated steering needs the token ids: read them where the encoder receives them.
    handles = _id_hooks(pipe, [components[n] for n, ts in terms.items() if any(g for _, g in ts)], ids)

    def reused(key, branch: int, batch: int):
        """A negative call's mask: the prompt call's (branch 0: prompt scales, 1: negative-branch scales), expanded
        to the batch; None when the prompt call left none."""
        if key not in masks or batch % len(masks[key][branch]):
            return None
        m = masks[key][branch]
        return m.repeat_interleave(batch // len(m))

    def tokens(name, batch: int, what: str):
        tok = ids.get(components[name])
        if tok is None or tok.shape[0] != batch:
            raise SteeringError(f"a gated {what} could not read the token ids of {components[name]}")
        return tok

    def named_mask(name, gate, batch, sign):
        """1 on the rows whose prompt names the concept (a FamilyGate's "target" rows, a token gate's matching
        rows), the prompt's mask reused on its negative branch as row_mask does."""
        if isinstance(gate, tuple):
            return row_mask(name, gate, batch, sign)
        key = (components[name], gate, "named")
        if sign < 0 and (m := reused(key, 0, batch)) is not None:
            return m
        tok = tokens(name, batch, "feature ablation")
        matcher = getattr(gate, "matcher", None)
        labels = matcher(tok) if matcher is not None else ["target" if float(v) != 0 else None for v in gate(tok)]
        m = torch.tensor([label == "target" for label in labels], dtype=torch.float32)
        if sign > 0:
            masks[key] = (m, m)
        return m

    def row_mask(name, gate, batch, sign):
        step = getattr(sign_of_call, "step", None)   # an early encoding (implicit_from_step), else None
        # The step is part of the key: a negative-only call (prompt embeddings given, as when another
        # steering's encode_prompt wrapper calls this one) must reuse the mask of its own encoding's step.
        key = (components[name], gate, step)
        if sign < 0 and (neg := reused(key, 1, batch)) is not None:
            return neg
        tok = tokens(name, batch, "steering")
        if isinstance(gate, tuple):
            n = len(gate)
            m = torch.tensor([any(tuple(r[i:i + n]) == gate for i in range(len(r) - n + 1)) for r in tok.tolist()])
            neg = m
        elif hasattr(gate, "branches"):
            m, neg = (x.flatten() for x in (gate.branches(tok) if step is None else gate.branches(tok, step=step)))
        else:
            m = neg = gate(tok).flatten()
        if sign > 0:
            masks[key] = (m, neg)
        return m if sign > 0 else neg

    for name, ts in terms.items():
        def edit(h, ts=ts, name=name):
            sign = sign_of_call(name)
            if sign == 0:
                return h
            new = h
            for ab, gate in ablations.get(name, ()):
                # read on the layer's own output, before any S is added; only on the rows whose prompt names the
                # concept when the steering is gated (ungated, it moves every prompt: see FeatureAblation)
                cut = ab(h)
                if gate is not None:
                    m = named_mask(name, gate, h.shape[0], sign).to(h.device, h.dtype)
                    cut = m.view(-1, *([1] * (h.dim() - 1))) * cut
                new = new - cut
            for mat, gate in ts:
                s = mat.to(h.device, h.dtype)
                if s.dim() == 2 and s.shape[0] != h.shape[-2]:
                    raise SteeringError(f"steering matrix has {s.shape[0]} token rows but layer {name!r} "
                                        f"has {h.shape[-2]} tokens: build it with the same pipeline")
                if gate is None:
                    new = new + sign * s
                else:
                    m = row_mask(name, gate, h.shape[0], sign).to(h.device, h.dtype)
                    new = new + sign * m.view(-1, *([1] * (h.dim() - 1))) * s
            return new
        handles.append(register_edit(hookpoints[name], edit, "diffusion_sae.steering"))
    return handles


class _SignState:
    def __init__(self):
        self.sign = 0.0
        self.step = None    # set while encoding for an early denoiser call (FamilyGate.implicit_from_step)

    def __call__(self, name):
        return self.sign


class _EarlyEncodings(ModelHook):
    """Denoiser pre-hook of FamilyGate.implicit_from_step: before step `stops[-1]` it replaces the text
    encodings the denoiser receives by the ones made for that step (the implicit fractions of the gates
    that wait for a later step at 0).

    `starts` are the steps from which the encoding changes (0 and each gate's step but the last); the
    wrapped encode_prompt hands every tensor it returns, with its versions for each start, to `add`.
    The denoiser's text tensors (`encoder_hidden_states`, SDXL's pooled `added_cond_kwargs["text_embeds"]`,
    SD3's `pooled_projections`) are found among those by value: whole (no guidance, SD3's skip-layer
    call) or as the [negative; prompt] halves of a guidance batch. Steps are denoiser calls, counted from
    the first call after an encoding; one call is one step (the SD pipelines batch both guidance branches
    in one call), SD3's extra skip-layer call shares its step.
    """

    _TEXT_KWARGS = ("encoder_hidden_states", "pooled_projections")

    def __init__(self, starts: list[int], stop: int, locate=None, guided=None):
        super().__init__()
        self.starts, self.stop = starts, stop
        # locate(timestep) -> its index in the scheduler's timesteps, or None: the step a denoiser call
        # is at when it is called outside the sampling loop (an attack's loss at one grid timestep)
        self.locate = locate
        # FamilyGate.detector: guided() says whether a denoiser batch is [unconditional; conditional]
        self.guided = guided
        self.detecting = False
        self.flags: torch.Tensor | None = None     # [samples] bool: the detectors' verdicts of this generation
        self._flag_call, self._flag_step = -1, -1
        self.pairs: list[tuple[torch.Tensor, dict[int, torch.Tensor]]] = []
        self.calls = 0
        self.step_now: int | None = None
        self.denoising = False
        self._memo: dict = {}
        # interventions.rewind: whether the gates ask for it, and during its second pass the samples that get the
        # late encoding from the first step (one part: every gate's detectors flag the same samples)
        self.rewinds = False
        self.rewind_from = 0       # the step from which the forced samples get the late encoding
        self.forced: list[torch.Tensor | None] = [None]

    def rewind_rows(self) -> list:
        """[the samples the detectors flagged in the last generation] (all of them got the late encoding only from
        the gate's step), or [None] without a rewind or a verdict."""
        return [self.flags.clone() if self.rewinds and self.flags is not None else None]

    def observe(self, detector, h: torch.Tensor) -> torch.Tensor:
        """Block hook of a detector: at its step, flag the samples (read on the rows of the detector's
        branch, unconditional by default; several detectors: a sample any of them flags is flagged). Returns
        the tensor unchanged."""
        if self.step_now != detector.step:
            return h
        tok, _ = as_tokens(h)
        rows = tok.shape[0]
        if self.guided is not None and self.guided() and rows % 2 == 0:
            # [unconditional; conditional]: a probe of the prompt's branch reads the second half
            tok = tok[rows // 2:] if getattr(detector, "branch", "uncond") == "cond" else tok[: rows // 2]
        flags = detector(tok).flatten().bool().cpu()
        # A later step of the same generation adds its verdicts; the same or an earlier step in another call
        # is a new pass (the next generation, or an attack's loss calls at one timestep): it starts afresh.
        fresh = self._flag_call != self.calls and self.step_now <= self._flag_step
        if fresh or self.flags is None or self.flags.shape != flags.shape:
            self.flags = flags
        else:
            self.flags = self.flags | flags
        self._flag_call, self._flag_step = self.calls, self.step_now
        return h

    def add(self, late, early: dict[int, tuple]) -> None:
        if self.denoising:       # the first encoding of a new pipeline call
            self.pairs, self.calls, self.denoising = [], 0, False
            self.flags, self._flag_call, self._flag_step = None, -1, -1
        self._memo.clear()
        for i, t in enumerate(late):
            if isinstance(t, torch.Tensor):
                self.pairs.append((t, {lo: e[i] for lo, e in early.items()}))
        del self.pairs[:-16]     # encode_prompt called many times outside a generation keeps only the last ones

    def _swap(self, x: torch.Tensor, lo: int, key: str) -> torch.Tensor:
        def find(part):
            for late, early in self.pairs:
                if late.shape == part.shape and torch.equal(late.to(part.device, part.dtype), part):
                    return early[lo].to(part.device, part.dtype)
            return None

        def find_rows():
            # row by row: a batch built from the encodings' rows in another order or repeated
            # (an attack expanding one prompt's encoding over its noise samples)
            rows = []
            for row in x:
                hit = None
                for late, early in self.pairs:
                    if late.shape[1:] != row.shape:
                        continue
                    same = (late.to(row.device, row.dtype) == row).flatten(1).all(1).nonzero()
                    if len(same):
                        hit = early[lo][int(same[0])].to(row.device, row.dtype)
                        break
                if hit is None:
                    return None
                rows.append(hit)
            return torch.stack(rows)

        new = find(x)
        if new is None and x.shape[0] % 2 == 0:
            halves = [find(h) for h in x.chunk(2)]
            new = torch.cat(halves) if all(h is not None for h in halves) else None
        if new is None and x.ndim >= 2:
            new = find_rows()
        if new is None:
            raise SteeringError(f"implicit_from_step: the denoiser's {key} is not an encoding this steering made "
                                "(a callback or another text edit changed it?); use implicit_from_step=0 here")
        return new

    def pre_forward(self, module, *args, **kwargs):
        self.denoising = True
        if kwargs.get("skip_layers") is not None:    # SD3 skip-layer guidance: a second call of the same step
            step = max(self.calls - 1, 0)
        else:
            step, self.calls = self.calls, self.calls + 1
        if self.locate is not None:
            # the timestep the denoiser receives names the step (the sampling loop's calls agree with the
            # count above; a call outside it, such as an attack's loss at one timestep, does not)
            at = self.locate(kwargs.get("timestep", args[1] if len(args) > 1 else None))
            step = at if at is not None else step
        self.step_now = step
        keep = None        # rows that keep the late encoding (all of them when None)
        forced = self.forced[0]
        if step >= self.stop:
            # With detectors, from the gate's step on only the flagged samples get the implicit fractions; the
            # others keep the early encoding. No verdict (no detection ran in this generation): all are steered.
            if not self.detecting or self.flags is None or not self.pairs or bool(self.flags.all()):
                return args, kwargs
            keep = self.flags if forced is None or forced.shape != self.flags.shape else self.flags | forced
        elif forced is not None and step >= self.rewind_from:
            # rewind's second pass: the forced samples get the late encoding from rewind_from_step on
            if bool(forced.all()):
                return args, kwargs
            keep = forced
        if keep is not None and bool(keep.all()):
            return args, kwargs
        if not self.pairs:
            return args, kwargs
        lo = max(s for s in self.starts if s <= step)
        if not isinstance(kwargs.get("encoder_hidden_states"), torch.Tensor):
            raise SteeringError("implicit_from_step: the denoiser was called without encoder_hidden_states as a "
                                "keyword, so the early text encoding cannot be swapped in; use implicit_from_step=0")
        kwargs = dict(kwargs)
        for key in self._TEXT_KWARGS:
            if isinstance(kwargs.get(key), torch.Tensor):
                kwargs[key] = self._mix(kwargs[key], lo, key, keep)
        added = kwargs.get("added_cond_kwargs")
        if isinstance(added, dict) and isinstance(added.get("text_embeds"), torch.Tensor):
            kwargs["added_cond_kwargs"] = dict(added, text_embeds=self._mix(added["text_embeds"], lo, "text_embeds", keep))
        return args, kwargs

    def _mix(self, x: torch.Tensor, lo: int, key: str, keep: torch.Tensor | None) -> torch.Tensor:
        # The sampling loop hands the denoiser the same text tensors at every step: the swap (a search by value)
        # is done once per tensor, encoding range and verdict (the version counter catches in-place edits).
        memo = (key, x.data_ptr(), tuple(x.shape), x._version, lo, None if keep is None else tuple(keep.tolist()))
        if memo in self._memo:
            return self._memo[memo]
        early = self._swap(x, lo, key)
        if keep is None:
            out = early
        else:
            n = keep.shape[0]
            if x.shape[0] % n:
                raise SteeringError(f"detector: the denoiser's {key} has {x.shape[0]} rows for {n} detected samples; "
                                    "generate with the batch the detector read")
            rows = keep.repeat(x.shape[0] // n).to(x.device).view(-1, *([1] * (x.dim() - 1)))
            out = torch.where(rows, x, early)
        if len(self._memo) > 64:
            self._memo.clear()
        self._memo[memo] = out
        return out


@contextlib.contextmanager
def steer_text_encoder(pipe, steerings: Steering | list[Steering], negative_steering: bool = True,
                       faithful: bool = False):
    """Within the block, `pipe(...)` generates with the steering applied.

    ours: the pipeline's `encode_prompt` is wrapped so that the prompt is encoded under +S and the
    negative prompt under −S (or unsteered with negative_steering=False) in separate calls.
    faithful: the official hooks — first call of each layer +S, later calls −S (SD 1.x only
    behaves as intended).
    A FamilyGate with `implicit_from_step` k > 0 (and a non-zero implicit fraction): the prompt is also
    encoded with the implicit fractions at 0, and a pre-hook on the denoiser hands it that encoding on
    its first k calls of each generation (`_EarlyEncodings`; SD 1.x/2.x, SDXL, SD3 — not FLUX, whose
    guidance branches are separate calls, nor faithful=True).
    Hooks and the wrapper are removed on exit, also when generation raises.
    """
    steerings = [steerings] if isinstance(steerings, Steering) else list(steerings)
    waits = sorted({st.rows.implicit_from_step for st in steerings
                    if isinstance(st.rows, FamilyGate) and st.rows.delayed})
    detectors = [det for st in steerings if isinstance(st.rows, FamilyGate) and st.rows.delayed
                 for det in st.rows.detectors]
    if detectors and len(waits) > 1:
        raise SteeringError(f"FamilyGates with a detector need every delayed gate to start at the same step "
                            f"(got implicit_from_step {waits}): the detectors' verdict picks one encoding per sample")
    for det in detectors:    # checked before any hook is installed
        if resolve_hookpoint(pipe, det.hookpoint).kind != "denoiser":
            raise SteeringError(f"detector hookpoint {det.hookpoint!r} is not a denoiser block (a detector reads "
                                "the image side, e.g. unet.up_blocks.1.attentions.0)")
    if waits and faithful:
        raise SteeringError("implicit_from_step needs the explicit encoding: use faithful=False")
    if waits and _family(pipe) == "flux":
        raise SteeringError("implicit_from_step is not supported on FLUX pipelines (their guidance branches are "
                            "separate denoiser calls, so a call is not a step); use implicit_from_step=0")
    if faithful:
        counts: dict[str, int] = {}

        def sign_of_call(name):
            counts[name] = counts.get(name, 0) + 1
            return 1.0 if counts[name] == 1 else -1.0

        handles = _add_hooks(pipe, steerings, sign_of_call)
        # The official script installs its hooks per image, so every generation starts with +S. Here one
        # context may serve several pipeline calls: the first denoiser call ends an encoding phase, and the
        # next text-encoder call starts a new generation's count (without this, a second `pipe(...)` in
        # the same context got −S on its prompt).
        denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        if denoiser is not None:
            handles.append(register_hook(denoiser, PreForwardHook(lambda *_: counts.clear()),
                                         "diffusion_sae.steering_faithful_reset"))
        try:
            yield pipe
        finally:
            for h in handles:
                h.remove()
        return

    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if waits and not isinstance(denoiser, torch.nn.Module):
        raise SteeringError("implicit_from_step needs a pipeline with a denoiser (pipe.unet or pipe.transformer)")
    state = _SignState()
    handles = _add_hooks(pipe, steerings, state)
    orig = pipe.encode_prompt
    sig = inspect.signature(orig)
    fam = _family(pipe)
    # FamilyGate.implicit_from_step: one more encoding for each range of steps [starts[i], waits[i])
    starts = [0, *waits[:-1]]
    locator = StepTracker(pipe)     # not entered: only its timestep -> step lookup is used
    early_hook = _EarlyEncodings(starts, waits[-1], lambda t: locator._locate(t)[0],
                                 lambda: bool(getattr(pipe, "do_classifier_free_guidance", False))) if waits else None
    if early_hook is not None and detectors:
        early_hook.detecting = True
        rewinding = [st.rows for st in steerings if isinstance(st.rows, FamilyGate) and st.rows.rewind]
        early_hook.rewinds = bool(rewinding)
        if rewinding:
            # one verdict per sample picks one encoding for every gate: the earliest redo start of them
            early_hook.rewind_from = min(g.rewind_from_step for g in rewinding)

    @functools.wraps(orig)     # the real signature stays readable for a wrapper stacked on this one
    def encode_prompt(*args, **kwargs):
        ba = sig.bind(*args, **kwargs)
        ba.apply_defaults()
        a = dict(ba.arguments)
        a.pop("self", None)
        if early_hook is None:
            return _encode(a)
        early = {}
        for lo in starts:
            state.step = lo
            try:
                early[lo] = _encode(dict(a))
            finally:
                state.step = None
        out = _encode(a)
        early_hook.add(out, early)
        return out

    def _encode(a):
        if fam == "flux" or "do_classifier_free_guidance" not in a:
            # No guidance branch inside encode_prompt (FLUX): add only.
            state.sign = 1.0 if a.get("prompt_embeds") is None else 0.0
            try:
                return orig(**a)
            finally:
                state.sign = 0.0
        n = a.get("num_images_per_prompt", 1)
        pos = dict(a, do_classifier_free_guidance=False, num_images_per_prompt=1)
        if a.get("prompt_embeds") is None:
            state.sign = 1.0
            try:
                out = orig(**pos)
            finally:
                state.sign = 0.0
            a["prompt_embeds"] = out[0]
            for k, i in _POOLED.items():
                if k in a and len(out) > i:
                    a[k] = out[i]
        # Second call: prompt embeddings are given, so the only encoding left is the negative one.
        state.sign = -1.0 if negative_steering else 0.0
        try:
            return orig(**dict(a, num_images_per_prompt=n))
        finally:
            state.sign = 0.0

    # Several steerings (and the step tracker) may wrap encode_prompt and be removed in any order (ds.remove).
    patch_attribute(pipe, "encode_prompt", encode_prompt)
    try:
        with contextlib.ExitStack() as opened:
            if early_hook is not None:
                handles.append(register_hook(denoiser, early_hook, "diffusion_sae.steering_implicit_from_step"))
                for i, det in enumerate(detectors):
                    handles.append(register_edit(resolve_hookpoint(pipe, det.hookpoint),
                                                 lambda h, det=det: early_hook.observe(det, h),
                                                 f"diffusion_sae.steering_detector.{i}"))
                if early_hook.rewinds:
                    opened.enter_context(open_gate(pipe, early_hook))
            yield pipe
    finally:
        for h in handles:
            h.remove()
        unpatch_attribute(pipe, "encode_prompt", encode_prompt)


def steered_generate(pipe, steerings, prompt, negative_steering: bool = True, faithful: bool = False, **kwargs):
    """`pipe(prompt, **kwargs)` with the steering applied (a one-call wrapper of steer_text_encoder)."""
    with steer_text_encoder(pipe, steerings, negative_steering=negative_steering, faithful=faithful):
        return pipe(prompt, **kwargs)
