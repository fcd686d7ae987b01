"""Prediction with fine-tuned models: ``sliding_window`` (Gaussian-weighted tiled prediction of a
whole volume, mirroring TTA), ``model`` (:class:`FineTunedModel`, :func:`load_finetuned`,
:class:`PredictOptions`), ``writing`` (label maps on the input's grid), ``instances`` (affinity models:
affinities -> instances) and ``predict`` (:func:`predict_folder`: read, preprocess as for training,
predict with the model's task's case predictor, map back onto each input file's grid, write NIfTI maps)."""
from volssl.inference.model import FineTunedModel, PredictOptions, load_finetuned
from volssl.inference.predict import find_inputs, predict_case, predict_folder
from volssl.inference.sliding_window import gaussian_importance_map, sliding_window_predict, tile_slices, tile_starts

__all__ = [
    "FineTunedModel",
    "PredictOptions",
    "find_inputs",
    "gaussian_importance_map",
    "load_finetuned",
    "predict_case",
    "predict_folder",
    "sliding_window_predict",
    "tile_slices",
    "tile_starts",
]
