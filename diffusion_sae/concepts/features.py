"""Feature statistics: where, when and on what a block-SAE (or text-SAE) feature fires.

One pipeline pass over a prompt set records, for every generated image, the block SAE's latents on
the conditional branch, summarised two ways so that *every* feature can be looked at afterwards
without keeping the full [images, steps, patches, latents] tensor (200 x 25 x 64 x 1024 floats is
1.3 GB; the two summaries are ~40 MB in fp16):

    step_act[n, t, j]  = mean over patches of z_j at step t        (activation across steps)
    patch_act[n, p, j] = mean over steps of z_j at patch p          (heatmap over the image)

An image's score for feature j is the mean of either (they are the same number). The concepts that
rank a feature highest come from the SAeUron concept dictionaries (`ConceptDictionary.scores`,
averaged over steps); searching by concept name is the reverse lookup.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field

import torch

from ..models import StepTracker, as_tokens, register_edit, resolve_hookpoint
from ..errors import DiffusionSAEError


class FeatureError(DiffusionSAEError, ValueError):
    """A bad feature query; the message is one line: what, and what would be valid."""


def _check_index(f, num_latents: int) -> int:
    try:
        j = int(f)
    except (TypeError, ValueError):
        raise FeatureError(f"feature index must be an integer, got {f!r}") from None
    if isinstance(f, float) and f != j:
        raise FeatureError(f"feature index must be an integer, got {f!r}")
    if not 0 <= j < num_latents:
        raise FeatureError(f"feature {j} is out of range: the SAE has features 0..{num_latents - 1}")
    return j


@dataclass
class TopImage:
    index: int                 # row in FeatureStats (prompt / seed / image)
    prompt: str
    seed: int
    score: float               # mean activation over steps and patches
    heatmap: torch.Tensor      # [h, w] mean activation over steps per patch


@dataclass
class FeatureStats:
    hookpoint: str
    prompts: list[str]
    seeds: list[int]
    images: torch.Tensor       # [N, H, W, 3] uint8
    step_act: torch.Tensor     # [N, S, L] fp16
    patch_act: torch.Tensor    # [N, P, L] fp16
    grid: tuple[int, int]      # (h, w) patch grid, P = h * w
    timesteps: list[float]
    num_latents: int
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)

    def check(self, f) -> int:
        return _check_index(f, self.num_latents)

    def image_scores(self, f) -> torch.Tensor:
        """[N] mean activation of feature f in each image."""
        return self.step_act[:, :, self.check(f)].float().mean(1)

    def heatmap(self, f, i: int) -> torch.Tensor:
        h, w = self.grid
        return self.patch_act[i, :, self.check(f)].float().reshape(h, w)

    def top_images(self, f, n: int = 8) -> list[TopImage]:
        """The n images where f fires most (ties by prompt order); images where it never fires are left out."""
        s = self.image_scores(f)
        order = torch.argsort(-s, stable=True)[:n]
        return [TopImage(int(i), self.prompts[i], int(self.seeds[i]), float(s[i]), self.heatmap(f, int(i)))
                for i in order if s[i] > 0]

    def step_curve(self, f, images: list[int] | None = None) -> torch.Tensor:
        """[S] mean activation per denoising step, over the given images (default: all)."""
        a = self.step_act[:, :, self.check(f)].float()
        if images is not None:
            a = a[list(images)] if images else a[:0]
        return a.mean(0) if len(a) else torch.zeros(a.shape[1])

    def density(self, f) -> float:
        """Fraction of images in which f fires at all."""
        return float((self.image_scores(f) > 0).float().mean())

    def top_features(self, n: int = 16) -> list[int]:
        """Features with the strongest single-image activation: the ones worth a look first."""
        peak = self.step_act.float().mean(1).amax(0)          # [L]
        order = torch.argsort(-peak, stable=True)[:n]
        return [int(j) for j in order if peak[j] > 0]


@torch.no_grad()
def collect_feature_stats(pipe, sae, hookpoint: str | None = None, prompts: list[str] | None = None,
                          seeds: list[int] | None = None, steps: int = 25, guidance: float = 5.0,
                          batch_size: int = 16, progress=None) -> FeatureStats:
    """Generate every prompt once and record the block SAE's latents (cond branch) per step and patch."""
    hookpoint = hookpoint or sae.cfg.hookpoint
    if not hookpoint:
        raise FeatureError("the SAE has no hookpoint in its cfg.json: pass hookpoint=")
    hp = resolve_hookpoint(pipe, hookpoint)
    if hp.kind != "denoiser":
        raise FeatureError(f"{hookpoint!r} is not a denoiser block: image feature statistics need a block SAE "
                           "(e.g. unet.up_blocks.1.attentions.1)")
    if prompts is None:
        raise FeatureError("give the prompts to generate (prompts=, and seeds=), e.g. the concept prompts of "
                           "the model's benchmark")
    prompts = list(prompts)
    seeds = list(seeds) if seeds is not None else list(range(len(prompts)))
    if not prompts or len(seeds) != len(prompts):
        raise FeatureError(f"need at least one prompt and one seed per prompt (got {len(prompts)} prompts, "
                           f"{len(seeds)} seeds)")
    N, L = len(prompts), sae.cfg.num_latents
    step_act = torch.zeros(N, steps, L, dtype=torch.float16)
    patch_sum: torch.Tensor | None = None      # [N, P, L] fp32 while summing, fp16 at the end
    state: dict = {"rows": None, "grid": None}
    tracker = StepTracker(pipe)

    def record(x):
        """A capture is an edit that returns what it reads (a named hook in the block's HookRegistry)."""
        nonlocal patch_sum
        tok, grid = as_tokens(x, hookpoint)
        t = tracker.step_index
        if t is None or t >= steps:
            raise FeatureError(f"denoiser step {t} is outside the {steps}-step schedule")
        rows = tok[tracker.branches(tok.shape[0])["cond"]]
        z = sae.dense_latents(rows.to(sae.device, sae.dtype)).float().cpu()     # [B, P, L]
        if patch_sum is None:
            patch_sum = torch.zeros(N, z.shape[1], L)
            state["grid"] = grid or (1, z.shape[1])
        r = state["rows"]
        step_act[r, t] = z.mean(1).half()
        patch_sum[r] += z
        return x

    images = []
    handle = register_edit(hp, record, "diffusion_sae.feature_stats")
    timesteps: list[float] = []
    try:
        with tracker:
            for i in range(0, N, batch_size):
                rows = slice(i, min(i + batch_size, N))
                state["rows"] = rows
                gens = [torch.Generator().manual_seed(int(s)) for s in seeds[rows]]
                out = pipe(prompts[rows], num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                           output_type="pt")
                images.append((out.images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu())
                timesteps = [float(t) for t in pipe.scheduler.timesteps]
                if progress is not None:
                    progress(rows.stop, N)
    finally:
        handle.remove()
    return FeatureStats(hp.name, prompts, seeds, torch.cat(images), step_act, (patch_sum / steps).half(),
                        tuple(state["grid"]), timesteps, L, {"steps": steps, "guidance": guidance})


# ---------------------------------------------------------------------------------------------
# Concepts <-> features, through the concept dictionaries
# ---------------------------------------------------------------------------------------------
@dataclass
class ConceptHit:
    concept: str
    kind: str          # which dictionary ("style", "object", ...)
    score: float       # the dictionary score s_c, averaged over steps
    rank: int          # 1 = the concept's highest-scoring feature


class ConceptIndex:
    """Every concept of every dictionary, scored against every feature (mean over steps of s_c(t))."""

    def __init__(self, dictionaries: dict):
        if not dictionaries:
            raise FeatureError("no concept dictionaries: build one with `diffusion-sae concepts build`")
        self.concepts: list[str] = []
        self.kinds: list[str] = []
        rows = []
        for kind, d in dictionaries.items():
            for c in d.concepts:
                self.concepts.append(c)
                self.kinds.append(kind)
                rows.append(d.scores(c).mean(0))
        self.table = torch.stack(rows)                     # [C, L]
        self.num_latents = self.table.shape[1]
        # rank[c, j]: 1-based position of feature j in concept c's ordering
        order = torch.argsort(-self.table, dim=1, stable=True)
        self.rank = torch.empty_like(order)
        self.rank.scatter_(1, order, torch.arange(1, self.num_latents + 1).expand_as(order).clone())

    def top_concepts(self, f, n: int = 5) -> list[ConceptHit]:
        """The concepts whose scores favour feature f most (positive scores only)."""
        j = _check_index(f, self.num_latents)
        col = self.table[:, j]
        order = torch.argsort(-col, stable=True)[:n]
        return [ConceptHit(self.concepts[c], self.kinds[c], float(col[c]), int(self.rank[c, j]))
                for c in order if col[c] > 0]

    def find(self, query: str) -> int:
        q = (query or "").strip().lower()
        if not q:
            raise FeatureError("type a concept name, e.g. " + ", ".join(self.concepts[:3]))
        names = [c.lower() for c in self.concepts]
        if q in names:
            return names.index(q)
        sub = [i for i, c in enumerate(names) if q in c]
        if len(sub) == 1:
            return sub[0]
        close = difflib.get_close_matches(q, names, n=3, cutoff=0.5)
        hint = ", ".join(self.concepts[names.index(c)] for c in close) if close else ", ".join(self.concepts[:6])
        raise FeatureError(f"no concept {query!r} in the dictionaries; try: {hint}")

    def search(self, query: str, n: int = 10) -> tuple[str, list[tuple[int, float]]]:
        """(concept, [(feature, score), ...]) for a concept name, highest score first."""
        c = self.find(query)
        row = self.table[c]
        order = torch.argsort(-row, stable=True)[:n]
        return self.concepts[c], [(int(j), float(row[j])) for j in order if row[j] > 0]


# ---------------------------------------------------------------------------------------------
# Text-encoder SAE features: which tokens of which prompts
# ---------------------------------------------------------------------------------------------
@dataclass
class TextFeatureStats:
    prompts: list[str]
    tokens: list[list[str]]     # the tokens up to and including end-of-text, per prompt
    acts: torch.Tensor          # [N, T, L] the SAE code per token (0 past each prompt's end)
    num_latents: int

    def top_tokens(self, f, n: int = 10) -> list[tuple[str, str, int, float]]:
        """(prompt, token, position, activation) where feature f fires most."""
        j = _check_index(f, self.num_latents)
        a = self.acts[:, :, j]
        flat = torch.argsort(-a.flatten(), stable=True)[:n]
        T = a.shape[1]
        out = []
        for k in flat:
            i, t = divmod(int(k), T)
            if a[i, t] > 0:
                out.append((self.prompts[i], self.tokens[i][t], t, float(a[i, t])))
        return out


@torch.no_grad()
def text_feature_stats(pipe, sae, prompts: list[str], hookpoint: str | None = None) -> TextFeatureStats:
    """Encode prompts with the pipeline's text encoder and record the text SAE's code per token."""
    from ..models.text_layers import layer_activations

    hookpoint = hookpoint or sae.cfg.hookpoint
    h = layer_activations(pipe, hookpoint, list(prompts))                 # [N, T, d]
    z = sae.dense_latents(h.to(sae.device, sae.dtype)).float().cpu()      # [N, T, L]
    tok = pipe.tokenizer
    ids = tok(list(prompts), padding="max_length", max_length=h.shape[1], truncation=True,
              return_tensors="pt").input_ids
    tokens = []
    for i, row in enumerate(ids.tolist()):
        names = tok.convert_ids_to_tokens(row)
        end = row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
        z[i, end:] = 0
        tokens.append([str(t) for t in names[:end]] + [""] * (len(row) - end))
    return TextFeatureStats(list(prompts), tokens, z, sae.cfg.num_latents)
