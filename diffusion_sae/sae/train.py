"""Training TopK / BatchTopK SAEs from any iterator of activation batches.

One step (every process, in this order):
  1. x = this process's slice of the next global batch (`batch_size` tokens, re-chunked from whatever
     sizes the iterator yields; NaN/inf stops training with the step named);
  2. first step only: input scale (if `normalize_input`) and b_dec (geometric median or mean) from
     the first global batch;
  3. loss = FVU + auxk_alpha·AuxK, FVU's denominator the variance of the *global* batch;
  4. backward; gradients summed across processes (so N processes = one process on the global batch);
  5. remove the decoder-gradient component parallel to each (unit-norm) decoder row; clip; Adam step;
     renormalise decoder rows;
  6. dead-latent bookkeeping in tokens (dead = not fired for `dead_tokens_threshold` tokens).

BatchTopK SAEs get their inference threshold calibrated after training on the last
`calibrate_tokens` tokens seen (see model.py). Peak memory is one batch plus the model: the
iterator is consumed lazily and never stored (only that calibration tail is kept).

Resume: `run_dir/latest` names the newest checkpoint folder (SAE + optimizer + counters). A resumed
run re-reads the iterator from the start, skips the batches already trained on and ends with the
same weights as an uninterrupted run.

Distributed: start with `accelerate launch` (or any torchrun-style launcher); the process group is
initialised here if the environment asks for it. Each process takes its contiguous slice of every
global batch. BatchTopK selection is per process (like sparsify); per-token TopK is exact.
"""
# Over 600 lines on purpose: one training loop with its checkpointing, resume, DDP reduction and
# failure-safe final save; split apart they would share most of their state through arguments.
from __future__ import annotations

import collections
import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from . import cpu_backend, metrics
from .kernels import workspace_buffer
from .model import SAEConfig, SAEError, TopKSAE


@dataclass
class TrainConfig:
    lr: float | None = None               # None: 2e-4 / sqrt(L / 2^14) (sparsify's rule)
    lr_schedule: str = "constant"         # constant | linear_decay (to 0 at max_tokens)
    warmup_steps: int = 0
    auxk_alpha: float = 1 / 32
    k_aux: int | None = None              # None: d_in // 2
    dead_tokens_threshold: int = 10_000_000
    batch_size: int = 4096                # global batch, in tokens
    grad_clip: float = 1.0                # 0 disables clipping
    seed: int = 0
    log_every: int = 100
    ckpt_every: int = 0                   # steps; 0 = only at the end (needs run_dir)
    max_tokens: int | None = None         # None: one pass over the iterator
    autocast: str = "none"                # none | bf16 | fp16: mixed precision (fp16: GPU; bf16: GPUs and CPUs with AVX512-BF16/AMX)
    b_dec_init: str = "geometric_median"  # geometric_median | mean
    int8_screen: bool = True              # CPU per-token TopK: pick 2k candidates by an int8 product, then exact top-k (native.screened_topk)
    calibrate_tokens: int = 16384         # BatchTopK threshold calibration sample
    adam_eps: float = 6.25e-10
    keep_checkpoints: int = 2
    tensorboard: bool = False
    device: str = "auto"                  # auto: cuda:LOCAL_RANK when available, else cpu

    def __post_init__(self):
        if self.lr_schedule not in ("constant", "linear_decay"):
            raise SAEError(f"lr_schedule must be constant or linear_decay, got {self.lr_schedule!r}")
        if self.autocast not in ("none", "bf16", "fp16"):
            raise SAEError(f"autocast must be none, bf16 or fp16, got {self.autocast!r}")
        if self.b_dec_init not in ("geometric_median", "mean"):
            raise SAEError(f"b_dec_init must be geometric_median or mean, got {self.b_dec_init!r}")
        if self.batch_size <= 0:
            raise SAEError(f"batch_size must be positive, got {self.batch_size}")
        # (the CLI's options are these names with dashes: --lr, --warmup-steps, ...)
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise SAEError(f"--lr must be a positive finite learning rate such as 2e-4, got {self.lr}")
        for name, lo in (("auxk_alpha", 0.0), ("grad_clip", 0.0), ("adam_eps", 0.0)):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= lo):
                raise SAEError(f"--{name.replace('_', '-')} must be a finite number >= {lo:g}, got {v}")
        for name, lo in (("warmup_steps", 0), ("ckpt_every", 0), ("dead_tokens_threshold", 0), ("log_every", 1),
                         ("keep_checkpoints", 1), ("calibrate_tokens", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise SAEError(f"--{name.replace('_', '-')} must be an integer >= {lo}, got {v!r}")
        for name in ("max_tokens", "k_aux"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
                raise SAEError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def geometric_median(x: Tensor, max_iter: int = 100, tol: float = 1e-5) -> Tensor:
    """Weiszfeld iterations from the mean: the point minimising the sum of Euclidean distances."""
    y = x.mean(0)
    for _ in range(max_iter):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(1e-8)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        done = (y_new - y).norm() <= tol * y.norm().clamp_min(1.0)
        y = y_new
        if done:
            break
    return y


def rebatch(batches: Iterable[Tensor], batch_size: int, multiple_of: int = 1) -> Iterator[Tensor]:
    """Re-chunk a stream of [n_i, d] (or [..., d]) tensors into [batch_size, d] batches.

    Holds at most one incoming chunk plus one batch. The last partial batch is yielded, trimmed to a
    multiple of `multiple_of` (the number of processes)."""
    buf: list[Tensor] = []
    have = 0
    for chunk in batches:
        if not isinstance(chunk, Tensor):
            chunk = torch.as_tensor(chunk)
        chunk = chunk.reshape(-1, chunk.shape[-1])
        while chunk.shape[0]:
            take = min(batch_size - have, chunk.shape[0])
            buf.append(chunk[:take])
            have += take
            chunk = chunk[take:]
            if have == batch_size:
                yield buf[0] if len(buf) == 1 else torch.cat(buf)
                buf, have = [], 0
    have -= have % multiple_of
    if have:
        yield torch.cat(buf)[:have]


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _maybe_init_distributed() -> None:
    """Under `accelerate launch` / torchrun the env names a world; join it if nobody did yet."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        from accelerate import PartialState

        PartialState()


def _all_gather_cat(t: Tensor) -> Tensor:
    world, _ = _dist_info()
    if world == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def _all_reduce_sum_(t: Tensor) -> Tensor:
    if _dist_info()[0] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _resolve_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# trainer
# ---------------------------------------------------------------------------------------------
class SAETrainer:
    """Owns the SAE, its optimiser and counters; `fit(batches)` trains, checkpoints and calibrates."""

    def __init__(self, sae_or_cfg: TopKSAE | SAEConfig, cfg: TrainConfig | None = None, run_dir=None):
        _maybe_init_distributed()
        self.cfg = cfg or TrainConfig()
        self.workspace: dict | None = None   # the CPU backend's buffers while `fit` runs (cpu_backend.py)
        self.world, self.rank = _dist_info()
        self.device = _resolve_device(self.cfg.device)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.step = 0
        self.tokens = 0
        self.initialized = False
        self.history: list[dict] = []
        if self.run_dir is not None:  # before any training: a run that cannot be saved is refused at once
            if self.run_dir.exists() and not self.run_dir.is_dir():
                raise SAEError(f"--out {self.run_dir} is a file; give a folder for the run")
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise SAEError(f"--out {self.run_dir}: cannot create it ({e.strerror or e}); give a writable folder") from None
            if not os.access(self.run_dir, os.W_OK | os.X_OK):
                raise SAEError(f"--out {self.run_dir}: not writable (permission denied); give a writable folder")
        ckpt = self.latest_checkpoint()
        if ckpt is not None:
            from .io import load_sae

            self.sae = load_sae(ckpt / "sae").to(self.device)
            given = sae_or_cfg.cfg if isinstance(sae_or_cfg, TopKSAE) else sae_or_cfg
            if given is not None and (given.d_in, given.num_latents, given.k) != (
                    self.sae.cfg.d_in, self.sae.cfg.num_latents, self.sae.cfg.k):
                raise SAEError(f"{ckpt}: checkpoint is d_in={self.sae.cfg.d_in}, L={self.sae.cfg.num_latents}, "
                               f"k={self.sae.cfg.k} but the requested SAE is d_in={given.d_in}, "
                               f"L={given.num_latents}, k={given.k}; use another run_dir")
            if given is not None and given.hookpoint and self.sae.cfg.hookpoint and given.hookpoint != self.sae.cfg.hookpoint:
                raise SAEError(f"{ckpt}: checkpoint is an SAE for {self.sae.cfg.hookpoint} but the requested SAE is for "
                               f"{given.hookpoint}; use another run_dir")
        elif isinstance(sae_or_cfg, TopKSAE):
            self.sae = sae_or_cfg.to(self.device)
        elif isinstance(sae_or_cfg, SAEConfig):
            self.sae = TopKSAE(cfg=sae_or_cfg, seed=self.cfg.seed, device=self.device)
        else:
            raise SAEError(f"train_sae needs a TopKSAE or an SAEConfig, got {type(sae_or_cfg).__name__}")
        L = self.sae.cfg.num_latents
        self.lr = self.cfg.lr if self.cfg.lr is not None else 2e-4 / math.sqrt(L / 2 ** 14)
        kw = dict(lr=self.lr, eps=self.cfg.adam_eps)
        try:
            self.opt = torch.optim.Adam(self.sae.parameters(), fused=True, **kw)
        except (RuntimeError, TypeError):
            self.opt = torch.optim.Adam(self.sae.parameters(), **kw)
        self.tokens_since_fired = torch.zeros(L, dtype=torch.long, device=self.device)
        if ckpt is not None:
            self._load_state(ckpt)

    # ------------------------------------------------------------------ checkpoints
    def latest_checkpoint(self) -> Path | None:
        if self.run_dir is None or not (self.run_dir / "latest").is_file():
            return None
        name = (self.run_dir / "latest").read_text().strip()
        path = self.run_dir / "checkpoints" / name
        if not (path / "trainer.pt").is_file():
            raise SAEError(f"{self.run_dir / 'latest'} points to {path}, which is missing or incomplete")
        return path

    def _state(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "initialized": self.initialized,
                "tokens_since_fired": self.tokens_since_fired.cpu(), "optimizer": self.opt.state_dict(),
                "history": self.history, "train_cfg": asdict(self.cfg)}

    def _load_state(self, ckpt: Path) -> None:
        from .io import _read_pickle

        st = _read_pickle(ckpt / "trainer.pt")
        self.step, self.tokens, self.initialized = int(st["step"]), int(st["tokens"]), bool(st["initialized"])
        self.tokens_since_fired = st["tokens_since_fired"].to(self.device)
        self.opt.load_state_dict(st["optimizer"])
        self.history = list(st.get("history", []))

    def save_checkpoint(self) -> Path | None:
        """Write checkpoints/step-N/{sae/, trainer.pt} via a temp folder + rename, then point `latest` at it."""
        if self.run_dir is None:
            return None
        root = self.run_dir / "checkpoints"
        name = f"step-{self.step:09d}"
        final = root / name
        if self.rank == 0:
            from .io import _atomic_write

            root.mkdir(parents=True, exist_ok=True)
            tmp = root / f".tmp-{name}"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                self.sae.save_pretrained(tmp / "sae")
                torch.save(self._state(), tmp / "trainer.pt")
            except (OSError, RuntimeError) as e:  # disk full, folder made read-only: the previous checkpoint stays
                shutil.rmtree(tmp, ignore_errors=True)
                last = self.latest_checkpoint()
                raise SAEError(f"cannot write checkpoint {final} ({getattr(e, 'strerror', None) or str(e).splitlines()[0]}); "
                               f"{'the last good one is ' + str(last) if last else 'no checkpoint was written'}; "
                               "free space or fix --out, then rerun to resume") from None
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _atomic_write(self.run_dir / "latest", lambda p: Path(p).write_text(name))
            old = sorted(p for p in root.iterdir() if p.name.startswith("step-") and p != final)
            for p in old[: max(len(old) - self.cfg.keep_checkpoints + 1, 0)]:
                shutil.rmtree(p, ignore_errors=True)
        if self.world > 1:
            dist.barrier()
        return final

    # ------------------------------------------------------------------ pieces of a step
    @torch.no_grad()
    def _initialize(self, x_local: Tensor) -> None:
        x = _all_gather_cat(x_local)
        sae = self.sae
        if sae.cfg.normalize_input:
            sae.replace_cfg(input_scale=float(math.sqrt(sae.cfg.d_in / x.double().pow(2).sum(1).mean().clamp_min(1e-300))))
        xn, _ = sae.normalize(x)
        center = geometric_median(xn) if self.cfg.b_dec_init == "geometric_median" else xn.mean(0)
        if not bool(torch.isfinite(center).all()):
            # the median's distances overflow float32 for activations of about 1e19 and beyond
            center = xn.double().mean(0).to(xn.dtype)
        scale = getattr(sae.cfg, "input_scale", None)
        if not bool(torch.isfinite(center).all()) or (scale is not None and not math.isfinite(scale)):
            self._fail(f"the activations are out of float32's range (max |x| = {float(x.abs().max()):.3g}); "
                       "rescale them (or use --normalize-input)")
        sae.b_dec.copy_(center)
        self._check_finite_weights("after initialisation")
        self.initialized = True

    def _check_finite_weights(self, when: str) -> None:
        """NaN / inf in a parameter would make every later step meaningless: one clear error instead."""
        for name, t in self.sae.named_parameters():
            if not bool(torch.isfinite(t).all()):
                self._fail(f"the SAE parameter {name} is not finite {when}; check the activations "
                           "(NaN, inf or values too large for float32) and the learning rate")

    def _global_total_variance(self, xn: Tensor) -> Tensor:
        """Σ‖x − mean‖² over the global batch. The mean is reduced in fp64 across ranks; the centred sum of
        squares is one fp32 norm per rank (no fp64 copy of the batch: that cost as much as the decoder)."""
        xd = xn.detach()
        stats = torch.cat([torch.tensor([float(xd.shape[0])], device=xd.device, dtype=torch.float64),
                           xd.sum(0).double()])  # sum(dtype=f64) would copy the batch to fp64
        _all_reduce_sum_(stats)
        mean = (stats[1:] / stats[0]).to(xd.dtype)
        # a reused [N, d] buffer while fitting: no page faults per step (kernels.workspace_buffer)
        centred = torch.sub(xd, mean, out=workspace_buffer(self.workspace, "centred", xd.shape, xd.dtype, xd.device))
        tv = torch.linalg.vector_norm(centred).double().pow(2)
        return _all_reduce_sum_(tv).to(xn.dtype)

    def _lr_factor(self, step: int, total_steps: int | None) -> float:
        c = self.cfg
        if c.warmup_steps and step < c.warmup_steps:
            return (step + 1) / c.warmup_steps
        if c.lr_schedule == "linear_decay":
            return max(0.0, (total_steps - step) / max(total_steps - c.warmup_steps, 1))
        return 1.0

    def _autocast(self):
        if self.cfg.autocast == "none":
            return nullcontext()
        dtype = torch.bfloat16 if self.cfg.autocast == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _fail(self, msg: str):
        last = self.latest_checkpoint() if self.run_dir is not None else None
        where = f"; last good checkpoint: {last}" if last else "; no checkpoint was written"
        raise SAEError(f"step {self.step}: {msg}; training stopped{where}")

    # ------------------------------------------------------------------ main loop
    def fit(self, batches: Iterable[Tensor], progress: bool = True) -> TopKSAE:
        c, sae = self.cfg, self.sae
        if c.batch_size % self.world:
            raise SAEError(f"batch_size={c.batch_size} is not divisible by the {self.world} processes")
        if c.lr_schedule == "linear_decay" and c.max_tokens is None:
            raise SAEError("lr_schedule=linear_decay needs max_tokens (the schedule's length)")
        total_steps = math.ceil(c.max_tokens / c.batch_size) if c.max_tokens else None
        k_aux = c.k_aux if c.k_aux is not None else max(sae.cfg.d_in // 2, 1)
        L, d = sae.cfg.num_latents, sae.cfg.d_in
        tail: collections.deque = collections.deque()
        tail_tokens = 0

        def keep_tail(xb):
            nonlocal tail_tokens
            if not sae.cfg.batch_topk:
                return
            tail.append(xb)
            tail_tokens += xb.shape[0]
            while tail_tokens - tail[0].shape[0] >= max(c.calibrate_tokens // self.world, 1):
                tail_tokens -= tail.popleft().shape[0]

        self._trim_metrics()
        writer = self._tensorboard()
        bar, task = self._progress(progress, total_steps)
        window = {"fvu": 0.0, "auxk": 0.0, "l0": 0.0, "n": 0, "tokens": 0,
                  "counts": torch.zeros(L, dtype=torch.long, device=self.device)}
        t0, start_step = time.perf_counter(), self.step
        sae.train()
        self.workspace = cpu_backend.new_workspace(c.int8_screen)
        try:
            for i, gbatch in enumerate(rebatch(batches, c.batch_size, self.world)):
                if gbatch.shape[-1] != d:
                    raise SAEError(f"activation width {gbatch.shape[-1]} does not match the SAE's d_in={d}")
                if total_steps is not None and i >= total_steps:
                    break
                n_local = gbatch.shape[0] // self.world
                x = gbatch[self.rank * n_local:(self.rank + 1) * n_local].to(self.device, sae.dtype, non_blocking=True)
                if i < self.step:  # resuming: these batches were trained on before the interruption
                    keep_tail(x)
                    continue
                # One reduction instead of an elementwise mask: NaN/inf anywhere makes the sum non-finite
                # (the full check only confirms it, so a finite batch whose sum overflows is not flagged).
                if not torch.isfinite(x.sum()) and not torch.isfinite(x).all():
                    self._fail("the activation batch contains NaN or inf values")
                if not self.initialized:
                    self._initialize(x)
                for g in self.opt.param_groups:
                    g["lr"] = self.lr * self._lr_factor(self.step, total_steps)
                dead = self.tokens_since_fired > c.dead_tokens_threshold if c.auxk_alpha > 0 else None
                xn, _ = sae.normalize(x)
                tv = self._global_total_variance(xn)
                # The loss is finite only if the batch's squared norms and products fit in float32.
                tv_f = float(tv)
                if not math.isfinite(tv_f):
                    self._fail(f"the activations are too large for float32 training (the batch variance "
                               f"overflows; max |x| = {float(x.abs().max()):.3g}); rescale them or use --normalize-input")
                if tv_f <= 0.0:
                    self._fail("the activation batch has zero variance (every token is the same vector, or the "
                               "values underflow float32): there is nothing for an SAE to learn; check the data")
                try:
                    with self._autocast():
                        out = cpu_backend.training_forward(sae, x, dead, k_aux, tv, self.workspace)
                except SAEError as e:  # the compiled kernels refuse NaN pre-activations
                    self._fail(str(e))
                loss = out.fvu + c.auxk_alpha * out.auxk_loss
                if not torch.isfinite(loss):
                    self._fail(f"the loss became {float(loss.detach())} (activations too large for float32 or the "
                               "learning rate too high)")
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                if self.world > 1:
                    grads = [p.grad for p in sae.parameters()]
                    flat = torch.cat([g.reshape(-1) for g in grads])
                    _all_reduce_sum_(flat)
                    off = 0
                    for g in grads:
                        g.copy_(flat[off:off + g.numel()].view_as(g))
                        off += g.numel()
                cpu_backend.project_decoder_grad(sae, self.workspace)
                if c.grad_clip:
                    # clip_grad_norm_'s rule: scale by max/(norm + 1e-6) when that is < 1.
                    # On CPU (no device sync to avoid) the multiply pass is skipped when nothing is clipped.
                    if self.device.type == "cpu":
                        grads = [p.grad for p in sae.parameters() if p.grad is not None]
                        norm = float(torch.nn.utils.get_total_norm(grads))
                        if c.grad_clip / (norm + 1e-6) < 1.0:
                            torch._foreach_mul_(grads, c.grad_clip / (norm + 1e-6))
                    else:
                        torch.nn.utils.clip_grad_norm_(sae.parameters(), c.grad_clip)
                self.opt.step()
                sae.set_decoder_norm_to_unit_norm()

                with torch.no_grad():
                    counts = metrics.firing_counts(out.latent_acts, out.latent_indices, L)
                    _all_reduce_sum_(counts)
                    self.tokens_since_fired += gbatch.shape[0]
                    self.tokens_since_fired[counts > 0] = 0
                    window["counts"] += counts
                    window["fvu"] += float(out.fvu) * (self.world if self.world > 1 else 1)
                    window["auxk"] += float(out.auxk_loss)
                    window["l0"] += float((out.latent_acts > 0).sum()) / n_local
                    window["n"] += 1
                    window["tokens"] += gbatch.shape[0]
                self.step += 1
                self.tokens += gbatch.shape[0]
                keep_tail(x)

                if self.step % c.log_every == 0 or (total_steps is not None and self.step == total_steps):
                    self._log(window, x, out, writer, t0, start_step)
                if bar is not None:
                    info = f"fvu {self.history[-1]['fvu']:.4f} L0 {self.history[-1]['l0']:.1f}" if self.history else ""
                    bar.update(task, completed=self.step, info=info)
                if c.ckpt_every and self.step % c.ckpt_every == 0:
                    self.save_checkpoint()
            if window["n"]:
                self._log(window, x, out, writer, t0, start_step)
            if self.step == 0:
                raise SAEError("no training data: the batch iterator yielded no tokens")
            if sae.cfg.batch_topk:
                if not tail:
                    raise SAEError("BatchTopK calibration needs data, but no batch was seen in this session")
                sae.eval()
                sae.calibrate_threshold(list(tail), gather=_all_gather_cat if self.world > 1 else None)
            if self.run_dir is not None:
                try:
                    self.save_checkpoint()
                    if self.rank == 0:
                        sae.save_pretrained(self.run_dir / (sae.cfg.hookpoint or "sae"))
                except (SAEError, OSError, RuntimeError) as e:
                    self._rescue(e)
        finally:
            self.workspace = None
            if bar is not None:
                bar.stop()
            if writer is not None:
                writer.close()
        sae.eval()
        return sae

    def _rescue(self, error: Exception) -> None:
        """The trained SAE could not be written to --out (disk full, folder made read-only): write it to
        a fresh temporary folder so that the training is not lost, then raise one line naming both."""
        import tempfile

        why = str(error).splitlines()[0] if str(error) else type(error).__name__
        try:
            rescue = Path(tempfile.mkdtemp(prefix="diffusion-sae-rescued-sae-"))
            self.sae.save_pretrained(rescue / (self.sae.cfg.hookpoint or "sae"))
        except Exception:  # nowhere to write at all
            raise SAEError(f"cannot save the trained SAE to {self.run_dir} ({why}) nor to a temporary folder; "
                           "free disk space and rerun to resume from the last checkpoint") from None
        raise SAEError(f"cannot save the trained SAE to {self.run_dir} ({why}); it was saved to "
                       f"{rescue / (self.sae.cfg.hookpoint or 'sae')} instead") from None

    # ------------------------------------------------------------------ logging
    def _log(self, window: dict, x: Tensor, out, writer, t0: float, start_step: int) -> None:
        n = max(window["n"], 1)
        with torch.no_grad():
            ev = metrics.explained_variance(x, out.sae_out)
        freq = window["counts"].float() / max(window["tokens"], 1)
        rec = {"step": self.step, "tokens": self.tokens, "fvu": window["fvu"] / n, "auxk": window["auxk"] / n,
               "explained_variance": ev, "l0": window["l0"] / n,
               "dead_fraction": metrics.dead_fraction(self.tokens_since_fired, self.cfg.dead_tokens_threshold),
               "fired_in_window_fraction": float((freq > 0).float().mean()),
               "tokens_per_s": (self.step - start_step) * self.cfg.batch_size / max(time.perf_counter() - t0, 1e-9)}
        frac = cpu_backend.pop_screen_stats(self.workspace)
        if frac is not None:  # int8-screened selection: share of tokens its certificate sent to the dense product
            rec["screen_dense_fraction"] = frac
        self.history.append(rec)
        self.last_firing_frequency = freq.cpu()
        window.update(fvu=0.0, auxk=0.0, l0=0.0, n=0, tokens=0)
        window["counts"].zero_()
        if self.rank == 0 and self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
        if writer is not None:
            for k, v in rec.items():
                if k != "step":
                    writer.add_scalar(f"sae/{k}", v, self.step)
            writer.add_histogram("sae/log10_firing_frequency", torch.log10(freq.cpu() + 1e-10), self.step)

    def _trim_metrics(self) -> None:
        """metrics.jsonl keeps only the rows up to the step this session starts from: rows logged after
        the last checkpoint (or in a run that never wrote one) are logged again as those steps rerun,
        and would otherwise appear twice. Unparseable lines (a kill mid-write) are dropped too."""
        if self.rank != 0 or self.run_dir is None or not (self.run_dir / "metrics.jsonl").is_file():
            return
        path = self.run_dir / "metrics.jsonl"
        keep, changed = [], False
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
                ok = isinstance(row, dict) and int(row.get("step", -1)) <= self.step
            except (ValueError, TypeError):
                ok = False
            if ok:
                keep.append(line)
            else:
                changed = True
        if changed:
            from .io import _atomic_write

            _atomic_write(path, lambda q: Path(q).write_text("".join(ln + "\n" for ln in keep)))

    def _tensorboard(self):
        if not self.cfg.tensorboard or self.rank != 0:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:
            print("note: tensorboard is not installed; metrics go to metrics.jsonl only")
            return None
        return SummaryWriter(str((self.run_dir or Path("runs")) / "tensorboard"))

    def _progress(self, progress: bool, total_steps):
        if not progress or self.rank != 0:
            return None, None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(TextColumn("[bold]sae"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                       TimeElapsedColumn())
        task = bar.add_task("sae", total=total_steps, completed=self.step, info="")
        bar.start()
        return bar, task

    @property
    def metrics(self) -> dict:
        return self.history[-1] if self.history else {}


def train_sae(sae_or_cfg: TopKSAE | SAEConfig, batches: Iterable[Tensor], cfg: TrainConfig | None = None,
              run_dir=None, progress: bool = True) -> TopKSAE:
    """Train (or resume, if run_dir holds a checkpoint) and return the SAE in eval mode."""
    return SAETrainer(sae_or_cfg, cfg, run_dir).fit(batches, progress=progress)


def train_config_fields() -> list[str]:
    return [f.name for f in fields(TrainConfig)]


def iter_activation_files(folder, d_in: int | None = None) -> Iterator[Tensor]:
    """Stream [N, d] float tensors from a folder of .safetensors / .pt / .npy files (sorted by name).

    Every tensor is flattened to [-1, d] (its last axis). Pickles use weights_only=True.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SAEError(f"no such activation folder: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix in (".safetensors", ".pt", ".npy"))
    if not files:
        raise SAEError(f"{folder}: no .safetensors, .pt or .npy activation files")
    for p in files:
        if p.suffix == ".safetensors":
            from .io import _read_safetensors

            tensors = list(_read_safetensors(p).values())
        elif p.suffix == ".pt":
            from .io import _read_pickle

            obj = _read_pickle(p)
            tensors = [obj] if isinstance(obj, Tensor) else [v for v in (obj.values() if isinstance(obj, dict) else obj)
                                                              if isinstance(v, Tensor)]
        else:
            import numpy as np

            try:
                arr = np.load(p, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError, EOFError) as e:  # object arrays (pickles), truncated or not .npy
                why = "it holds Python objects, not numbers" if "allow_pickle" in str(e) or "Python objects" in str(e) else \
                    (str(e).splitlines()[0] if str(e) else type(e).__name__)
                raise SAEError(f"{p}: not a numeric .npy array ({why}); save float activations [tokens, d]") from None
            if arr.dtype.kind not in "fiub":
                raise SAEError(f"{p}: .npy of dtype {arr.dtype}, expected float activations [tokens, d]")
            tensors = [torch.from_numpy(np.array(arr, dtype=arr.dtype.newbyteorder("=")))]
        for t in tensors:
            if t.ndim == 0:
                raise SAEError(f"{p}: a single number (0-d array), expected activations shaped [tokens, d]")
            if t.shape[-1] == 0 or t.numel() == 0:
                raise SAEError(f"{p}: empty array {tuple(t.shape)}, expected activations shaped [tokens, d]")
            if not t.is_floating_point():
                continue
            if d_in is not None and t.shape[-1] != d_in:
                raise SAEError(f"{p}: activation width {t.shape[-1]} does not match d_in={d_in}")
            yield t.reshape(-1, t.shape[-1]).float()
