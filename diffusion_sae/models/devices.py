"""Where and in what precision a pipeline runs: one resolver for `--device`, `--dtype` and `--offload`.

    device  auto: cuda:$LOCAL_RANK when CUDA is available, else mps, else cpu; or cpu, cuda, cuda:N, mps
    dtype   auto: float16 for SD 1.x / SDXL on CUDA (their published fp16 weights), bfloat16 for SD3 / FLUX
            on CUDA (T5 and the MM-DiT overflow in fp16), float16 on MPS for SD 1.x / SDXL, float32 on the
            CPU and for everything else; or float32 / float16 / bfloat16 (fp32, fp16, bf16, half)
    offload none: every component on `device`; model: diffusers' `enable_model_cpu_offload` (one component
            on the accelerator at a time); sequential: `enable_sequential_cpu_offload` (one layer at a
            time: lowest memory, slowest). Both need an accelerator and the `accelerate` package.

Every bad combination is a `DeviceError` with a one-line message (the CLI prints it, exit 2).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..errors import DiffusionSAEError

OFFLOADS = ("none", "model", "sequential")
DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
               "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
               "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
FAMILIES = ("sd", "sdxl", "sd3", "flux")


class DeviceError(DiffusionSAEError, ValueError):
    """A device / dtype / offload choice this machine cannot run (one-line message)."""


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """`auto` → cuda:LOCAL_RANK, then mps, then cpu; an explicit device is checked to exist here."""
    if isinstance(device, torch.device):
        device = str(device)
    name = (device or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            rank = int(os.environ.get("LOCAL_RANK", 0) or 0)
            return torch.device("cuda", rank % max(torch.cuda.device_count(), 1))
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise DeviceError(f"--device {device!r}: not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this PyTorch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise DeviceError(f"--device {device}: CUDA is not available on this machine ({why}); "
                              "use --device cpu or --device auto")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise DeviceError(f"--device {device}: this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
        return dev if dev.index is not None else torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0) or 0) % n)
    if dev.type == "mps":
        if not _mps_available():
            raise DeviceError(f"--device {device}: Apple MPS is not available on this machine; use --device cpu or auto")
        return dev
    raise DeviceError(f"--device {device!r}: unsupported device type {dev.type!r}; use auto, cpu, cuda, cuda:N or mps")


def family_of(pipe_or_name) -> str | None:
    """'sd', 'sdxl', 'sd3', 'flux' from a pipeline, its class, or its class name; None if other."""
    if pipe_or_name is None:
        return None
    name = pipe_or_name if isinstance(pipe_or_name, str) else (
        pipe_or_name.__name__ if isinstance(pipe_or_name, type) else type(pipe_or_name).__name__)
    if name in FAMILIES:
        return name
    if name.startswith("tiny:"):
        return name.split(":", 1)[1] if name.split(":", 1)[1] in FAMILIES else None
    if "StableDiffusionXL" in name:
        return "sdxl"
    if "StableDiffusion3" in name:
        return "sd3"
    if "Flux" in name:
        return "flux"
    if "StableDiffusion" in name:
        return "sd"
    return None


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A dtype name → torch.dtype; None / 'auto' → None (resolved later against the device)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = dtype.strip().lower().removeprefix("torch.")
    if name == "auto":
        return None
    if name not in DTYPE_NAMES:
        raise DeviceError(f"--dtype {dtype!r}: unknown; use auto, float32, float16 or bfloat16")
    return DTYPE_NAMES[name]


def default_dtype(device: torch.device, family: str | None) -> torch.dtype:
    """The auto dtype (module docstring)."""
    if device.type == "cuda":
        if family in ("sd3", "flux"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16
    if device.type == "mps" and family in ("sd", "sdxl"):
        return torch.float16
    return torch.float32


def check_dtype(device: torch.device, dtype: torch.dtype) -> None:
    """Refuse in one line a dtype the device cannot compute in (probed with a matmul and a conv)."""
    name = str(dtype).removeprefix("torch.")
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise DeviceError(f"--dtype bfloat16: {torch.cuda.get_device_name(device)} has no bfloat16 support "
                          "(needs compute capability >= 8.0); use --dtype float16 or float32")
    try:
        a = torch.ones(2, 2, device=device, dtype=dtype)
        (a @ a).sum().item()
        torch.nn.functional.conv2d(torch.ones(1, 1, 3, 3, device=device, dtype=dtype),
                                   torch.ones(1, 1, 2, 2, device=device, dtype=dtype)).sum().item()
    except (RuntimeError, TypeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DeviceError(f"--dtype {name} cannot run on {device} ({first}); use --dtype float32") from None


@dataclass(frozen=True)
class Placement:
    """A resolved (device, dtype, offload) triple."""
    device: torch.device
    dtype: torch.dtype
    offload: str = "none"

    def describe(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        return f"{self.device} {dt}" + (f", {self.offload} offload" if self.offload != "none" else "")


def resolve_placement(device="auto", dtype="auto", offload: str | None = "none", family=None) -> Placement:
    """Resolve and check the three options; `family` (a pipeline, class name or 'sd'…) picks the auto dtype."""
    dev = resolve_device(device)
    fam = family_of(family) if family is not None else None
    dt = parse_dtype(dtype) or default_dtype(dev, fam)
    off = (offload or "none").strip().lower()
    if off not in OFFLOADS:
        raise DeviceError(f"--offload {offload!r}: use none, model or sequential")
    if off != "none" and dev.type == "cpu":
        raise DeviceError(f"--offload {off}: offloading moves components between the CPU and an accelerator, "
                          "but the device is cpu; use --offload none (or a CUDA device)")
    if off != "none":
        try:
            import accelerate  # noqa: F401
        except ImportError:
            raise DeviceError(f"--offload {off} needs the accelerate package: pip install accelerate") from None
    check_dtype(dev, dt)
    return Placement(dev, dt, off)


def _quiet_diffusers():
    """Silence diffusers' 'modules that should be kept in float32' notice while casting whole modules."""
    try:
        from diffusers.utils import logging as dlog
    except ImportError:  # pragma: no cover
        return None
    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    return lambda: dlog.set_verbosity(level)


def place_pipeline(pipe, device="auto", dtype="auto", offload: str | None = "none") -> Placement:
    """Move and cast a built pipeline (any family) as the options say; returns the resolved placement.

    Offloading keeps the weights on the CPU and lets diffusers move them per component / per layer.
    """
    pl = resolve_placement(device, dtype, offload, family=pipe)
    restore = _quiet_diffusers()
    try:
        pipe.to(dtype=pl.dtype)
    finally:
        if restore:
            restore()
    if pl.offload == "model":
        pipe.enable_model_cpu_offload(device=pl.device)
    elif pl.offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=pl.device)
    else:
        pipe.to(pl.device)
    return pl


def execution_device(pipe) -> torch.device:
    """Where the pipeline computes (the accelerator under offloading), where SAEs should live."""
    dev = getattr(pipe, "_execution_device", None)
    return torch.device(dev) if dev is not None else torch.device("cpu")
