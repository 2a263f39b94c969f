"""The ShapesCanvas judge: a small CNN that predicts object, style and colour of a 32x32 image.

It plays the role UnlearnCanvas' style and object classifiers play for SAeUron: it scores prompt
following, and the UA / IRA / CRA of unlearning. Its 128-d penultimate features also define the
"classifier Fréchet distance" (named as such: it is not FID).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from .config import COLOUR_NAMES, OBJECTS, STYLES
from .data import sample_batch

HEADS = ("object", "style", "colour")
LABELS = {"object": OBJECTS, "style": STYLES, "colour": COLOUR_NAMES}


def _block(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ShapesClassifier(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, n_objects: int = len(OBJECTS), n_styles: int = len(STYLES),
                 n_colours: int = len(COLOUR_NAMES), width: int = 32, feature_dim: int = 128):
        super().__init__()
        w = width
        self.body = nn.Sequential(_block(3, w), nn.MaxPool2d(2), _block(w, 2 * w), nn.MaxPool2d(2),
                                  _block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                                  nn.Linear(16 * w, feature_dim), nn.ReLU(inplace=True))
        self.heads = nn.ModuleDict({"object": nn.Linear(feature_dim, n_objects),
                                    "style": nn.Linear(feature_dim, n_styles),
                                    "colour": nn.Linear(feature_dim, n_colours)})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images in [0, 1], [N, 3, 32, 32] -> [N, feature_dim]."""
        return self.body(images * 2 - 1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(images)
        return {k: h(f) for k, h in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Predicted label indices per head, in eval mode."""
        was = self.training
        self.eval()
        outs = {k: [] for k in HEADS}
        for i in range(0, len(images), batch_size):
            logits = self(images[i:i + batch_size].float())
            for k in HEADS:
                outs[k].append(logits[k].argmax(-1))
        self.train(was)
        return {k: torch.cat(v) for k, v in outs.items()}


    @torch.no_grad()
    def confidence(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """[N]: the least confident head's top softmax probability (low = an image the judge cannot place)."""
        was = self.training
        self.eval()
        out = []
        for i in range(0, len(images), batch_size):
            logits = self(images[i:i + batch_size].float())
            out.append(torch.stack([logits[k].softmax(-1).amax(-1) for k in HEADS]).amin(0))
        self.train(was)
        return torch.cat(out)


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    # Generated samples are slightly blurred and noisy compared with the renderer; the judge must
    # not depend on perfectly crisp pixels.
    n = x.shape[0]
    sigma = torch.rand(n, 1, 1, 1, generator=g) * 0.06
    x = x + sigma * torch.randn(x.shape, generator=g)
    blur = torch.rand(n, generator=g) < 0.3
    if bool(blur.any()):
        k = torch.tensor([0.25, 0.5, 0.25])
        k2 = (k[:, None] * k[None, :]).expand(3, 1, 3, 3)
        xb = F.conv2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), k2, groups=3)
        x = x.clone()
        x[blur] = xb
    return x.clamp(0, 1)


@dataclass
class ClassifierTrainConfig:
    steps: int = 1500
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0
    data_seed: int = 1_000


def accuracy(model: ShapesClassifier, n: int = 2000, seed: int = 99_999) -> dict[str, float]:
    """Accuracy per head on n fresh procedural images (a seed the training never used)."""
    b = sample_batch(n, seed=seed, step=0)
    pred = model.predict(b.images)
    truth = {"object": b.objects, "style": b.styles, "colour": b.colours}
    return {k: float((pred[k] == truth[k]).float().mean()) for k in HEADS}


def train_classifier(cfg: ClassifierTrainConfig, progress=None, model: ShapesClassifier | None = None):
    """Train the judge on fresh procedural batches; returns (model, history of losses)."""
    torch.manual_seed(cfg.seed)
    model = model or ShapesClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    g = torch.Generator().manual_seed(cfg.seed)
    model.train()
    losses = []
    t0 = time.time()
    for step in range(cfg.steps):
        b = sample_batch(cfg.batch_size, seed=cfg.data_seed, step=step)
        logits = model(_augment(b.images, g))
        loss = (F.cross_entropy(logits["object"], b.objects) + F.cross_entropy(logits["style"], b.styles)
                + F.cross_entropy(logits["colour"], b.colours))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step + 1, cfg.steps, float(loss), time.time() - t0)
    model.eval()
    return model, losses
