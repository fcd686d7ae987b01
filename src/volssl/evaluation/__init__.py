"""Evaluation of segmentations: ``metrics`` (Dice, normalised surface distance; stateless functions on
label arrays) and ``evaluate`` (:func:`evaluate_folder`, prediction folder vs reference folder ->
metrics.json)."""
from volssl.evaluation.evaluate import evaluate_folder, load_metrics
from volssl.evaluation.metrics import case_metrics, dice, normalized_surface_distance

__all__ = ["case_metrics", "dice", "evaluate_folder", "load_metrics", "normalized_surface_distance"]
