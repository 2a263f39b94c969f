"""Resumable training of the ShapesCanvas UNet + text encoder.

A run lives in one folder: `state.pt` (weights, EMA, optimiser, step; written atomically every
`ckpt_every` steps), `config.json` and `log.jsonl`. Batches are a pure function of (data_seed,
step) and the noise generator is part of the state, so a killed and resumed run continues the
same sequence. `export_pipeline` writes the EMA weights as a `StableDiffusionPipeline` folder.
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import sample_batch
from .model import ShapesCanvasModelConfig, build_components, make_pipeline


@dataclass
class UNetTrainConfig:
    steps: int = 30_000            # length of the LR schedule; a run may stop earlier
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 500
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    ema_decay: float = 0.9995
    min_snr_gamma: float = 5.0
    caption_dropout: float = 0.1
    p_partial: float = 0.5
    grad_clip: float = 1.0
    seed: int = 0
    data_seed: int = 12_345
    ckpt_every: int = 250
    eval_every: int = 2_000
    threads: int = 0               # 0 = torch default
    # A pipeline folder to start from (v2 fine-tunes v1): UNet and text-encoder weights are copied,
    # token embeddings by token string, so words new to the vocabulary start from the init.
    init_from: str | None = None
    model: ShapesCanvasModelConfig = field(default_factory=ShapesCanvasModelConfig)


def lr_at(cfg: UNetTrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    p = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def warm_start(unet, text_encoder, tokenizer, pipeline_dir: Path) -> None:
    """Copy a trained pipeline's weights into fresh modules whose vocabulary may differ."""
    from safetensors.torch import load_file
    from transformers import CLIPTokenizer

    unet.load_state_dict(load_file(pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    old = load_file(pipeline_dir / "text_encoder" / "model.safetensors")
    key = next(k for k in old if k.endswith("token_embedding.weight"))
    old_emb = old.pop(key)
    missing = text_encoder.load_state_dict(old, strict=False).missing_keys
    if [k for k in missing if not k.endswith("token_embedding.weight")]:
        raise RuntimeError(f"warm start from {pipeline_dir}: unexpected missing keys {missing}")
    old_vocab = CLIPTokenizer.from_pretrained(pipeline_dir / "tokenizer").get_vocab()
    emb = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for tok, i in tokenizer.get_vocab().items():
            j = old_vocab.get(tok)
            if j is not None:
                emb[i] = old_emb[j]


def atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


class UNetTrainer:
    def __init__(self, run_dir: str | Path, cfg: UNetTrainConfig | None = None, tokenizer=None):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        cfg_path = self.dir / "config.json"
        if cfg is None:
            if not cfg_path.exists():
                raise FileNotFoundError(f"{cfg_path} missing: start a new run with a config")
            raw = json.loads(cfg_path.read_text())
            raw["model"] = ShapesCanvasModelConfig(**{k: tuple(v) if isinstance(v, list) else v
                                                      for k, v in raw["model"].items()})
            cfg = UNetTrainConfig(**raw)
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        comps = build_components(cfg.model, seed=cfg.seed)
        self.unet, self.text_encoder = comps["unet"], comps["text_encoder"]
        self.tokenizer, self.vae, self.sched = comps["tokenizer"], comps["vae"], comps["noise_scheduler"]
        # The BPE trainer breaks frequency ties differently from call to call, so a run keeps the
        # tokenizer it started with: resumed steps and the export must map words to the same ids.
        tok_dir = self.dir / "tokenizer"
        if tokenizer is not None:
            self.tokenizer = tokenizer
        elif (tok_dir / "tokenizer_config.json").exists():
            from transformers import CLIPTokenizer

            self.tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
        if not (tok_dir / "tokenizer_config.json").exists():
            self.tokenizer.save_pretrained(tok_dir)
        state_path = self.dir / "state.pt"
        if cfg.init_from and not state_path.exists():
            warm_start(self.unet, self.text_encoder, self.tokenizer, Path(cfg.init_from))
        self.ema_unet = copy.deepcopy(self.unet).requires_grad_(False)
        self.ema_text = copy.deepcopy(self.text_encoder).requires_grad_(False)
        params = list(self.unet.parameters()) + list(self.text_encoder.parameters())
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.step = 0
        self.alphas_cumprod = self.sched.alphas_cumprod.clone()
        if state_path.exists():
            self._load(state_path)
        else:
            d = asdict(cfg)
            d["model"] = cfg.model.to_dict()
            tmp = cfg_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(d, indent=2))
            os.replace(tmp, cfg_path)

    # --- state -------------------------------------------------------------------------------
    def _state(self) -> dict:
        return {"step": self.step, "unet": self.unet.state_dict(), "text_encoder": self.text_encoder.state_dict(),
                "ema_unet": self.ema_unet.state_dict(), "ema_text": self.ema_text.state_dict(),
                "opt": self.opt.state_dict(), "gen": self.gen.get_state()}

    def _load(self, path: Path) -> None:
        s = torch.load(path, map_location="cpu", weights_only=True)
        self.unet.load_state_dict(s["unet"])
        self.text_encoder.load_state_dict(s["text_encoder"])
        self.ema_unet.load_state_dict(s["ema_unet"])
        self.ema_text.load_state_dict(s["ema_text"])
        self.opt.load_state_dict(s["opt"])
        self.gen.set_state(s["gen"])
        self.step = int(s["step"])

    def save(self) -> None:
        atomic_torch_save(self._state(), self.dir / "state.pt")

    # --- one step ----------------------------------------------------------------------------
    def encode_text(self, captions: list[str], model=None) -> torch.Tensor:
        ids = self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return (model or self.text_encoder)(ids)[0]

    def loss_on(self, step: int) -> torch.Tensor:
        cfg = self.cfg
        b = sample_batch(cfg.batch_size, seed=cfg.data_seed, step=step, p_partial=cfg.p_partial)
        caps = [("" if u < cfg.caption_dropout else c)
                for u, c in zip(torch.rand(len(b.captions), generator=self.gen).tolist(), b.captions)]
        x0 = self.vae.encode(b.images * 2 - 1).latent_dist.sample()
        noise = torch.randn(x0.shape, generator=self.gen)
        t = torch.randint(0, self.sched.config.num_train_timesteps, (x0.shape[0],), generator=self.gen)
        xt = self.sched.add_noise(x0, noise, t)
        target = self.sched.get_velocity(x0, noise, t)
        pred = self.unet(xt, t, self.encode_text(caps)).sample
        # Min-SNR-gamma weighting for v-prediction: min(snr, g) / (snr + 1).
        ac = self.alphas_cumprod[t]
        snr = ac / (1 - ac).clamp_min(1e-8)
        w = torch.minimum(snr, torch.full_like(snr, cfg.min_snr_gamma)) / (snr + 1)
        per = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
        return (w * per).mean()

    @torch.no_grad()
    def _ema_update(self) -> None:
        d = min(self.cfg.ema_decay, (1 + self.step) / (10 + self.step))
        for ema, live in ((self.ema_unet, self.unet), (self.ema_text, self.text_encoder)):
            ep = list(ema.parameters())
            lp = list(live.parameters())
            torch._foreach_lerp_(ep, lp, 1 - d)

    def train_step(self) -> float:
        lr = lr_at(self.cfg, self.step)
        for g in self.opt.param_groups:
            g["lr"] = lr
        loss = self.loss_on(self.step)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {self.step}; last good state is in {self.dir}/state.pt")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(self.unet.parameters()) + list(self.text_encoder.parameters()),
                                       self.cfg.grad_clip)
        self.opt.step()
        self.step += 1
        self._ema_update()
        return loss.item()

    def pipeline(self, ema: bool = True):
        return make_pipeline(self.ema_unet if ema else self.unet, self.ema_text if ema else self.text_encoder,
                             self.tokenizer, self.vae, self.sched)

    def log(self, rec: dict) -> None:
        with open(self.dir / "log.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")

    def run(self, until: int | None = None, max_seconds: float | None = None, progress=None,
            evaluate=None) -> None:
        """Train to step `until` (default cfg.steps) or for max_seconds, checkpointing as it goes."""
        until = min(until or self.cfg.steps, self.cfg.steps)
        t0 = time.time()
        start = self.step
        ema_loss = None
        while self.step < until:
            loss = self.train_step()
            ema_loss = loss if ema_loss is None else 0.98 * ema_loss + 0.02 * loss
            if progress is not None:
                progress(self.step, until, ema_loss, time.time() - t0, start)
            if self.step % self.cfg.ckpt_every == 0 or self.step == until:
                self.save()
                self.log({"step": self.step, "loss": ema_loss, "lr": lr_at(self.cfg, self.step),
                          "elapsed_s": round(time.time() - t0, 1), "time": time.time()})
            if evaluate is not None and self.step % self.cfg.eval_every == 0:
                self.log({"step": self.step, "eval": evaluate(self)})
            if max_seconds is not None and time.time() - t0 > max_seconds:
                self.save()
                break


def export_pipeline(trainer: UNetTrainer, out_dir: str | Path) -> Path:
    """Write the EMA weights as a StableDiffusionPipeline folder (safetensors), atomically."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        import shutil
        shutil.rmtree(tmp)
    trainer.pipeline(ema=True).save_pretrained(tmp, safe_serialization=True)
    (tmp / "training.json").write_text(json.dumps({"step": trainer.step, "run_dir": str(trainer.dir)}, indent=2))
    if out.exists():
        import shutil
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
