"""volssl: self-supervised pre-training of 3D segmentation networks and few-label fine-tuning."""
__version__ = "0.1.0"
