"""The TopK sparse autoencoder shared by Concept Steerers and SAeUron.

    a = ReLU(W_enc (x_n − b_dec) + b_enc)          all pre-activations (`pre_acts`)
    z = TopK_k(a)                                  per token, or BatchTopK over a training batch
    x̂ = denorm(W_decᵀ z + b_dec)                   only the selected rows of W_dec are touched

x_n is the input after the optional normalisation (a stored scalar `input_scale`, or a per-token
standardisation used by some foreign checkpoints); x̂ is returned in the original units.

Precision and device. The maths runs in the SAE's own dtype and on its device (float32 as loaded by
`load_sae`): `pre_acts`, `encode`, `decode`, `decode_dense` and `dense_latents` cast their inputs to
the SAE's dtype and device and return results in the dtype and on the device of the activation
they were given, so a float32 SAE works inside a bfloat16 / float16 pipeline (hooks) and a CPU SAE
answers a CUDA tensor on CUDA (moving the SAE there once, `sae.to(device)`, avoids the copies).

BatchTopK. During training (`sae.train()` and `cfg.batch_topk`) the forward keeps the k·N largest
activations of the whole batch, so tokens get a variable number of latents with mean k. Inference
is per token: after training, `calibrate_threshold` sets `threshold` to the value of the (k·N)-th
largest entry among the top-`inference_k` ReLU pre-activations of every calibration token, i.e. the
cut BatchTopK would make over the calibration set restricted to each token's `inference_k`
strongest latents (default 4k). At inference `encode` returns each token's top `inference_k`
latents with every value at or below the threshold set to zero, so the per-token L0 varies and
its mean is k on the calibration data. Before calibration (threshold 0) a BatchTopK SAE encodes
with plain per-token TopK(k), which is what SAeUron does.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..errors import DiffusionSAEError
from .kernels import sparse_decode, token_offsets, topk_encode


def _autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The encoder product's dtype under an active autocast region on x's device (else None: W_enc's)."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


class SAEError(DiffusionSAEError, ValueError):
    """A bad input (shape, config, file): its message is one line meant for the user."""


TOKEN_NORMS = ("none", "standardize", "rescale_norm")


@dataclass(frozen=True)
class SAEConfig:
    """What an SAE is (cfg.json). Immutable: a change is a new config, `dataclasses.replace(cfg, ...)`
    (`TopKSAE.replace_cfg`), so a config handed to several SAEs or kept by a caller never changes under them."""

    d_in: int
    num_latents: int
    k: int
    batch_topk: bool = False
    # Scalar input normalisation: x_n = x * input_scale, set from data so that E‖x_n‖² = d_in.
    normalize_input: bool = False
    input_scale: float = 1.0
    hookpoint: str | None = None
    # Per-token normalisation, for foreign checkpoints: "standardize" = (x − mean)/(std + 1e-5) over
    # features (SAeUron input_unit_norm, SAELens layer_norm); "rescale_norm" = x·sqrt(d)/‖x‖.
    token_norm: str = "none"
    # BatchTopK SAEs: width of the per-token selection at inference (None → min(4k, L)).
    inference_k: int | None = None
    # The calibrated BatchTopK inference threshold (calibrate_threshold); its one home (TopKSAE.threshold reads it).
    threshold: float = 0.0

    def __post_init__(self):
        for name in ("d_in", "num_latents", "k"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise SAEError(f"SAEConfig.{name} must be a positive integer, got {v!r}")
        if self.k > self.num_latents:
            raise SAEError(f"k={self.k} is larger than num_latents={self.num_latents}")
        if self.token_norm not in TOKEN_NORMS:
            raise SAEError(f"token_norm must be one of {TOKEN_NORMS}, got {self.token_norm!r}")
        if self.inference_k is not None and not (self.k <= self.inference_k <= self.num_latents):
            raise SAEError(f"inference_k={self.inference_k} must lie in [k={self.k}, num_latents={self.num_latents}]")
        if not (self.input_scale > 0):
            raise SAEError(f"input_scale must be positive, got {self.input_scale}")

    @property
    def encode_width(self) -> int:
        """Number of (value, index) slots `encode` returns per token."""
        if self.batch_topk and self.threshold > 0:
            return self.inference_k or min(4 * self.k, self.num_latents)
        return self.k

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SAEConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


class EncoderOutput(NamedTuple):
    top_acts: Tensor      # [..., w] activations (w = cfg.encode_width), zeros allowed
    top_indices: Tensor   # [..., w] latent ids


class ForwardInputs(NamedTuple):
    """A training / loss forward's inputs once normalised and its selection sizes fixed (`prepare_forward`):
    shared by the torch path (`TopKSAE.forward`) and the trainer's compiled CPU path (native.training_forward)."""
    xn: Tensor                  # [N, d] normalised input
    stats: object               # normalisation statistics for `denormalize`
    k: int                      # latents kept per token (the batch mean under BatchTopK training)
    batch_mode: bool            # BatchTopK over the batch (training) instead of per token
    dead_mask: Tensor | None    # AuxK's dead latents (None: no AuxK this step)
    k_aux: int                  # AuxK's latents per token (0: none)
    aux_scale: float            # min(#dead / k_aux, 1)
    total_variance: Tensor      # the FVU denominator


class ForwardOutput(NamedTuple):
    sae_out: Tensor         # [..., d] reconstruction in the input's units
    latent_acts: Tensor     # [..., k] per-token; flat [M] for a BatchTopK training batch
    latent_indices: Tensor  # same layout as latent_acts
    fvu: Tensor             # Σ‖x_n − x̂_n‖² / Σ‖x_n − mean(x_n)‖²  (normalised units)
    auxk_loss: Tensor       # AuxK loss (0 when no dead mask is given)
    latent_tokens: Tensor | None = None  # token id of every flat entry (BatchTopK training only)


def _positive_int(v, name):
    if v is None or isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise SAEError(f"{name} must be a positive integer, got {v!r}")
    return v


class TopKSAE(nn.Module):
    """TopK / BatchTopK sparse autoencoder (see the module docstring for the maths).

    W_enc [L, d], b_enc [L], W_dec [L, d] (row j = unit-norm direction of latent j), b_dec [d];
    `cfg.threshold` is the calibrated BatchTopK SAEs' inference threshold. The module holds no training
    state: the trainer keeps its buffers and its CPU backend's policy (sae/native.py, sae/train.py).
    """

    def __init__(self, d_in: int | None = None, num_latents: int | None = None, k: int | None = None,
                 batch_topk: bool = False, normalize_input: bool = False, *, cfg: SAEConfig | None = None,
                 hookpoint: str | None = None, seed: int | None = None, device=None, dtype=torch.float32,
                 **cfg_kwargs):
        super().__init__()
        if cfg is None:
            cfg = SAEConfig(d_in=_positive_int(d_in, "d_in"), num_latents=_positive_int(num_latents, "num_latents"),
                            k=_positive_int(k, "k"), batch_topk=batch_topk, normalize_input=normalize_input,
                            hookpoint=hookpoint, **cfg_kwargs)
        self.cfg = cfg
        L, d = cfg.num_latents, cfg.d_in
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        # nn.Linear's default init (uniform ±1/sqrt(d)), drawn on CPU so that a seed fixes it everywhere.
        bound = 1.0 / d ** 0.5
        w = torch.empty(L, d).uniform_(-bound, bound, generator=gen)
        self.W_enc = nn.Parameter(w.to(device=device, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(L, device=device, dtype=dtype))
        # Tied init: decoder row j = encoder row j, normalised (contiguous row-major: gathers are fast).
        self.W_dec = nn.Parameter((w / w.norm(dim=1, keepdim=True)).contiguous().to(device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d, device=device, dtype=dtype))
        # Optional per-latent statistics shipped with some foreign checkpoints (sdxl-unbox mean.pt/std.pt).
        self.latent_mean: Tensor | None = None
        self.latent_std: Tensor | None = None

    # ------------------------------------------------------------------ basics
    @property
    def threshold(self) -> float:
        """The calibrated BatchTopK inference threshold (0: not calibrated); stored in `cfg.threshold` only."""
        return self.cfg.threshold

    def replace_cfg(self, **changes) -> SAEConfig:
        """Give the SAE a new config with these fields changed (the config itself is immutable)."""
        self.cfg = replace(self.cfg, **changes)
        return self.cfg

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def num_latents(self) -> int:
        return self.cfg.num_latents

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    def _flat(self, x: Tensor) -> Tensor:
        if x.ndim == 0 or x.shape[-1] != self.cfg.d_in:
            raise SAEError(f"input width {tuple(x.shape)[-1] if x.ndim else 'scalar'} does not match the SAE's "
                           f"d_in={self.cfg.d_in}")
        return x.reshape(-1, self.cfg.d_in).to(self.device, self.dtype)

    @staticmethod
    def _back(t: Tensor, like: Tensor) -> Tensor:
        """t in the dtype (when floating) and on the device of `like` (the caller's activation)."""
        if like.is_floating_point():
            return t.to(like.device, like.dtype)
        return t.to(like.device)

    # ------------------------------------------------------------------ normalisation
    def normalize(self, x: Tensor):
        """x [N, d] -> (x_n, stats); stats feeds `denormalize` (None for scalar/no normalisation)."""
        tn = self.cfg.token_norm
        if tn == "standardize":
            mean = x.mean(dim=-1, keepdim=True)
            xc = x - mean
            std = xc.std(dim=-1, keepdim=True)
            # The eps enters the division only; de-normalising multiplies by the plain std (SAeUron, SAELens).
            return xc / (std + 1e-5), (mean, std)
        if tn == "rescale_norm":
            coeff = self.cfg.d_in ** 0.5 / x.norm(dim=-1, keepdim=True)
            return x * coeff, (torch.zeros_like(coeff), 1.0 / coeff)
        if self.cfg.normalize_input and self.cfg.input_scale != 1.0:
            return x * self.cfg.input_scale, None
        return x, None

    def denormalize(self, y: Tensor, stats) -> Tensor:
        if self.cfg.token_norm != "none":
            if stats is None:
                raise SAEError(f"this SAE normalises every token ({self.cfg.token_norm}); pass the input as x= "
                               "to decode so the reconstruction can be returned in its units")
            mean, scale = stats
            return y * scale + mean
        if self.cfg.normalize_input and self.cfg.input_scale != 1.0:
            return y / self.cfg.input_scale
        return y

    # ------------------------------------------------------------------ encode / decode
    def pre_acts(self, x: Tensor) -> Tensor:
        """Dense ReLU(W_enc (x_n − b_dec) + b_enc), shape [..., L]; no TopK (Concept Steerers)."""
        xf = self._flat(x)
        xn, _ = self.normalize(xf)
        a = torch.relu(torch.addmm(self.b_enc, xn - self.b_dec, self.W_enc.t()))
        return self._back(a.reshape(*x.shape[:-1], self.cfg.num_latents), x)

    def _encode_flat(self, xn: Tensor) -> EncoderOutput:
        w = self.cfg.encode_width
        vals, cols, _, _, _ = topk_encode(xn, self.W_enc, self.b_enc, w, shift=self.b_dec,
                                          compute_dtype=_autocast_dtype(xn))
        if self.cfg.batch_topk and self.cfg.threshold > 0:
            vals = vals * (vals > self.cfg.threshold)
        return EncoderOutput(vals, cols)

    def encode(self, x: Tensor) -> EncoderOutput:
        """Per-token sparse code: (top_acts, top_indices), each [..., cfg.encode_width].

        Per-token TopK(k); a calibrated BatchTopK SAE returns its top `inference_k` latents with the
        values at or below `threshold` zeroed (mean L0 ≈ k, see the module docstring).
        """
        xf = self._flat(x)
        xn, _ = self.normalize(xf)
        out = self._encode_flat(xn)
        lead = x.shape[:-1]
        return EncoderOutput(self._back(out.top_acts.reshape(*lead, -1), x),
                             out.top_indices.reshape(*lead, -1).to(x.device))

    def encode_topk(self, x: Tensor, k: int | None = None) -> EncoderOutput:
        """Plain per-token TopK(k) (default cfg.k), no BatchTopK threshold: how the official SAeUron loader
        encodes every SAE, also one trained as BatchTopK (its faithful mode uses this)."""
        xf = self._flat(x)
        xn, _ = self.normalize(xf)
        vals, cols, _, _, _ = topk_encode(xn, self.W_enc, self.b_enc, int(k or self.cfg.k), shift=self.b_dec,
                                          compute_dtype=_autocast_dtype(xn))
        lead = x.shape[:-1]
        return EncoderOutput(self._back(vals.reshape(*lead, -1), x), cols.reshape(*lead, -1).to(x.device))

    def decode(self, top_acts: Tensor, top_indices: Tensor, x: Tensor | None = None) -> Tensor:
        """Reconstruction [..., d] in the original units from a sparse code.

        `x` (the encoded input) is needed only for SAEs with a per-token normalisation.
        """
        lead = top_acts.shape[:-1]
        w = top_acts.shape[-1]
        acts = top_acts.reshape(-1, w).to(self.device, self.dtype)
        y = sparse_decode(acts, top_indices.reshape(-1, w).to(self.device), self.W_dec) + self.b_dec
        stats = self.normalize(self._flat(x))[1] if x is not None else None
        return self._back(self.denormalize(y, stats).reshape(*lead, self.cfg.d_in), x if x is not None else top_acts)

    def decode_change(self, delta: Tensor, top_indices: Tensor, x: Tensor | None = None) -> Tensor:
        """decode(acts + delta, idx, x) − decode(acts, idx, x): what a change of the sparse code adds to the
        reconstruction, [..., d] in the original units. Decoding is affine in the code, so this is one sparse
        product and the normalisation's scale (no bias, no second decode)."""
        lead = delta.shape[:-1]
        w = delta.shape[-1]
        y = sparse_decode(delta.reshape(-1, w).to(self.device, self.dtype), top_indices.reshape(-1, w).to(self.device),
                          self.W_dec)
        y = self._direction_units(y, x, "decode_change")
        return self._back(y.reshape(*lead, self.cfg.d_in), x if x is not None else delta)

    def decode_dense(self, z: Tensor, add_bias: bool = True, x: Tensor | None = None) -> Tensor:
        """W_decᵀ z (+ b_dec) for a dense code z [..., L], in the original units.

        add_bias=False gives the pure direction sum (Concept Steerers' steering vector). Not for the
        training hot path: this is a dense L-wide product.
        """
        lead = z.shape[:-1]
        y = z.reshape(-1, self.cfg.num_latents).to(self.device, self.dtype) @ self.W_dec
        if add_bias:
            y = y + self.b_dec
            stats = self.normalize(self._flat(x))[1] if x is not None else None
            y = self.denormalize(y, stats)
        else:
            y = self._direction_units(y, x, "decode_dense")
        return self._back(y.reshape(*lead, self.cfg.d_in), z)

    def _direction_units(self, y: Tensor, x: Tensor | None, caller: str) -> Tensor:
        """A decoder direction sum (no bias) [N, d] in the original units: denormalisation is affine, so a
        direction takes only its scale (the token's own scale for a per-token normalising SAE)."""
        if self.cfg.token_norm != "none":
            if x is None:
                raise SAEError(f"this SAE normalises every token; pass x= to {caller}")
            return y * self.normalize(self._flat(x))[1][1]
        if self.cfg.normalize_input and self.cfg.input_scale != 1.0:
            return y / self.cfg.input_scale
        return y

    def dense_latents(self, x: Tensor) -> Tensor:
        """The sparse code scattered into a dense [..., L] tensor (for interventions)."""
        acts, idx = self.encode(x)
        z = acts.new_zeros(*acts.shape[:-1], self.cfg.num_latents)
        return z.scatter_(-1, idx, acts)

    # ------------------------------------------------------------------ forward (training)
    def prepare_forward(self, x: Tensor, dead_mask: Tensor | None = None, k_aux: int | None = None,
                        total_variance: Tensor | None = None) -> ForwardInputs:
        """Normalise x and fix the selection sizes of a forward (see `forward` for the arguments)."""
        xn, stats = self.normalize(self._flat(x))
        batch_mode = self.training and self.cfg.batch_topk
        ka, scale = 0, 1.0
        if dead_mask is not None:
            n_dead = int(dead_mask.sum())
            k_req = k_aux if k_aux is not None else max(self.cfg.d_in // 2, 1)
            if n_dead > 0 and k_req > 0:
                ka = min(k_req, n_dead)
                scale = min(n_dead / k_req, 1.0)
        k = self.cfg.k if (batch_mode or not self.cfg.batch_topk or self.cfg.threshold <= 0) \
            else self.cfg.encode_width
        if total_variance is None:
            total_variance = (xn - xn.mean(0)).pow(2).sum()
        return ForwardInputs(xn, stats, k, batch_mode, dead_mask if ka else None, ka, scale, total_variance)

    def forward(self, x: Tensor, dead_mask: Tensor | None = None, k_aux: int | None = None,
                total_variance: Tensor | None = None, workspace: dict | None = None) -> ForwardOutput:
        """Encode, decode and compute the losses.

        dead_mask [L] bool enables AuxK: the top-k_aux dead latents (k_aux default d_in/2, capped at the
        number of dead latents) reconstruct the detached residual x_n − x̂_n without b_dec; the loss
        is scaled by min(#dead / k_aux, 1) and normalised like the FVU (spec §7, corrected form).
        total_variance overrides the FVU denominator (the trainer passes the global one under DDP).
        `workspace`: a caller's dict that keeps the [N, L] pre-activation buffer between calls
        (kernels.TopKEncoder); the trainer's CPU forward is native.training_forward.
        """
        return self.forward_prepared(x, self.prepare_forward(x, dead_mask, k_aux, total_variance), workspace)

    def forward_prepared(self, x: Tensor, p: ForwardInputs, workspace: dict | None = None) -> ForwardOutput:
        """The torch path of `forward` (differentiable, any device and dtype)."""
        xn, num_tokens = p.xn, p.xn.shape[0]
        vals, cols, rows, aux_vals, aux_cols = topk_encode(
            xn, self.W_enc, self.b_enc, p.k, p.batch_mode, p.dead_mask, p.k_aux, shift=self.b_dec,
            compute_dtype=_autocast_dtype(xn), workspace=workspace)
        if not p.batch_mode and self.cfg.batch_topk and self.cfg.threshold > 0:
            vals = vals * (vals > self.cfg.threshold)
        offsets = token_offsets(rows, num_tokens) if p.batch_mode else None
        recon = sparse_decode(vals, cols, self.W_dec, offsets) + self.b_dec

        resid = xn - recon
        fvu = resid.pow(2).sum() / p.total_variance
        if p.k_aux:
            aux_recon = sparse_decode(aux_vals, aux_cols, self.W_dec)
            auxk = p.aux_scale * (aux_recon - resid.detach()).pow(2).sum() / p.total_variance
        else:
            auxk = fvu.new_zeros(())
        out = self.denormalize(recon, p.stats).reshape(x.shape).to(x.dtype)
        lead = x.shape[:-1]
        if p.batch_mode:
            return ForwardOutput(out, vals, cols, fvu, auxk, rows)
        return ForwardOutput(out, vals.reshape(*lead, -1), cols.reshape(*lead, -1), fvu, auxk, None)

    # ------------------------------------------------------------------ decoder constraint
    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        eps = torch.finfo(self.W_dec.dtype).eps
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True) + eps)

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """g_j ← g_j − (g_j·w_j) w_j: the step cannot change a decoder row's norm to first order."""
        if self.W_dec.grad is None:
            return
        # vecdot + addcmul_: no [L, d] temporaries (at L = 12288 they cost more than the arithmetic)
        parallel = torch.linalg.vecdot(self.W_dec.grad, self.W_dec, dim=1)
        self.W_dec.grad.addcmul_(parallel.unsqueeze(1), self.W_dec, value=-1.0)

    # ------------------------------------------------------------------ calibration
    @torch.no_grad()
    def calibrate_threshold(self, batches, max_tokens: int | None = None, inference_k: int | None = None,
                            gather=None) -> float:
        """Set `threshold` so that calibrated per-token inference keeps BatchTopK's mean L0 of k.

        Collects every calibration token's top-`inference_k` ReLU pre-activations, then takes the
        (k·N)-th largest of them as the threshold. `gather` (optional) all-gathers the collected
        values across processes so every rank gets the same threshold.
        """
        w = inference_k or self.cfg.inference_k or min(4 * self.cfg.k, self.cfg.num_latents)
        collected, n = [], 0
        for xb in batches:
            xf = self._flat(xb)
            xn, _ = self.normalize(xf)
            top = torch.relu(torch.addmm(self.b_enc, xn - self.b_dec, self.W_enc.t())).topk(w, dim=-1).values
            collected.append(top.float())
            n += top.shape[0]
            if max_tokens is not None and n >= max_tokens:
                break
        if not collected:
            raise SAEError("no calibration data: the batch iterator was empty")
        vals = torch.cat(collected)
        if gather is not None:
            vals = gather(vals)
        num_tokens = vals.shape[0]
        m = min(self.cfg.k * num_tokens, vals.numel())
        thr = float(vals.reshape(-1).topk(m, sorted=False).values.min())
        # Ties at the threshold are dropped by the strict ">" rule; a tiny floor keeps zero activations out.
        thr = max(thr, 1e-12)
        self.replace_cfg(inference_k=w, threshold=thr)
        return thr

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, path) -> None:
        """Write cfg.json + sae.safetensors (sparsify's layout) to `path`, atomically."""
        from .io import save_sae

        save_sae(self, path)

    @classmethod
    def from_pretrained(cls, path, hookpoint: str | None = None, device="cpu") -> "TopKSAE":
        """Load from a folder with cfg.json (or a parent with one folder per hookpoint) or a hub id."""
        from .io import load_pretrained

        return load_pretrained(path, hookpoint=hookpoint, device=device)

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"d_in={c.d_in}, num_latents={c.num_latents}, k={c.k}, batch_topk={c.batch_topk}, "
                f"normalize_input={c.normalize_input}, token_norm={c.token_norm}")
