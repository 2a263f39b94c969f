"""SAeUron concept dictionaries: per-concept, per-step mean SAE latents at a denoiser block.

For each concept c (a style, an object, ...) and prompt p of that concept, the block's conditional
output at denoising step t is encoded token by token (per-token TopK) and averaged over patches:

    m_c[p, t, :] = mean_patch TopK_k(ReLU(W_enc (x − b_dec) + b_enc))

Only the mean over prompts μ_c(t) = mean_p m_c[p, t, :] is ever used, so that is what is stored:
a [C, S, L] fp32 tensor plus the sampler's timesteps, in `concept_dictionary.safetensors` +
`concept_dictionary.json` next to the SAE (the official code pickles [N_prompts, 100, L] fp16 per
concept: gigabytes; as in the official SAeUron code).

Scores (§3.6): s_c(t) = μ_c(t)/Σ_j μ_c,j(t) − μ_¬c(t)/Σ_j μ_¬c,j(t), with μ_¬c the mean over the
pooled prompts of all other concepts of the dictionary.

Beyond the paper (`selection="specific"`): patch means hide where a latent fires. A latent that fires
on half the patches of every style has a high mean for each of them, and the paper's firing bar (the
all-concept patch mean ν) lets its edit touch most patches of the other concepts too. So the build also
keeps, per concept, a histogram of every latent's per-patch values, and stores two tables:

    bars[c, t, j]   = the q-quantile (default 0.95) of z_j on the other concepts' patches
                      (each concept weighted equally): the edit's bar, so it touches ≤ 1 − q of them
    excess[c, t, j] = E_patches of c [(z_j − bars[c, t, j])+]: how much of the latent stands above it

and "specific" selection ranks latents by `excess` instead of s_c.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..models import StepTracker, as_tokens, read_tensor, resolve_hookpoint
from ..errors import DiffusionSAEError
from .pairfile import read_pair, write_pair

FILE = "concept_dictionary"


class DictionaryError(DiffusionSAEError, ValueError):
    """Bad concept-dictionary input; one line: what, where, how to fix."""


PACKAGE_DIR = Path(__file__).resolve().parent.parent


def inside_package(path: str | Path) -> bool:
    """True if `path` lies in the installed diffusion_sae package (whose files are never written)."""
    res = Path(path).resolve()
    return res == PACKAGE_DIR or PACKAGE_DIR in res.parents


def check_output_folder(folder: str | Path, option: str = "--out") -> Path:
    """Refuse a dictionary output folder before any work: inside the package, a file, or unwritable."""
    folder = Path(folder)
    if inside_package(folder):
        raise DictionaryError(f"{option} {folder}: inside the installed diffusion_sae package, whose files are "
                              "never overwritten; give --out FOLDER of your own (then unlearn --dictionary FOLDER)")
    if folder.exists() and not folder.is_dir():
        raise DictionaryError(f"{option} {folder}: exists and is not a folder; give a folder")
    parent = folder.resolve()
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DictionaryError(f"{option} {folder}: cannot write in {parent} (permission denied); give a writable folder")
    return folder


def _check_tensor(x: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise DictionaryError(f"{what} holds NaN or inf values: the dictionary is damaged; rebuild it with "
                              "`diffusion-sae concepts build`")


@dataclass
class ConceptDictionary:
    hookpoint: str
    concepts: list[str]
    means: torch.Tensor            # [C, S, L] μ_c(t)
    counts: list[int]              # prompts per concept
    timesteps: list[float]         # the sampler's timesteps, one per step (the step grid)
    meta: dict = field(default_factory=dict)
    bars: torch.Tensor | None = None    # [C, S, L] others' per-patch q-quantile ("specific" selection)
    excess: torch.Tensor | None = None  # [C, S, L] mean excess of c's patches over that bar

    # --- persistence -------------------------------------------------------------------------
    def save(self, folder: str | Path, name: str = FILE) -> Path:
        """Write {name}.safetensors and {name}.json into folder (each atomically; no temporary file is
        left behind on error). Refuses a folder inside the installed package."""
        if not name or Path(name).name != name or name.startswith("."):
            raise DictionaryError(f"--name {name!r}: give a plain file stem such as concept_dictionary")
        folder = check_output_folder(folder)
        _check_tensor(self.means, "the dictionary's means")
        tensors = {"means": self.means.contiguous().float()}
        if self.bars is not None:
            tensors["bars"] = self.bars.contiguous().half()
            tensors["excess"] = self.excess.contiguous().half()
        doc = {"hookpoint": self.hookpoint, "concepts": self.concepts, "counts": self.counts,
               "timesteps": self.timesteps, "meta": self.meta}
        # the JSON names the tensors file it belongs to (pairfile): a kill between the two renames leaves a
        # pair load() refuses as mismatched instead of mixing two dictionaries
        return write_pair(folder, name, tensors, doc, error=DictionaryError,
                          cannot_write="cannot write the concept dictionary to {folder}: {why}; "
                                       "give --out a writable folder with free space")

    @classmethod
    def load(cls, folder: str | Path, name: str = FILE) -> "ConceptDictionary":
        def check_doc(doc, j: Path) -> None:
            fields_ = {"hookpoint": str, "concepts": list, "counts": list, "timesteps": list}
            if not isinstance(doc, dict) or any(not isinstance(doc.get(k), tp) for k, tp in fields_.items()):
                raise DictionaryError(f"{j}: not a concept dictionary (expected an object with hookpoint, concepts, "
                                      "counts and timesteps); rebuild it with `diffusion-sae concepts build`")
            if not all(isinstance(c, str) for c in doc["concepts"]) or len(doc["counts"]) != len(doc["concepts"]):
                raise DictionaryError(f"{j}: concepts must be names with one count each; rebuild it with "
                                      "`diffusion-sae concepts build`")

        rebuild = "rebuild it with `diffusion-sae concepts build`"
        doc, tensors = read_pair(
            folder, name, error=DictionaryError, check_doc=check_doc, exists=Path.exists,
            missing="no concept dictionary at {folder} ({stem}.json / {stem}.safetensors missing): "
                    "build one with `diffusion-sae concepts build`",
            bad_json="{json}: not a readable concept-dictionary JSON file ({why}); " + rebuild,
            mismatch="{tensors} does not belong to {json} (a write was interrupted, or one file was replaced); "
                     "rebuild the dictionary with `diffusion-sae concepts build`",
            bad_tensors="{tensors} is not a readable safetensors file ({why}): " + rebuild)
        t, j = Path(folder) / f"{name}.safetensors", Path(folder) / f"{name}.json"
        if "means" not in tensors:
            raise DictionaryError(f"{t}: no 'means' tensor (found {sorted(tensors)}); rebuild it with "
                                  "`diffusion-sae concepts build`")
        means = tensors["means"]
        for name_, x in tensors.items():
            if x.ndim != 3:
                raise DictionaryError(f"{t}: {name_} has shape {tuple(x.shape)}, expected [concepts, steps, latents]")
            _check_tensor(x, f"{t}: {name_}")
        for name, x in tensors.items():
            if x.shape[0] != len(doc["concepts"]) or x.shape[1] != len(doc["timesteps"]) or x.shape[2] != means.shape[2]:
                raise DictionaryError(f"{t}: {name} {tuple(x.shape)} do not match {len(doc['concepts'])} concepts "
                                      f"x {len(doc['timesteps'])} steps in {j}")
        bars, excess = tensors.get("bars"), tensors.get("excess")
        return cls(doc["hookpoint"], doc["concepts"], means, doc["counts"], doc["timesteps"], doc.get("meta", {}),
                   None if bars is None else bars.float(), None if excess is None else excess.float())

    # --- scoring -----------------------------------------------------------------------------
    def index(self, concept: str) -> int:
        if concept not in self.concepts:
            import difflib
            close = difflib.get_close_matches(concept, self.concepts, n=3)
            raise DictionaryError(f"concept {concept!r} is not in the dictionary at {self.hookpoint}; "
                                  f"known: {', '.join(close or self.concepts[:8])}")
        return self.concepts.index(concept)

    def others_mean(self, c: int) -> torch.Tensor:
        """μ_¬c(t): mean over the pooled prompts of every other concept, [S, L]."""
        w = torch.tensor(self.counts, dtype=torch.float32)
        w[c] = 0
        if w.sum() == 0:
            raise DictionaryError("scores need at least two concepts in the dictionary")
        return torch.einsum("c,csl->sl", w / w.sum(), self.means.float())

    def scores(self, concept: str) -> torch.Tensor:
        """s_c(t) for every step and latent, [S, L]."""
        c = self.index(concept)
        mu = self.means[c].float()
        rest = self.others_mean(c)
        return mu / (mu.sum(-1, keepdim=True) + 1e-8) - rest / (rest.sum(-1, keepdim=True) + 1e-8)

    def average(self) -> torch.Tensor:
        """ν(t): the average over all concepts (each weighted equally), [S, L]: the firing mask's bar."""
        return self.means.float().mean(0)

    def _specific(self, table: str, concept: str) -> torch.Tensor:
        if self.excess is None:
            raise DictionaryError(f"the dictionary at {self.hookpoint} has no per-patch statistics for "
                                  "selection='specific': rebuild it with `diffusion-sae concepts build`")
        return getattr(self, table)[self.index(concept)].float()

    def specific_scores(self, concept: str) -> torch.Tensor:
        """excess_c(t): the concept's mean per-patch excess over the others' q-quantile, [S, L]."""
        return self._specific("excess", concept)

    def concept_bar(self, concept: str) -> torch.Tensor:
        """The others' per-patch q-quantile for the concept, [S, L] (the 'specific' edit's bar)."""
        return self._specific("bars", concept)

    def select(self, concept: str, percentile: float | None = None, top_n: int | None = None,
               method: str = "paper") -> list[torch.Tensor]:
        """Selected latent indices per step: s > quantile(s, p/100), or the top_n scores.

        method="paper": s = s_c (normalised mean difference); "specific": s = excess_c."""
        if (percentile is None) == (top_n is None):
            raise DictionaryError("give exactly one of percentile (e.g. 99.9) or top_n (e.g. 2)")
        if method not in ("paper", "specific"):
            raise DictionaryError(f"selection must be 'paper' or 'specific', not {method!r}")
        # top_n = 0 selects nothing: an exact no-op edit that the library allows (the CLI refuses it).
        if top_n is not None and (isinstance(top_n, bool) or not 0 <= int(top_n) <= self.means.shape[-1]):
            raise DictionaryError(f"--top-n must lie in 1..{self.means.shape[-1]} (the SAE's latents), got {top_n}")
        if percentile is not None and not 0 < percentile < 100:
            raise DictionaryError(f"percentile must be in (0, 100), got {percentile}")
        s = self.scores(concept) if method == "paper" else self.specific_scores(concept)
        out = []
        for t in range(s.shape[0]):
            if top_n is not None:
                idx = torch.topk(s[t], int(top_n)).indices
                idx = idx[s[t, idx] > 0]  # a latent more typical of the rest is never "the concept's"
            else:
                if not 0 < percentile < 100:
                    raise DictionaryError(f"percentile must be in (0, 100), got {percentile}")
                tau = torch.quantile(s[t], percentile / 100.0)
                idx = torch.nonzero(s[t] > tau).flatten()
            out.append(idx.sort().values)
        return out


# Histogram bins for per-patch latent values: 0 exactly (a latent TopK dropped), then geometric bins
# from 1e-3 to 100 (latents are non-negative; relative resolution ≈ 10 % is plenty for a bar).
HIST_EDGES = torch.cat([torch.zeros(1), torch.logspace(-3, 2, 96)])


def _specificity(hist: torch.Tensor, q: float) -> tuple[torch.Tensor, torch.Tensor]:
    """hist [C, S, L, B] counts -> (bars, excess), each [C, S, L]; see the module docstring."""
    C = hist.shape[0]
    p = hist / hist.sum(-1, keepdim=True).clamp_min(1)             # per-concept distributions
    e = HIST_EDGES
    upper = torch.cat([e, e[-1:]])                                  # bin b covers (e[b-1], e[b]]
    centre = torch.cat([e[:1], (e[:-1].clamp_min(e[1] / 10) * e[1:]).sqrt(), e[-1:]])
    bars = torch.zeros(hist.shape[:3])
    excess = torch.zeros(hist.shape[:3])
    for c in range(C):
        others = (p.sum(0) - p[c]) / max(C - 1, 1)
        cdf = others.cumsum(-1)
        b = (cdf < q - 1e-6).sum(-1).clamp_max(len(upper) - 1)       # first bin reaching q
        bars[c] = upper[b]
        excess[c] = (p[c] * (centre - bars[c][..., None]).clamp_min(0)).sum(-1)
    return bars, excess


@torch.no_grad()
def build_concept_dictionary(pipe, sae, hookpoint: str, prompts_by_concept: dict[str, list[str]],
                             seeds: list[int] | dict[str, list[int]] | None = None, steps: int = 25,
                             guidance: float = 5.0, batch_size: int = 32, progress=None, bar_quantile: float = 0.95,
                             labeller=None, labels: list[str] | None = None, **call_kwargs) -> ConceptDictionary:
    """Run the pipeline on every concept's prompts and average the SAE latents per concept and step
    (plus the per-patch statistics of 'specific' selection, see the module docstring).

    seeds: a list (prompt i of every concept gets seeds[i % len]) or {concept: [one seed per prompt]}.
    labeller, labels: file each sample under the concept its finished image shows instead of the key its prompt is
    listed under. labeller(images [B, 3, H, W] in [0, 1]) returns one name of `labels` per image, and `labels` are
    the dictionary's concepts; the keys of prompts_by_concept are then only groups of prompts (e.g. prompts that
    name no concept at all). A concept no sample was judged to show keeps zero means and a count of 0."""
    if not 0 < bar_quantile < 1:
        raise DictionaryError(f"bar_quantile must be in (0, 1), got {bar_quantile}")
    if not prompts_by_concept or not isinstance(prompts_by_concept, dict):
        raise DictionaryError("no concepts given: expected {concept: [prompt, ...]}")
    for c, ps in prompts_by_concept.items():
        if not isinstance(c, str) or not isinstance(ps, list) or not ps or not all(isinstance(p, str) for p in ps):
            raise DictionaryError(f"concept {c!r}: expected a non-empty list of prompt strings, got {ps!r:.60}")
    if not isinstance(steps, int) or steps <= 0:
        raise DictionaryError(f"--steps must be a positive number of denoising steps, got {steps}")
    if not math.isfinite(guidance):
        raise DictionaryError(f"--guidance must be a finite number, got {guidance}")
    if (labeller is None) != (labels is None):
        raise DictionaryError("labeller and labels go together: labels lists the concepts labeller may return")
    if labels is not None and (not labels or not all(isinstance(c, str) for c in labels) or len(set(labels)) < len(labels)):
        raise DictionaryError(f"labels must be distinct concept names, got {labels!r:.80}")
    if isinstance(seeds, dict):
        for c, ps in prompts_by_concept.items():
            if len(seeds.get(c, ())) != len(ps):
                raise DictionaryError(f"seeds of {c!r}: expected one per prompt ({len(ps)}), got "
                                      f"{len(seeds.get(c, ()))}")
    hp = resolve_hookpoint(pipe, hookpoint)
    if hp.kind != "denoiser":
        raise DictionaryError(f"hookpoint {hookpoint!r} is not a denoiser block; SAeUron reads e.g. "
                              "unet.up_blocks.1.attentions.1")
    L = sae.cfg.num_latents
    groups = list(prompts_by_concept)
    concepts = list(labels) if labels is not None else groups
    sums = torch.zeros(len(concepts), steps, L)
    hist = torch.zeros(len(concepts), steps, L, len(HIST_EDGES) + 1)
    counts = [0] * len(concepts) if labels is not None else [len(prompts_by_concept[c]) for c in concepts]
    jobs = [(gi, p, i) for gi, g in enumerate(groups) for i, p in enumerate(prompts_by_concept[g])]
    # per step of the batch: (patch means, per-patch histogram bins); filed under a concept when the rows' labels
    # are known, which with a labeller is only after the batch's images are finished
    state = {"rows": None, "steps": {}}
    tracker = StepTracker(pipe)

    def file_batch(rows):
        for t, (zmean, bins) in state["steps"].items():
            for r, ci in enumerate(rows):
                sums[ci, t] += zmean[r]
                hist[ci, t].scatter_add_(1, bins[r].T.long().contiguous(), torch.ones(L, bins.shape[1]))
        state["steps"].clear()

    def seed_of(gi, j):
        if isinstance(seeds, dict):
            return seeds[groups[gi]][j]
        return seeds[j % len(seeds)] if seeds else j

    def hook(mod, args, kwargs, out):
        x = read_tensor(hp, mod, args, kwargs, out)
        tok, _ = as_tokens(x, hookpoint)
        br = tracker.branches(tok.shape[0])
        rows = tok[br["cond"]]
        t = tracker.step_index
        if t is None or t >= steps:
            raise DictionaryError(f"denoiser step {t} outside the dictionary's {steps}-step grid")
        z = sae.dense_latents(rows.to(sae.dtype))           # [B, P, L]
        zmean = z.mean(1).float().cpu()                      # mean over patches
        # uint8 bins (97 edges): a batch's steps wait for their labels without holding int64 [B, P, L] per step
        state["steps"][t] = (zmean, torch.bucketize(z.float().cpu(), HIST_EDGES).to(torch.uint8))
        if labeller is None:
            file_batch(state["rows"])

    handle = hp.module.register_forward_hook(hook, with_kwargs=True)
    timesteps = None
    try:
        with tracker:
            for i in range(0, len(jobs), batch_size):
                chunk = jobs[i:i + batch_size]
                state["rows"] = [gi for gi, _, _ in chunk]
                gens = [torch.Generator().manual_seed(int(seed_of(gi, j))) for gi, _, j in chunk]
                out = pipe([p for _, p, _ in chunk], num_inference_steps=steps, guidance_scale=guidance,
                           generator=gens, output_type="latent" if labeller is None else "pt", **call_kwargs)
                if labeller is not None:
                    judged = list(labeller(out.images.float()))
                    bad = [v for v in judged if v not in concepts]
                    if len(judged) != len(chunk) or bad:
                        raise DictionaryError(f"labeller must return one of {concepts} per image; got {len(judged)} "
                                              f"labels for {len(chunk)} images{f', unknown {bad[:3]}' if bad else ''}")
                    rows = [concepts.index(v) for v in judged]
                    for ci in rows:
                        counts[ci] += 1
                    file_batch(rows)
                if timesteps is None:
                    timesteps = [float(t) for t in pipe.scheduler.timesteps]
                if progress is not None:
                    progress(min(i + batch_size, len(jobs)), len(jobs))
    finally:
        handle.remove()
    means = sums / torch.tensor(counts, dtype=torch.float32).clamp(min=1)[:, None, None]
    meta = {"steps": steps, "guidance": guidance, "scheduler": type(pipe.scheduler).__name__,
            "prompts": prompts_by_concept, "seeds": seeds, "k": sae.cfg.k, "bar_quantile": bar_quantile}
    if labeller is not None:
        meta["labelled_by"] = getattr(labeller, "__name__", type(labeller).__name__)
    bars, excess = _specificity(hist, bar_quantile) if len(concepts) > 1 else (None, None)
    return ConceptDictionary(hp.name, concepts, means, counts, timesteps, meta, bars, excess)
