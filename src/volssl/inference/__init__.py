"""Prediction with fine-tuned models: ``sliding_window`` (Gaussian-weighted tiled prediction of a
whole volume, mirroring TTA) and ``predict`` (:func:`predict_folder`: read, preprocess as for
training, predict, map back onto each input file's grid, write NIfTI label maps)."""
from volssl.inference.predict import FineTunedModel, find_inputs, load_finetuned, predict_case, predict_folder
from volssl.inference.sliding_window import gaussian_importance_map, sliding_window_predict, tile_slices, tile_starts

__all__ = [
    "FineTunedModel",
    "find_inputs",
    "gaussian_importance_map",
    "load_finetuned",
    "predict_case",
    "predict_folder",
    "sliding_window_predict",
    "tile_slices",
    "tile_starts",
]
