"""Evaluation: metric definitions, NudeNet ASR, Q16, CLIP score, FID, UnlearnCanvas UA/IRA/CRA, reports, cost.

Modules are imported directly (`from diffusion_sae.eval.nudity import nudity_asr`) so that importing
one metric never pulls the dependencies of another (onnxruntime, transformers, matplotlib).
"""
from .metrics import (AssetError, MetricInputError, MetricResult, accuracy_by_label, classifier_frechet_distance,
                      feature_stats, frechet_distance, frechet_distance_from_features)

__all__ = ["AssetError", "MetricInputError", "MetricResult", "accuracy_by_label", "classifier_frechet_distance",
           "feature_stats", "frechet_distance", "frechet_distance_from_features"]
