"""The in-memory result of every phantom generator: :class:`PhantomCase`."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PhantomCase:
    """One synthetic volume in memory.

    ``images``: float32 ``(C, X, Y, Z)`` integer-valued intensities in the on-disk voxel order;
    ``label``: ``(X, Y, Z)`` uint8 (semantic) or uint16 (instances); ``affine``: float64 4x4 voxel ->
    world (RAS, mm); ``tissue``: ``(X, Y, Z)`` uint8 ground-truth tissue map (names in
    ``tissue_names``), kept in memory only.
    """

    images: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    channel_names: tuple[str, ...]
    tissue: np.ndarray
    tissue_names: tuple[str, ...]

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size (mm) along each array axis."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def fov_mm(self) -> np.ndarray:
        """Field of view (mm) along each array axis."""
        return self.spacing * np.array(self.label.shape)
