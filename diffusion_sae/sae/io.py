"""SAE checkpoints: our folder layout (sparsify's), hub download, and loaders for foreign formats.

Layouts recognised by `load_sae(path, format="auto")`:

| format        | files                                              | notes |
|---------------|----------------------------------------------------|-------|
| diffusion-sae | cfg.json (with "format": "diffusion-sae") + sae.safetensors | ours; also readable by sparsify |
| sparsify      | cfg.json + sae.safetensors                         | encoder.weight [L,d], encoder.bias, W_dec [L,d], b_dec |
| saeuron       | as sparsify, cfg has batch_topk/sample_topk/input_unit_norm | loaded as per-token TopK, like SAeUron does |
| steerers      | config.json + state_dict.pth                       | encoder.weight [L,d], decoder.weight [d,L], pre_bias, latent_bias |
| sdxl-unbox    | as steerers + mean.pt / std.pt                     | [L]-shaped files: per-latent stats (kept as sae.latent_mean/std); [d]-shaped: input standardisation, folded into the weights |
| saelens       | cfg.json + sae_weights.safetensors                 | TopK architecture; W_enc [d,L], W_dec [L,d], b_enc, b_dec |

Every conversion is exact algebra on the weights, so the loaded TopKSAE gives the same outputs as the
format's own forward. The OpenAI-style formats apply ReLU after TopK; for the selected values that is
the same as our ReLU-then-TopK. Pickles are read with `torch.load(weights_only=True)` only.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from .model import SAEConfig, SAEError, TopKSAE

CFG_FILE, WEIGHTS_FILE = "cfg.json", "sae.safetensors"
FORMATS = ("diffusion-sae", "sparsify", "saeuron", "steerers", "sdxl-unbox", "saelens")


# ---------------------------------------------------------------------------------------------
# saving
# ---------------------------------------------------------------------------------------------
def _atomic_write(path: Path, write) -> None:
    """write(tmp_path) then os.replace: a reader never sees a half-written file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def config_dict(sae: TopKSAE) -> dict:
    """Our cfg.json: every SAEConfig field plus sparsify's / SAeUron's field names, so their loaders work."""
    c = sae.cfg
    d = c.to_dict()
    d.update(format="diffusion-sae",
             # sparsify SparseCoderConfig fields
             expansion_factor=max(c.num_latents // c.d_in, 1), normalize_decoder=True, multi_topk=False,
             skip_connection=False, transcode=False,
             # SAeUron extras
             sample_topk=False, input_unit_norm=c.token_norm == "standardize")
    return d


def save_sae(sae: TopKSAE, path) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {"encoder.weight": sae.W_enc, "encoder.bias": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    # Weights first, config last: a folder whose cfg.json exists always has a complete weight file.
    _atomic_write(path / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    _atomic_write(path / CFG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(config_dict(sae), indent=2)))
    return path


# ---------------------------------------------------------------------------------------------
# reading helpers (every failure becomes one SAEError line)
# ---------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise SAEError(f"missing checkpoint file {path}")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SAEError(f"{path}: not valid JSON (truncated or corrupt): {e.msg if hasattr(e, 'msg') else e}") from None
    if not isinstance(raw, dict):
        raise SAEError(f"{path}: expected a JSON object of SAE settings, found a {type(raw).__name__}; "
                       "the checkpoint's config is damaged")
    return raw


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise SAEError(f"missing checkpoint file {path}")
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own error type for truncated headers/data
        raise SAEError(f"{path}: unreadable or truncated safetensors file ({str(e).splitlines()[0]})") from None


def _read_pickle(path: Path):
    if not path.is_file():
        raise SAEError(f"missing checkpoint file {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        import pickle

        if isinstance(e, pickle.UnpicklingError) and "weights only load failed" in str(e).lower():
            # torch's text suggests weights_only=False, i.e. running the file's code: never say that
            raise SAEError(f"{path}: refused: this file holds code, not just tensors; load only checkpoints "
                           "you trust, re-saved as tensors (safetensors)") from None
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SAEError(f"{path}: unreadable or truncated torch file ({msg})") from None


def _need(tensors: dict, key: str, shape: tuple, where: Path) -> Tensor:
    if key not in tensors:
        raise SAEError(f"{where}: tensor {key!r} is missing (found {sorted(tensors)})")
    t = tensors[key]
    if tuple(t.shape) != tuple(shape):
        raise SAEError(f"{where}: tensor {key!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    return t


def _build(cfg: SAEConfig, W_enc, b_enc, W_dec, b_dec, device="cpu") -> TopKSAE:
    dtype = W_enc.dtype if W_enc.dtype.is_floating_point else torch.float32
    sae = TopKSAE(cfg=cfg, dtype=dtype)
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.b_enc.copy_(b_enc)
        sae.W_dec.copy_(W_dec.contiguous())
        sae.b_dec.copy_(b_dec)
    return sae.to(device).eval()


# ---------------------------------------------------------------------------------------------
# format detection
# ---------------------------------------------------------------------------------------------
def detect_format(folder: Path) -> str:
    folder = Path(folder)
    if (folder / "sae_weights.safetensors").is_file():
        return "saelens"
    if (folder / CFG_FILE).is_file():
        cfg = _read_json(folder / CFG_FILE)
        if cfg.get("format") == "diffusion-sae":
            return "diffusion-sae"
        if any(k in cfg for k in ("batch_topk", "sample_topk", "input_unit_norm")):
            return "saeuron"
        return "sparsify"
    if (folder / "config.json").is_file() and (folder / "state_dict.pth").is_file():
        if (folder / "mean.pt").is_file() or (folder / "std.pt").is_file():
            return "sdxl-unbox"
        return "steerers"
    present = sorted(p.name for p in folder.iterdir())[:8] if folder.is_dir() else []
    raise SAEError(f"{folder}: unknown SAE checkpoint format (found {present}); expected cfg.json + "
                   "sae.safetensors, config.json + state_dict.pth, or cfg.json + sae_weights.safetensors")


def _has_checkpoint(folder: Path) -> bool:
    return (folder / CFG_FILE).is_file() or (folder / "config.json").is_file() and (folder / "state_dict.pth").is_file()


# ---------------------------------------------------------------------------------------------
# loaders
# ---------------------------------------------------------------------------------------------
def _load_eleuther(folder: Path, fmt: str, device) -> TopKSAE:
    """Ours, sparsify and SAeUron: the same files, different config fields."""
    raw = _read_json(folder / CFG_FILE)
    tensors = _read_safetensors(folder / WEIGHTS_FILE)
    if "encoder.weight" not in tensors:
        raise SAEError(f"{folder / WEIGHTS_FILE}: tensor 'encoder.weight' is missing (found {sorted(tensors)})")
    L, d = tensors["encoder.weight"].shape
    if raw.get("d_in", d) != d:
        raise SAEError(f"{folder}: cfg.json d_in={raw.get('d_in')} but encoder.weight has width {d}")
    if fmt == "diffusion-sae":
        cfg = SAEConfig.from_dict({**raw, "num_latents": L, "d_in": d})
    else:
        if raw.get("transcode") or raw.get("skip_connection"):
            raise SAEError(f"{folder}: transcoders / skip connections are not supported (only TopK SAEs load)")
        act = str(raw.get("activation", "topk")).lower()
        if act != "topk":
            raise SAEError(f"{folder}: sparsify activation {raw.get('activation')!r} is not supported (only "
                           "'topk'); loading it as TopK would give wrong outputs")
        if "k" not in raw:
            raise SAEError(f"{folder / CFG_FILE}: no 'k' field, not a TopK SAE config")
        # SAeUron loads its BatchTopK-trained SAEs as per-token TopK(k); keep that behaviour.
        cfg = SAEConfig(d_in=d, num_latents=L, k=int(raw["k"]), hookpoint=_folder_hookpoint(folder),
                        token_norm="standardize" if raw.get("input_unit_norm") else "none")
    _refuse_extra_tensors(tensors, {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}, folder / WEIGHTS_FILE)
    W_enc = tensors["encoder.weight"]
    b_enc = _need(tensors, "encoder.bias", (L,), folder / WEIGHTS_FILE)
    W_dec = _need(tensors, "W_dec", (L, d), folder / WEIGHTS_FILE)
    b_dec = _need(tensors, "b_dec", (d,), folder / WEIGHTS_FILE)
    return _build(cfg, W_enc, b_enc, W_dec, b_dec, device)


def _load_openai(folder: Path, fmt: str, device) -> TopKSAE:
    """Concept Steerers and sdxl-unbox: latents = ReLU(TopK(E(x − b_pre) + b_lat)), x̂ = D latents + b_pre."""
    raw = _read_json(folder / "config.json")
    obj = _read_pickle(folder / "state_dict.pth")
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict):
        raise SAEError(f"{folder / 'state_dict.pth'}: expected a dict of tensors")
    for key in ("n_dirs_local", "d_model", "k"):
        if key not in raw:
            raise SAEError(f"{folder / 'config.json'}: field {key!r} is missing")
    act = str(raw.get("activation", "topk")).lower()
    if "topk" not in act:
        raise SAEError(f"{folder / 'config.json'}: activation {raw.get('activation')!r} is not supported (only TopK)")
    L, d, k = int(raw["n_dirs_local"]), int(raw["d_model"]), int(raw["k"])
    where = folder / "state_dict.pth"
    E = _need(sd, "encoder.weight", (L, d), where)
    D = _need(sd, "decoder.weight", (d, L), where)
    b_pre = _need(sd, "pre_bias", (d,), where)
    b_lat = _need(sd, "latent_bias", (L,), where)
    cfg = SAEConfig(d_in=d, num_latents=L, k=k,
                    hookpoint=_folder_hookpoint(folder.parent if folder.name == "final" else folder))
    W_enc, W_dec, b_dec = E, D.t(), b_pre
    latent_stats = {}
    if fmt == "sdxl-unbox":
        stats = {n: _read_pickle(folder / f"{n}.pt") for n in ("mean", "std") if (folder / f"{n}.pt").is_file()}
        for n, t in stats.items():
            if not isinstance(t, Tensor):
                raise SAEError(f"{folder / (n + '.pt')}: expected a tensor")
        shapes = {tuple(t.shape) for t in stats.values()}
        if shapes == {(L,)}:
            latent_stats = stats  # per-latent activation statistics (used for intervention strengths)
        elif shapes == {(d,)} and set(stats) == {"mean", "std"}:
            # Input standardisation x_s = (x − m)/s folded into the weights, so raw x goes in and out:
            # E(x_s − b) = (E/s)(x − (s·b + m)); x = s·(Dz + b) + m.
            m, s = stats["mean"].to(E.dtype), stats["std"].to(E.dtype)
            W_enc = E / s
            W_dec = D.t() * s
            b_dec = s * b_pre + m
        else:
            raise SAEError(f"{folder}: mean.pt/std.pt have shapes {sorted(shapes)}; expected [{L}] (per latent) "
                           f"or [{d}] (per input feature)")
    sae = _build(cfg, W_enc, b_lat, W_dec, b_dec, device)
    if latent_stats:
        sae.latent_mean = latent_stats.get("mean", None)
        sae.latent_std = latent_stats.get("std", None)
    return sae


def _load_saelens(folder: Path, device) -> TopKSAE:
    raw = _read_json(folder / CFG_FILE)
    tensors = _read_safetensors(folder / "sae_weights.safetensors")
    arch = raw.get("architecture", "standard")
    act = raw.get("activation_fn_str", raw.get("activation_fn"))
    if arch != "topk" and act != "topk":
        what = {"jumprelu": "JumpReLU", "gated": "gated", "standard": "standard (ReLU + L1)"}.get(str(arch), str(arch))
        raise SAEError(f"{folder}: SAELens {what} SAE (architecture {arch!r}, activation {act!r}) is not supported; "
                       "only TopK SAEs load")
    k = raw.get("k", (raw.get("activation_fn_kwargs") or {}).get("k"))
    if k is None:
        raise SAEError(f"{folder / CFG_FILE}: TopK SAE without a k")
    d, L = int(raw["d_in"]), int(raw["d_sae"])
    where = folder / "sae_weights.safetensors"
    W_enc = _need(tensors, "W_enc", (d, L), where).t()
    W_dec = _need(tensors, "W_dec", (L, d), where)
    b_enc = _need(tensors, "b_enc", (L,), where)
    b_dec = _need(tensors, "b_dec", (d,), where)
    if raw.get("reshape_activations", "none") not in ("none", None) or raw.get("finetuning_scaling_factor"):
        raise SAEError(f"{folder}: SAELens hook_z reshaping / finetuning scaling factors are not supported")
    norm = raw.get("normalize_activations", "none") or "none"
    token_norm = {"none": "none", "expected_average_only_in": "none", "constant_norm_rescale": "rescale_norm",
                  "layer_norm": "standardize"}.get(norm)
    if token_norm is None:
        raise SAEError(f"{folder}: unknown SAELens normalize_activations={norm!r}")
    # expected_average_only_in is folded into the weights when SAELens saves a model: identity here.
    if not raw.get("apply_b_dec_to_input", True):
        # pre = W x + b  ==  W (x − b_dec) + (b + W b_dec)
        b_enc = b_enc + W_enc @ b_dec
    if raw.get("rescale_acts_by_decoder_norm", False):
        # SAELens scales pre-activations by ‖W_dec_j‖ and divides again before decoding:
        # fold both into unit-norm decoder rows and a rescaled encoder row / bias.
        n = W_dec.norm(dim=1)
        W_enc, b_enc, W_dec = W_enc * n[:, None], b_enc * n, W_dec / n[:, None]
    hook = raw.get("hook_name") or (raw.get("metadata") or {}).get("hook_name") or _folder_hookpoint(folder)
    cfg = SAEConfig(d_in=d, num_latents=L, k=int(k), hookpoint=hook, token_norm=token_norm)
    return _build(cfg, W_enc, b_enc, W_dec, b_dec, device)


_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae", "prior", "decoder")


def _folder_hookpoint(folder: Path) -> str | None:
    """sparsify and SAeUron save one folder per hookpoint named after it (`unet.up_blocks.1.attentions.1`);
    a folder name that is not a module path (a run name, `final`, `checkpoint-3`) names no hookpoint."""
    name = Path(folder).name
    head = name.split(".", 1)[0]
    return name if "." in name and head in _COMPONENTS else None


def _refuse_extra_tensors(tensors: dict, known: set, where: Path) -> None:
    extra = sorted(set(tensors) - known)
    if not extra:
        return
    if any("threshold" in k for k in extra):
        raise SAEError(f"{where}: JumpReLU SAE (tensor {extra[0]!r}) is not supported; only TopK SAEs load")
    if any(k.startswith(("W_skip", "skip")) for k in extra):
        raise SAEError(f"{where}: transcoder / skip connection (tensor {extra[0]!r}) is not supported")
    raise SAEError(f"{where}: unexpected tensors {extra[:4]} for a TopK SAE; refusing to load it approximately")


def _load_folder(folder: Path, format: str, device) -> TopKSAE:
    fmt = detect_format(folder) if format == "auto" else format
    if fmt not in FORMATS:
        raise SAEError(f"unknown SAE format {format!r}; known: {', '.join(FORMATS)}")
    if fmt in ("diffusion-sae", "sparsify", "saeuron"):
        return _load_eleuther(folder, fmt, device)
    if fmt in ("steerers", "sdxl-unbox"):
        return _load_openai(folder, fmt, device)
    return _load_saelens(folder, device)


def _looks_like_hub_id(s: str) -> bool:
    parts = s.split("/")
    return (len(parts) >= 2 and not s.startswith((".", "/", "~")) and "\\" not in s and ":" not in s
            and all(parts) and not Path(parts[0]).exists())


def _hub_snapshot(repo_id: str, prefix: str | None) -> Path:
    """The repo's snapshot in the huggingface_hub cache (downloaded there when online), or one SAEError line."""
    from huggingface_hub import snapshot_download
    from huggingface_hub import constants as hf_constants

    offline = bool(getattr(hf_constants, "HF_HUB_OFFLINE", False)) or os.environ.get("HF_HUB_OFFLINE", "") in ("1", "true", "TRUE", "yes")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=[f"{prefix}/*"] if prefix else None,
                                      local_files_only=offline))
    except Exception as e:
        name = type(e).__name__
        first = (str(e).strip().splitlines() or [name])[0]
        cache = os.environ.get("HF_HUB_CACHE") or getattr(hf_constants, "HF_HUB_CACHE", "the cache")
        if offline or name in ("LocalEntryNotFoundError", "OfflineModeIsEnabled"):
            raise SAEError(f"SAE {repo_id!r} is not in the Hugging Face hub cache ({cache}) and the hub is offline "
                           f"(HF_HUB_OFFLINE=1 or no network): run `hf download {repo_id}` on a connected machine, "
                           "or pass a local folder") from None
        if name in ("RepositoryNotFoundError", "GatedRepoError"):
            raise SAEError(f"no SAE repository {repo_id!r} on the Hugging Face hub (or it is private/gated: "
                           "log in with `hf auth login`)") from None
        raise SAEError(f"cannot fetch {repo_id!r} from the Hugging Face hub ({name}: {first})") from None


def resolve_checkpoint(path_or_repo_id, hookpoint: str | None = None, subfolder: str | None = None) -> Path:
    """The local folder of one SAE: a folder, a parent of per-hookpoint folders, or a hub id
    `org/name` (optionally `org/name/sub/folder`) fetched through huggingface_hub into its cache."""
    raw = str(path_or_repo_id)
    root = Path(raw).expanduser()
    if not root.exists():
        if not _looks_like_hub_id(raw):
            raise SAEError(f"no such checkpoint folder: {raw}")
        parts = raw.split("/")
        repo_id, inner = "/".join(parts[:2]), "/".join(parts[2:])
        sub = "/".join(x for x in (inner, subfolder) if x) or None
        prefix = "/".join(x for x in (sub, hookpoint) if x) or None
        snap = _hub_snapshot(repo_id, prefix)
        if prefix and hookpoint and not (snap / prefix).is_dir():
            snap = _hub_snapshot(repo_id, sub)  # the hookpoint is named inside the checkpoint, not by a folder
        root = snap / sub if sub else snap
        if not root.is_dir():
            raise SAEError(f"SAE {repo_id!r} has no folder {sub!r}")
    elif subfolder:
        root = root / subfolder
        if not root.is_dir():
            raise SAEError(f"no such checkpoint folder: {root}")
    if root.is_file():
        root = root.parent
    return _resolve_folder(root, hookpoint)


def load_sae(path_or_repo_id, hookpoint: str | None = None, subfolder: str | None = None, *,
             format: str = "auto", device="cpu", dtype: torch.dtype | None = torch.float32) -> TopKSAE:
    """Load one SAE from a folder or a Hugging Face hub id, in any supported layout (module docstring).

    `hookpoint` picks a per-hookpoint subfolder when the checkpoint holds several; the loaded SAE's
    `cfg.hookpoint` is the one the checkpoint names, else the user's. A checkpoint that names a
    different hookpoint than the one asked for is refused. `dtype` (default float32, so that SAE maths
    runs in fp32 inside half-precision pipelines; None keeps the stored dtype).
    """
    folder = resolve_checkpoint(path_or_repo_id, hookpoint, subfolder)
    sae = _load_folder(folder, format, device)
    named = sae.cfg.hookpoint
    if hookpoint is not None:
        if named is not None and named != hookpoint:
            raise SAEError(f"{folder}: the checkpoint was trained at hookpoint {named!r}, not {hookpoint!r}")
        sae.replace_cfg(hookpoint=hookpoint)
    if dtype is not None and sae.dtype != dtype:
        sae = sae.to(dtype)
    return sae


def _resolve_folder(root: Path, hookpoint: str | None) -> Path:
    if hookpoint is not None and (root / hookpoint).is_dir():
        return root / hookpoint
    if _has_checkpoint(root) or (root / "sae_weights.safetensors").is_file():
        return root
    if not root.is_dir():
        raise SAEError(f"no such checkpoint folder: {root}")
    subs = sorted(p.name for p in root.iterdir() if p.is_dir() and (_has_checkpoint(p) or
                                                                    (p / "sae_weights.safetensors").is_file()))
    if hookpoint is None and len(subs) == 1:
        return root / subs[0]
    if not subs:
        detect_format(root)  # raises: names what the folder holds and the layouts it should hold
        raise SAEError(f"{root}: no SAE checkpoint here (no cfg.json / config.json in it or its subfolders)")
    what = f"hookpoint {hookpoint!r} not found" if hookpoint else "several hookpoints, pass hookpoint="
    raise SAEError(f"{root}: {what}; available: {', '.join(subs)}")


def load_pretrained(path, hookpoint: str | None = None, device="cpu") -> TopKSAE:
    """Local folder (or parent of per-hookpoint folders) or a Hugging Face hub id: `load_sae`."""
    return load_sae(path, hookpoint=hookpoint, device=device)
