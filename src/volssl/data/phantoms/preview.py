"""A PNG preview of a written dataset (``volssl phantoms --preview``); matplotlib and nibabel are
imported when it is drawn."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from volssl.data.phantoms.io import FILE_ENDING
from volssl.util.atomic import atomic_path


def render_phantom_preview(dataset_dir: str | os.PathLike, png_path: str | os.PathLike) -> Path:
    """PNG of the first training case of an nnU-Net v2 raw dataset: axial, coronal and sagittal
    slices (RAS, through the label's centre of mass or the middle) of every channel plus the label
    over the first channel. Works for any dataset with a ``dataset.json``."""
    import matplotlib

    matplotlib.use("Agg")
    import nibabel as nib
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    root = Path(dataset_dir)
    meta_path = root / "dataset.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{root}: no dataset.json (not an nnU-Net raw dataset)")
    meta = json.loads(meta_path.read_text())
    ending = meta.get("file_ending", FILE_ENDING)
    channels = meta.get("channel_names", {"0": "image"})
    firsts = sorted((root / "imagesTr").glob(f"*_0000{ending}"))
    if not firsts:
        raise FileNotFoundError(f"{root / 'imagesTr'}: no *_0000{ending} images")
    case = firsts[0].name[: -len(f"_0000{ending}")]

    def load(path: Path) -> tuple[np.ndarray, np.ndarray]:
        img = nib.as_closest_canonical(nib.load(str(path)))
        return np.asanyarray(img.dataobj), np.array(img.header.get_zooms()[:3])

    images = [load(root / "imagesTr" / f"{case}_{int(c):04d}{ending}")[0] for c in sorted(channels, key=int)]
    _, zooms = load(firsts[0])
    label_path = root / "labelsTr" / f"{case}{ending}"
    label = load(label_path)[0] if label_path.exists() else np.zeros(images[0].shape, np.uint8)
    fg = np.argwhere(label > 0)
    centre = fg.mean(0).round().astype(int) if len(fg) else np.array(label.shape) // 2
    views = [("axial", 2, (0, 1)), ("coronal", 1, (0, 2)), ("sagittal", 0, (1, 2))]
    names = [channels[c] for c in sorted(channels, key=int)]
    fig = Figure(figsize=(2.6 * (len(images) + 1), 2.6 * 3), dpi=110)
    rng = np.random.default_rng(0)
    lut = ListedColormap(np.concatenate([[[0, 0, 0, 0]], np.c_[rng.uniform(0.2, 1, (255, 3)), np.full(255, 0.6)]]))
    for row, (view, axis, (h, v)) in enumerate(views):
        sl = [slice(None)] * 3
        sl[axis] = int(centre[axis])
        aspect = zooms[v] / zooms[h]
        for col in range(len(images) + 1):
            ax = fig.add_subplot(3, len(images) + 1, row * (len(images) + 1) + col + 1)
            src = images[min(col, len(images) - 1) if col < len(images) else 0][tuple(sl)].T
            lo, hi = np.percentile(src, [0.5, 99.5])
            ax.imshow(src, cmap="gray", origin="lower", vmin=lo, vmax=max(hi, lo + 1e-6), aspect=aspect,
                      interpolation="nearest")
            if col == len(images):
                lab = label[tuple(sl)].T
                shown = np.where(lab > 0, (lab - 1) % 255 + 1, 0)
                ax.imshow(shown, cmap=lut, vmin=0, vmax=255, origin="lower", aspect=aspect, interpolation="nearest")
                title = "label"
            else:
                title = names[col]
            ax.set_title(f"{title} ({view} {int(centre[axis])})", fontsize=8)
            ax.set_axis_off()
    fig.suptitle(f"{meta.get('name', root.name)}: {case}", fontsize=9)
    fig.tight_layout()
    png_path = Path(png_path)
    with atomic_path(png_path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return png_path
