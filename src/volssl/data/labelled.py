"""The labelled dataset a fine-tuning run trains on: preprocessed with a given plan, once, shared between runs.

An nnU-Net v2 raw dataset is preprocessed with the plan (structural quality rules only: a labelled case
is never dropped for a small field of view or file) into a folder that several runs may share (an
exclusive file lock); an already preprocessed dataset must have been preprocessed the same way
(:func:`check_plan`). :func:`dataset_meta` reads the labels and channels the runs train with.
``volssl.finetuning.finetune.prepare_dataset`` calls these on the main data-parallel rank.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from volssl.util.atomic import write_json_atomic


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder/.volssl-preprocess.lock`` (runs sharing a preprocessed dir)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".volssl-preprocess.lock", "w") as fh:
        try:
            import fcntl

            fcntl.flock(fh, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - not POSIX
            pass
        yield


def check_plan(found: dict[str, Any], wanted: dict[str, Any], where: str) -> None:
    """ValueError unless ``found`` preprocesses arrays as ``wanted`` does
    (:data:`volssl.data.preprocess.ARRAY_PLAN_KEYS`)."""
    from volssl.data.preprocess import plan_differences

    detail = plan_differences(found, wanted)
    if detail:
        raise ValueError(f"{where} was preprocessed with another plan ({detail}); fine-tuning uses the "
                         "checkpoint's plan (the paper's fixed setting): pass the raw nnU-Net dataset instead")


def dataset_meta(root: Path, records: Sequence[Any]) -> dict[str, Any]:
    """``{"labels", "channels", "instance", "name"}`` of a preprocessed dataset: from a ``dataset.json``
    in ``root``, else the raw dataset's (found through the cases' source paths), else derived from
    the stored label values ("label_1", ...)."""
    candidates = [root / "dataset.json"]
    for rec in records[:1]:
        if rec.source:
            candidates.append(Path(rec.source[0]).parent.parent / "dataset.json")
    for path in candidates:
        if path.is_file():
            meta = json.loads(path.read_text())
            names = meta.get("channel_names") or meta.get("modality") or {}
            channels = [str(names[k]) for k in sorted(names, key=lambda k: int(k))] if isinstance(names, dict) else []
            if isinstance(meta.get("labels"), dict) and channels:
                return {"labels": meta["labels"], "channels": channels,
                        "name": str(meta.get("volssl_dataset") or path.parent.name),
                        "instance": bool(meta.get("instance_labels", False)), "dataset_json": str(path)}
    from volssl.data.dataset import PreprocessedDataset

    ds = PreprocessedDataset(root)
    values = sorted({int(v) for r in records if r.has_label for v in (ds.props(r.id).get("label_values") or [])} | {0})
    labels = {("background" if v == 0 else f"label_{v}"): v for v in values}
    channels = list(records[0].channels) if records else []
    return {"labels": labels, "channels": channels, "instance": False, "name": root.name, "dataset_json": None}


def labelled_root(dataset: str | os.PathLike, plan: dict[str, Any], default_root: Path,
                  preprocessed_dir: str | os.PathLike | None = None, check: bool = True) -> tuple[Path, Path | None]:
    """``(root, raw)``: the preprocessed dataset's root, and the raw dataset still to preprocess into it
    (None when ``dataset`` is already preprocessed; then checked against ``plan`` when ``check``)."""
    from volssl.data.readers import is_nnunet_dataset

    src = Path(dataset).expanduser()
    if not src.exists():
        raise FileNotFoundError(f"dataset not found: {src}")
    if (src / "plan.json").is_file():
        if check:
            check_plan(json.loads((src / "plan.json").read_text()), plan, str(src))
        return src.resolve(), None
    if not is_nnunet_dataset(src):
        raise ValueError(f"{src} is neither an nnU-Net v2 raw dataset (dataset.json + imagesTr) nor a preprocessed "
                         "volssl dataset (plan.json)")
    root = Path(preprocessed_dir).expanduser() if preprocessed_dir else default_root
    return root.resolve(), src


def preprocess_labelled(src: Path, root: Path, plan: dict[str, Any], workers: int = 1, progress: bool = True,
                        say: Callable[[str], None] = print) -> None:
    """Preprocess the raw dataset ``src`` with ``plan`` (labelled: structural rules only) into ``root``, under
    its lock; cases already there are skipped; a plan already in ``root`` must match (:func:`check_plan`)."""
    from volssl.data.preprocess import labelled_plan, preprocess

    with locked(root):
        if (root / "plan.json").is_file():
            check_plan(json.loads((root / "plan.json").read_text()), plan, str(root))
        say(f"preprocessing {src} with the {plan.get('name', '?')!r} plan -> {root} (cases already there are "
            "skipped)")
        summary = preprocess(src, root, plan=labelled_plan(plan), workers=workers, progress=progress)
        if summary.n_excluded:
            say(f"{summary.n_excluded} case(s) excluded (unreadable or inconsistent); see {summary.report}")
        meta = json.loads((src / "dataset.json").read_text())
        write_json_atomic(root / "dataset.json", {**meta, "volssl_dataset": src.resolve().name})
