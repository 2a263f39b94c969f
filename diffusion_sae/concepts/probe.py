"""Image-side concept probes: which concept a sample is heading to, read from the denoiser mid-generation.

A text edit (Concept Steerers) cannot tell, from a prompt that never names a concept, whether the
model will draw it anyway: the empty prompt draws a style the user never asked for, and whether it is
the erased one is decided by the seed. The denoiser knows earlier than the finished image does. A
`ConceptProbe` reads one denoiser block at one denoising step on the **unconditional** guidance branch
(the branch that sees the noisy latent but no prompt, so what it carries about the concept comes from
the image alone), mean-pools the block's tokens and scores every concept of a family with a
multinomial logistic regression:

    p(c | x_t) = softmax(W ((mean_patches h_uncond(x_t, t) − μ) / σ) + b)

It is fitted on prompts that *name* each concept (the label is the prompt's concept, no classifier is
involved), at seeds the caller chooses, so a user fits one from a list of prompts as they would build
a concept dictionary. `ConceptDetector` turns a probe into a per-sample yes/no for one concept (a
probability bar) for `FamilyGate(detector=...)`: the gate's implicit fraction then acts only on the
samples the probe flags, from its `implicit_from_step` on. Files: `concept_probe.safetensors` (μ, σ,
W, b) and `concept_probe.json` (hookpoint, step, concepts, fitting settings), written atomically.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import DiffusionSAEError
from ..models import StepTracker, as_tokens, read_tensor, resolve_hookpoint
from .dictionary import check_output_folder
from .pairfile import read_pair, write_pair

FILE = "concept_probe"


class ProbeError(DiffusionSAEError, ValueError):
    """Bad concept-probe input; one line: what, where, how to fix."""


@dataclass
class ConceptProbe:
    hookpoint: str
    step: int                      # the denoising step index it reads (0 = the first, noisiest step)
    concepts: list[str]
    mean: torch.Tensor             # [d] feature centring
    scale: torch.Tensor            # [d] feature scaling
    weight: torch.Tensor           # [d, C]
    bias: torch.Tensor             # [C]
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        d, c = self.weight.shape if self.weight.ndim == 2 else (-1, -1)
        if (self.weight.ndim != 2 or c != len(self.concepts) or self.mean.shape != (d,) or self.scale.shape != (d,)
                or self.bias.shape != (c,)):
            raise ProbeError(f"probe tensors do not fit together: weight {tuple(self.weight.shape)}, mean "
                             f"{tuple(self.mean.shape)}, scale {tuple(self.scale.shape)}, bias {tuple(self.bias.shape)} "
                             f"for {len(self.concepts)} concepts; refit it with fit_concept_probe")
        if not isinstance(self.step, int) or isinstance(self.step, bool) or self.step < 0:
            raise ProbeError(f"probe step must be a denoising step index >= 0, not {self.step!r}")
        _check_branch(self.branch)

    @property
    def width(self) -> int:
        return int(self.weight.shape[0])

    def index(self, concept: str) -> int:
        if concept not in self.concepts:
            raise ProbeError(f"concept {concept!r} is not one the probe at {self.hookpoint} was fitted on "
                             f"({', '.join(self.concepts)}); refit it with that concept's prompts")
        return self.concepts.index(concept)

    @torch.no_grad()
    def probabilities(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, n, d] (one sample's block tokens per row) or pooled [B, d] -> [B, C] probabilities."""
        x = tokens.float().mean(1) if tokens.ndim == 3 else tokens.float()
        if x.shape[-1] != self.width:
            raise ProbeError(f"the block {self.hookpoint} gives {x.shape[-1]}-wide tokens but the probe was fitted "
                             f"on {self.width}: fit it on this pipeline")
        dev = x.device
        z = (x - self.mean.to(dev)) / self.scale.to(dev)
        return torch.softmax(z @ self.weight.to(dev) + self.bias.to(dev), -1)

    @property
    def branch(self) -> str:
        """The guidance branch it reads: "uncond" (probes saved before branches existed read it) or "cond"."""
        return str(self.meta.get("branch", "uncond"))

    def detector(self, concept: str, threshold: float = 0.5, below: bool = False) -> "ConceptDetector":
        return ConceptDetector(self, concept, threshold, below)

    # --- persistence -------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path) -> Path:
        """Write concept_probe.safetensors and concept_probe.json into `folder` (atomically; refuses a
        folder inside the installed package)."""
        try:
            folder = check_output_folder(folder)
        except DiffusionSAEError as e:
            raise ProbeError(str(e).split(" (then ")[0] + " (then steer --detector FOLDER)") from None
        tensors = {"mean": self.mean.float().contiguous(), "scale": self.scale.float().contiguous(),
                   "weight": self.weight.float().contiguous(), "bias": self.bias.float().contiguous()}
        doc = {"hookpoint": self.hookpoint, "step": self.step, "concepts": self.concepts, "meta": self.meta}
        return write_pair(folder, FILE, tensors, doc, error=ProbeError,
                          cannot_write="cannot write the concept probe to {folder}: {why}; give a writable "
                                       "folder with free space")

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "ConceptProbe":
        def check_doc(doc, j: Path) -> None:
            if (not isinstance(doc, dict) or not isinstance(doc.get("hookpoint"), str)
                    or not isinstance(doc.get("step"), int) or not isinstance(doc.get("concepts"), list)
                    or not all(isinstance(c, str) for c in doc["concepts"])):
                raise ProbeError(f"{j}: not a concept probe (expected hookpoint, step and concepts); refit and "
                                 "save the probe")

        doc, x = read_pair(
            folder, FILE, error=ProbeError, check_doc=check_doc,
            missing="no concept probe at {folder} ({stem}.json / {stem}.safetensors missing): fit one "
                    "with fit_concept_probe and save_pretrained",
            bad_json="{json}: not a readable concept-probe JSON file; refit and save the probe",
            mismatch="{tensors} does not belong to {json} (an interrupted write, or one file replaced); refit and "
                     "save the probe",
            bad_tensors="{tensors} is not a readable safetensors file; refit and save the probe")
        t = Path(folder) / f"{FILE}.safetensors"
        missing = [k for k in ("mean", "scale", "weight", "bias") if k not in x]
        if missing:
            raise ProbeError(f"{t}: no {missing[0]!r} tensor; refit and save the probe")
        if not all(bool(torch.isfinite(v).all()) for v in x.values()):
            raise ProbeError(f"{t}: non-finite values; refit and save the probe")
        return cls(doc["hookpoint"], doc["step"], doc["concepts"], x["mean"], x["scale"], x["weight"], x["bias"],
                   doc.get("meta", {}))


class ConceptDetector:
    """Per-sample verdict of a probe for one concept: p(concept | x_t) >= threshold; with below=True the
    complement, p < threshold (e.g. an edit for the samples whose prompt does not ask for the concept)."""

    def __init__(self, probe: ConceptProbe, concept: str, threshold: float = 0.5, below: bool = False):
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not 0.0 <= float(threshold) <= 1.0:
            raise ProbeError(f"detector threshold must be a probability in [0, 1], not {threshold!r}")
        if not isinstance(below, bool):
            raise ProbeError(f"detector below must be True or False, not {below!r}")
        self.probe, self.concept, self.threshold, self.below = probe, concept, float(threshold), below
        self.index = probe.index(concept)

    @property
    def hookpoint(self) -> str:
        return self.probe.hookpoint

    @property
    def step(self) -> int:
        return self.probe.step

    @property
    def branch(self) -> str:
        return self.probe.branch

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, n, d] -> bool [B]."""
        p = self.probe.probabilities(tokens)[:, self.index]
        return p < self.threshold if self.below else p >= self.threshold

    def __repr__(self) -> str:
        return (f"ConceptDetector({self.concept!r} at {self.hookpoint}, step {self.step}, {self.branch} branch, "
                f"p {'<' if self.below else '>='} {self.threshold:g})")


BRANCHES = ("uncond", "cond")


def _check_branch(branch) -> None:
    if branch not in BRANCHES:
        raise ProbeError(f"probe branch must be one of {', '.join(BRANCHES)}, not {branch!r}")


def branch_rows(branches: dict, branch: str = "uncond"):
    """Rows of one guidance branch in a denoiser batch (StepTracker.branches); without guidance there is
    only the conditional one, which every probe then reads."""
    return branches.get(branch, branches.get("cond", slice(None)))


@contextlib.contextmanager
def pooling(pipe, hp, got: dict, branch: str = "uncond"):
    """While open, every denoising step in `got` ({step: []}) appends the block's [B, d] patch-mean on one
    guidance branch, in generation order (hp: a resolved hookpoint). `pooled_activations` reads it; so can a
    caller that also needs the pipeline's images."""
    tracker = StepTracker(pipe)

    def hook(mod, args, kwargs, out):
        if tracker.step_index in got:
            tok, _ = as_tokens(read_tensor(hp, mod, args, kwargs, out), hp.name)
            got[tracker.step_index].append(tok[branch_rows(tracker.branches(tok.shape[0]), branch)].float().mean(1).cpu())

    handle = hp.module.register_forward_hook(hook, with_kwargs=True)
    try:
        with tracker:
            yield got
    finally:
        handle.remove()


def pooled_activations(pipe, hookpoint: str, prompts: list[str], seeds: list[int], step: int | list[int],
                       steps: int = 25, guidance: float = 5.0, batch_size: int = 32, branch: str = "uncond",
                       **call_kwargs):
    """[N, d] patch-mean of the block's tokens on one guidance branch ("uncond", or "cond": the branch
    that reads the prompt) at denoising step `step`, one row per (prompt, seed); the conditional branch
    when the pipeline runs without guidance. A list of steps gives {step: [N, d]} from one pass."""
    hp = resolve_hookpoint(pipe, hookpoint)
    if hp.kind != "denoiser":
        raise ProbeError(f"hookpoint {hookpoint!r} is not a denoiser block; a probe reads e.g. unet.up_blocks.1.attentions.0")
    wanted = [step] if not isinstance(step, (list, tuple)) else list(step)
    for s in wanted:
        if not isinstance(s, int) or isinstance(s, bool) or not 0 <= s < steps:
            raise ProbeError(f"probe step {s!r} is not one of the sampler's {steps} steps (0..{steps - 1})")
    _check_branch(branch)
    if len(prompts) != len(seeds) or not prompts:
        raise ProbeError(f"give one seed per prompt ({len(prompts)} prompts, {len(seeds)} seeds)")
    got: dict[int, list[torch.Tensor]] = {s: [] for s in wanted}
    with pooling(pipe, hp, got, branch), torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            gens = [torch.Generator().manual_seed(int(s)) for s in seeds[i:i + batch_size]]
            pipe(prompts[i:i + batch_size], num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                 output_type="latent", **call_kwargs)
    out = {}
    for s, rows in got.items():
        x = torch.cat(rows) if rows else torch.empty(0)
        if x.shape[0] != len(prompts):
            raise ProbeError(f"the block {hookpoint} gave {x.shape[0]} pooled rows for {len(prompts)} prompts at step {s} "
                             "(did the sampler run that step?)")
        out[s] = x
    return out if isinstance(step, (list, tuple)) else out[step]


def fit_concept_probe(pipe, hookpoint: str, prompts_by_concept: dict[str, list[str]], step: int | list[int],
                      seeds: list[int] | None = None, steps: int = 25, guidance: float = 5.0, l2: float = 1e-2,
                      batch_size: int = 32, branch: str = "uncond", **call_kwargs):
    """Fit a ConceptProbe on prompts that name each concept (the label is the prompt's concept).

    branch: "uncond" (default) reads what the noisy image alone carries, so it also flags samples of prompts
    that never name the concept; "cond" reads the prompt's branch, which knows what a prompt asks for (named,
    paraphrased or adversarial) from the first steps on, before the image has decided.

    seeds: one per prompt in order of `prompts_by_concept` (default 0, 1, ...); l2: the ridge penalty on W
    (features are standardised first, so one value suits every block). A list of steps fits one probe per
    step from one generation pass and returns them in that order."""
    if not isinstance(prompts_by_concept, dict) or len(prompts_by_concept) < 2:
        raise ProbeError("a probe needs at least two concepts, each with a list of prompts naming it")
    for c, ps in prompts_by_concept.items():
        if not isinstance(c, str) or not isinstance(ps, list) or not ps or not all(isinstance(p, str) for p in ps):
            raise ProbeError(f"concept {c!r}: expected a non-empty list of prompt strings")
    if not (isinstance(l2, (int, float)) and math.isfinite(l2) and l2 >= 0):
        raise ProbeError(f"l2 must be a finite number >= 0, got {l2!r}")
    concepts = list(prompts_by_concept)
    prompts = [p for c in concepts for p in prompts_by_concept[c]]
    labels = torch.tensor([i for i, c in enumerate(concepts) for _ in prompts_by_concept[c]])
    seeds = list(range(len(prompts))) if seeds is None else [int(s) for s in seeds]
    many = isinstance(step, (list, tuple))
    xs = pooled_activations(pipe, hookpoint, prompts, seeds, list(step) if many else [step], steps, guidance,
                            batch_size, branch=branch, **call_kwargs)
    meta = {"steps": steps, "guidance": guidance, "scheduler": type(pipe.scheduler).__name__, "l2": l2,
            "prompts": prompts_by_concept, "seeds": seeds, "branch": branch}
    name = resolve_hookpoint(pipe, hookpoint).name
    probes = [_fit(name, s, concepts, x, labels, l2, meta) for s, x in xs.items()]
    return probes if many else probes[0]


def fit_probe_on_activations(hookpoint: str, step: int, concepts: list[str], x: torch.Tensor, labels: torch.Tensor,
                             l2: float = 1e-2, meta: dict | None = None) -> ConceptProbe:
    """A ConceptProbe from pooled activations the caller already has ([N, d], e.g. `pooled_activations`)
    and labels of its choosing ([N] indices into `concepts`): for instance what a judge reads in each
    sample's finished plain image, to ask how early the denoiser knows where a sample is heading when the
    prompt never says (`benchmarks/early_detection.py`)."""
    if not isinstance(concepts, list) or len(concepts) < 2 or not all(isinstance(c, str) for c in concepts):
        raise ProbeError("a probe needs a list of at least two concept names")
    if not (isinstance(x, torch.Tensor) and x.ndim == 2 and isinstance(labels, torch.Tensor) and labels.ndim == 1
            and len(labels) == len(x) and len(x) > 0):
        raise ProbeError("give pooled activations [N, d] and one label per row [N]")
    if labels.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) or int(labels.min()) < 0 \
            or int(labels.max()) >= len(concepts):
        raise ProbeError(f"labels must be integer indices into the {len(concepts)} concepts")
    if not (isinstance(l2, (int, float)) and math.isfinite(l2) and l2 >= 0):
        raise ProbeError(f"l2 must be a finite number >= 0, got {l2!r}")
    return _fit(hookpoint, int(step), list(concepts), x.float(), labels.long(), l2, dict(meta or {}, l2=l2))


def _fit(hookpoint: str, step: int, concepts: list[str], x: torch.Tensor, labels: torch.Tensor, l2: float,
         meta: dict) -> ConceptProbe:
    mean, scale = x.mean(0), x.std(0) + 1e-4
    z = (x - mean) / scale
    w = torch.zeros(z.shape[1], len(concepts), requires_grad=True)
    b = torch.zeros(len(concepts), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ w + b, labels) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        train_acc = float(((z @ w + b).argmax(-1) == labels).float().mean())
    return ConceptProbe(hookpoint, int(step), concepts, mean, scale, w.detach(), b.detach(),
                        dict(meta, train_accuracy=train_acc))
