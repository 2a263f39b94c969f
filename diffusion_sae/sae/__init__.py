"""Sparse autoencoder core: TopK / BatchTopK SAEs, training, metrics, checkpoints, foreign loaders.

    from diffusion_sae.sae import TopKSAE, TrainConfig, train_sae, load_sae
"""
from .model import EncoderOutput, ForwardOutput, SAEConfig, SAEError, TopKSAE
from .io import detect_format, load_pretrained, load_sae, save_sae
from .train import SAETrainer, TrainConfig, geometric_median, iter_activation_files, rebatch, train_sae
from .synthetic import SyntheticSparseData, best_cosine
from . import metrics

__all__ = ["TopKSAE", "SAEConfig", "SAEError", "EncoderOutput", "ForwardOutput", "TrainConfig", "SAETrainer",
           "train_sae", "load_sae", "load_pretrained", "save_sae", "detect_format", "metrics", "rebatch",
           "geometric_median", "iter_activation_files", "SyntheticSparseData", "best_cosine"]
