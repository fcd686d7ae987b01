"""``volssl finetune``: fine-tune a pre-trained checkpoint (or train from scratch) on a labelled dataset.

Steps of :func:`finetune`:

1. the recipe (:mod:`volssl.finetuning.recipes`) with overrides, and the pre-training checkpoint
   (a ``.pt`` file or a pre-training run directory: ``checkpoints/final.pt``, else ``latest.pt``;
   ``None`` / ``"none"`` trains from scratch);
2. the data, in the paper's "fixed" setting: an nnU-Net v2 raw dataset is preprocessed with the
   checkpoint's plan (spacing, normalisation; :func:`volssl.data.preprocess.preprocess`) into
   ``OUT/preprocessed`` or a shared ``preprocessed_dir`` (file-locked, reused across runs). Only the
   structural quality rules apply: a labelled case is never dropped for a small field of view or
   file. An already preprocessed dataset must have been preprocessed the same way (same spacing,
   normalisation, clipping, cropping, anisotropy and label interpolation), else it is refused. A
   checkpoint without a plan (imported) uses the S3D plan; from scratch, the recipe's ``plan``;
   with ``plan="dynamic"`` (recipe ``scratch-dynamic``, the paper's "No (Dyn.)") the dataset's own
   nnU-Net-style plan (:func:`dynamic_setup`): spacing, normalisation, network depth and patch;
3. ``OUT/splits.json``: 5 folds by subject and the run's training subset (:mod:`.splits`);
4. the network: the checkpoint's architecture with the dataset's input channels and classes;
   pre-trained weights moved per the recipe (:mod:`.transfer`; the multi-channel stem replicated);
5. the loop (:func:`volssl.training.trainer.run_loop`, shared with pre-training: exact resume,
   signals, logs, checkpoints): foreground-oversampled labelled patches, spatial augmentation of
   images and labels (plus nnU-Net-like intensity augmentation from scratch), Dice + CE with
   optional deep supervision, SGD with the stages' trainable parameters and learning rates.

A fine-tuning run directory holds::

    FT/run.json                 {"method", "dataset", "n_train", "seed", "fold", "pretrained", ...}
    FT/splits.json              folds, this run's training / validation / test cases
    FT/config.json              the run's configuration (recipe + data arguments)
    FT/plan.json                plan "dynamic" only: the dataset's plan, network overrides, patch (dynamic_setup)
    FT/checkpoints/{latest,best,final}.pt   kind "finetune" (docs/design.md, "Fine-tuned model")
    FT/scalars.csv, FT/tb/      loss, lr, grad norm, validation loss (Dice + CE on fixed val patches)
    FT/summary.json, FT/STOPPED.json, FT/preprocessed/ (unless preprocessed_dir)

``volssl predict --model FT ...`` loads ``final.pt`` (else ``best.pt``); prediction and
evaluation are separate commands. ``best.pt`` is the lowest validation loss when
``train.val_every > 0`` and the fold has validation cases.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from volssl.config import ModelConfig, config_to_dict
from volssl.data.labelled import check_plan, dataset_meta, labelled_root, locked, preprocess_labelled  # noqa: F401
from volssl.finetuning.losses import LabelMap
from volssl.finetuning.recipes import lr_at_step, resolve_recipe, stage_at
from volssl.finetuning.splits import make_splits, save_splits
from volssl.finetuning.tasks import get_task
from volssl.finetuning.transfer import (TransferReport, init_heads, set_trainable, trainable_names,
                                       transfer_weights)
from volssl.training import distributed as D
from volssl.training.augment import intensity_augment, spatial_augment
from volssl.training.checkpoint import checkpoint_model, find_run_checkpoint, load_checkpoint
from volssl.training.exported import locate_exported
from volssl.training.optim import StepSchedule, build_optimizer
from volssl.training.trainer import (
    AUGMENT_STREAM, RESUME_MUTABLE, VAL_BATCHES, VAL_STREAM, autocast_context, check_train_config, make_scaler,
    open_run, resolve_device, seed_everything, step_seed,
)
from volssl.training.loop import StepJob, run_loop
from volssl.util.atomic import write_json_atomic
from volssl.util.hub import is_hub_reference

PRETRAIN_CHECKPOINTS = ("final.pt", "latest.pt")
SOURCE_KINDS = ("pretrain", "import")
#: configuration keys that may change when a run is resumed
FINETUNE_MUTABLE = {f"recipe.{k}" for k in RESUME_MUTABLE if k.startswith("train.")} | {
    "recipe.description", "recipe.num_workers"}


def _say(msg: str, info: D.DistInfo | None = None) -> None:
    if info is None or info.is_main:
        from tqdm import tqdm

        tqdm.write(f"volssl finetune: {msg}", file=sys.stderr)


# --------------------------------------------------------------------------- the pre-trained model
@dataclasses.dataclass
class Source:
    """A pre-training checkpoint as fine-tuning uses it."""

    path: str
    kind: str
    method: str  # the pre-training method ("s3d", ...; "nnssl" for an import)
    step: int
    model: ModelConfig
    network: dict[str, torch.Tensor]
    plan: dict[str, Any] | None  # the plan.json of the pre-training data (None: imported)
    patch_size: tuple[int, int, int] | None


def resolve_source(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a pre-training run directory's ``checkpoints/final.pt`` (else ``latest.pt``),
    or an exported safetensors folder (``hf://ORG/NAME[@REVISION]`` is downloaded to one first;
    :mod:`volssl.training.exported`)."""
    exported = locate_exported(path)
    if exported is not None:
        return exported.resolve()
    path = Path(path).expanduser()
    if path.is_file():
        return path.resolve()
    if path.is_dir():
        found = find_run_checkpoint(path, PRETRAIN_CHECKPOINTS)
        if found is not None:
            return found.resolve()
        raise FileNotFoundError(f"{path}: no pre-training checkpoint (looked for checkpoints/final.pt, latest.pt)")
    raise FileNotFoundError(f"checkpoint not found: {path}")


def load_source(checkpoint: str | os.PathLike | None) -> Source | None:
    """The pre-trained model of ``checkpoint`` (None or "none": training from scratch): a checkpoint file,
    a pre-training run directory, an exported safetensors folder or ``hf://ORG/NAME[@REVISION]``
    (whose ``path`` is then that reference, for the run's records)."""
    if checkpoint is None or str(checkpoint).lower() == "none":
        return None
    file = resolve_source(checkpoint)
    data = load_checkpoint(file)
    kind = data.get("kind")
    if kind not in SOURCE_KINDS:
        raise ValueError(f"{file}: a {kind!r} checkpoint; fine-tuning starts from a pre-training ('pretrain') or "
                         "imported ('import') checkpoint")
    model = checkpoint_model(data, file)
    config = data.get("config") or {}
    patch = (config.get("data") or {}).get("patch_size")
    method = (config.get("method") or {}).get("name") or "none"
    if kind == "import" or method == "none":
        method = str((data.get("source") or {}).get("format") or "import")
    where = str(checkpoint) if is_hub_reference(checkpoint) else str(file)
    return Source(path=where, kind=kind, method=method, step=int(data.get("step") or 0), model=model,
                  network=data["network"], plan=data.get("plan"),
                  patch_size=tuple(int(p) for p in patch) if patch else None)


# --------------------------------------------------------------------------- the data
def prepare_dataset(dataset: str | os.PathLike, plan: dict[str, Any], out: Path,
                    preprocessed_dir: str | os.PathLike | None = None, workers: int = 1, progress: bool = True,
                    info: D.DistInfo | None = None, check: bool = True) -> Path:
    """The preprocessed dataset to fine-tune on (see the module docstring, step 2); returns its root.

    ``dataset``: an nnU-Net v2 raw dataset (preprocessed here with ``plan`` by rank 0, under a lock,
    into ``preprocessed_dir`` or ``out/preprocessed``) or a preprocessed one (checked against ``plan``
    when ``check``); :mod:`volssl.data.labelled` does the work, this adds the data-parallel ranks.
    """
    info = info or D.DistInfo()
    root, raw = labelled_root(dataset, plan, out / "preprocessed", preprocessed_dir, check)
    if raw is not None:
        if info.is_main:
            preprocess_labelled(raw, root, plan, workers, progress, say=lambda msg: _say(msg, info))
        D.barrier(info)
    return root


DYNAMIC_PLAN = "dynamic"


def is_dynamic(plan: str) -> bool:
    """Whether a recipe's ``plan`` asks for the dataset's own nnU-Net-style plan ("dynamic" or "dynamic:<GB>")."""
    return plan == DYNAMIC_PLAN or plan.startswith(DYNAMIC_PLAN + ":")


def dynamic_setup(dataset: str | os.PathLike, plan_name: str, arch: str, out: str | os.PathLike,
                  preprocessed_dir: str | os.PathLike | None = None, workers: int = 1, progress: bool = True,
                  info: D.DistInfo | None = None, resume: bool = False):
    """The nnU-Net-style plan of ``dataset`` ("No (Dyn.)"; :mod:`volssl.data.dynamic_plan`) for a network of
    architecture ``arch``, recorded as ``out/plan.json``; returns a :class:`~volssl.data.dynamic_plan.DynamicPlan`.

    The raw dataset's fingerprint (:mod:`volssl.data.fingerprint`) is computed on rank 0 under the
    preprocessing lock and cached as ``fingerprint.json`` beside the preprocessed data
    (``preprocessed_dir``, else ``out/preprocessed``); an already preprocessed dataset must hold the
    ``fingerprint.json`` of the dynamic run that made it. ``plan_name`` "dynamic:<GB>" sets the
    memory budget (default 24 GB, nnU-Net's ResEnc-L planner); a ``-tiny`` architecture keeps the
    patch at most 64^3 with a 0.15 GB budget. A resumed run reuses its ``plan.json``.
    """
    from volssl.data.dynamic_plan import (
        DEFAULT_MEMORY_GB, TINY_MAX_PATCH, TINY_MEMORY_GB, ArchWidths, DynamicPlan, dynamic_plan,
    )
    from volssl.data.fingerprint import FINGERPRINT_FILE, dataset_fingerprint, load_fingerprint
    from volssl.models.registry import resolve_widths

    info = info or D.DistInfo()
    out = Path(out)
    record = out / "plan.json"
    if resume and record.is_file():
        return DynamicPlan.from_dict(json.loads(record.read_text()))
    tiny = arch.endswith("-tiny")
    budget = TINY_MEMORY_GB if tiny else DEFAULT_MEMORY_GB
    if plan_name != DYNAMIC_PLAN:
        text = plan_name.split(":", 1)[1]
        try:
            budget = float(text)
        except ValueError:
            budget = float("nan")
        if not budget > 0:
            raise ValueError(f"plan={plan_name!r}: after 'dynamic:' comes the memory budget in GB (e.g. dynamic:8)")
    src = Path(dataset).expanduser()
    if not src.exists():
        raise FileNotFoundError(f"dataset not found: {src}")
    if (src / "plan.json").is_file():
        fp_path = src / FINGERPRINT_FILE
        if not fp_path.is_file():
            raise ValueError(f"{src} is a preprocessed dataset without {FINGERPRINT_FILE}: the dynamic plan needs the "
                             "raw nnU-Net dataset (or a folder preprocessed by a dynamic run)")
    else:
        root = Path(preprocessed_dir).expanduser() if preprocessed_dir else out / "preprocessed"
        fp_path = root / FINGERPRINT_FILE
        if info.is_main:
            with locked(root):
                _say(f"fingerprint of {src} -> {fp_path} (reused when the files did not change)", info)
                dataset_fingerprint(src, cache=fp_path, progress=progress, workers=workers)
        D.barrier(info)
    fingerprint = load_fingerprint(fp_path)
    dyn = dynamic_plan(fingerprint, ArchWidths(arch, *resolve_widths(ModelConfig(arch=arch))), budget,
                       TINY_MAX_PATCH if tiny else None)
    if info.is_main:
        write_json_atomic(record, {**dyn.to_dict(), "fingerprint": str(fp_path.resolve())})
        _say(f"dynamic plan: spacing {[round(s, 3) for s in dyn.plan.target_spacing]} mm, "
             f"{dyn.plan.normalization} normalisation, patch {dyn.patch_size}, {dyn.info['stages']} stages of {arch} "
             f"({dyn.info['feature_map_elements'] / 1e6:.0f}M feature-map elements for a {budget:g} GB budget); "
             f"{record}", info)
    return dyn


# --------------------------------------------------------------------------- the run
def _method_name(source: Source | None, recipe: str) -> str:
    base = recipe[: -len("-tiny")] if recipe.endswith("-tiny") else recipe
    if source is None:
        return base
    suffix = base[len("s3d-"):] if base.startswith("s3d-") else base
    return source.method if base in ("s3d", source.method) else f"{source.method}+{suffix}"


def finetune(
    checkpoint: str | os.PathLike | None,
    dataset: str | os.PathLike,
    out: str | os.PathLike,
    recipe: str = "s3d",
    fold: int = 0,
    n_train: int | None = None,
    fraction: float | None = None,
    seed: int = 0,
    preprocessed_dir: str | os.PathLike | None = None,
    overrides: Sequence[str] | None = None,
    progress: bool = True,
    *,
    resume: bool = False,
    split_seed: int = 0,
    n_folds: int = 5,
    stage_steps: Sequence[int] | None = None,
    method_name: str | None = None,
    workers: int = 1,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Fine-tune ``checkpoint`` on ``dataset`` with ``recipe``, writing the run to ``out``.

    Exempt from the size rule: its parameters are the ``volssl finetune`` command's options, one to one.

    Args:
        checkpoint: a pre-training (or imported) checkpoint file or run directory; None / "none":
            random initialisation (recipes with ``transfer="none"``, e.g. ``scratch``).
        dataset: an nnU-Net v2 raw dataset or a dataset preprocessed with the checkpoint's plan.
        out: the run directory.
        recipe: a name from :func:`volssl.finetuning.recipes.list_recipes`.
        fold: the cross-validation fold (``0 <= fold < n_folds``).
        n_train / fraction: train on a seeded subset of the fold's training cases (both None: the
            recipe's ``n_train``, at most the fold's training cases; else all).
        seed: the run seed (subset, initialisation, patches, augmentation).
        preprocessed_dir: where a raw dataset is preprocessed (shared between runs; default
            ``out/preprocessed``).
        overrides: ``key=value`` recipe overrides (``optim.lr=1e-2``, ``stages.2.steps=1000``, ``plan=amaes``,
            ``arch=resenc-s``, ``train.device=cuda``, ...).
        progress: progress bars on stderr.
        resume: continue ``out/checkpoints/latest.pt``, else the newest intact checkpoint of the run (same
            arguments required; see :func:`volssl.training.trainer.open_run`).
        split_seed, n_folds: the folds (the same for every method and seed by default).
        stage_steps: the length of each stage, in order (instead of ``stages.K.steps`` overrides).
        method_name: the ``method`` of run.json (default: the pre-training method, plus the recipe
            when it is not ``s3d``; the recipe name from scratch).
        workers: preprocessing processes.
        overwrite: (without ``resume``) replace a run already in ``out``; without it that is an error.

    Returns:
        the loop's summary (:func:`volssl.training.trainer.run_loop`) plus ``run_json``, ``splits``,
        ``preprocessed``, ``recipe``, ``method``, ``n_train`` and ``transfer`` (the transfer report).
    """
    cfg = resolve_recipe(recipe, overrides, stage_steps, seed)
    # the recipe's default subset (AMAES: 20 cases) when the caller asks for none; capped at the fold's size
    default_n = cfg.n_train if n_train is None and fraction is None else None
    tc = cfg.train
    check_train_config(tc)
    out = Path(out)
    source = load_source(checkpoint)
    _check_source(source, cfg, recipe)
    device = resolve_device(tc.device)
    autocast_context(tc.precision, device)
    info = D.init_distributed(device)
    device = resolve_device(tc.device, info)
    config = {"recipe": config_to_dict(cfg), "checkpoint": source.path if source else None,
              "dataset": str(Path(dataset).expanduser().resolve()), "fold": int(fold), "n_train": n_train,
              "fraction": fraction, "split_seed": int(split_seed), "n_folds": int(n_folds)}
    state = open_run(out, config, resume, info, name="finetune", mutable=FINETUNE_MUTABLE, overwrite=overwrite,
                     state_key="network")
    # "No (Dyn.)": from scratch with plan "dynamic" (or "dynamic:<GB>"): an nnU-Net-style plan of this dataset
    dynamic = dynamic_setup(dataset, cfg.plan, cfg.arch or "resenc-l", out, preprocessed_dir, workers, progress, info,
                            resume=state is not None) if source is None and is_dynamic(cfg.plan) else None
    explicit_plan = any(o.strip().startswith("plan=") for o in overrides or [])
    data = _labelled_data(dataset, source, dynamic, cfg, out, preprocessed_dir, workers, progress, info,
                          explicit_plan)
    if default_n is not None:
        available = len(make_splits(data.dataset.cases, fold, None, None, seed, split_seed, n_folds)["train"])
        n_train = min(default_n, available)
    data.split(fold, n_train, fraction, seed, split_seed, n_folds)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_splits(out / "splits.json", data.splits)

    seed_everything(tc.seed, device)
    net = _build_network(cfg, source, dynamic, data, info)
    net.network = net.network.to(device)
    method = method_name or _method_name(source, cfg.name)
    pretrained = None if source is None else {"checkpoint": source.path, "kind": source.kind,
                                              "method": source.method, "step": source.step}
    n = len(data.splits["train"])

    def payload(tag: str) -> dict[str, Any]:
        return dict(kind="finetune", model=config_to_dict(net.model_cfg), network=net.network.state_dict(),
                    plan=data.dataset.plan, labels=data.labels, channels=data.channels, patch_size=list(net.patch),
                    deep_supervision=cfg.deep_supervision, config=config, recipe=cfg.name, pretrained=pretrained,
                    transfer=net.report.to_dict(), fold=int(fold), n_train=n, **net.task.checkpoint_fields())

    job = _finetune_job(cfg, net, data, info, device, payload, title=method)
    run_json = {"method": method, "dataset": data.meta["name"], "n_train": n, "seed": int(seed),
                "fold": int(fold), "pretrained": source is not None, "recipe": cfg.name,
                "checkpoint": source.path if source else None}
    if info.is_main:
        write_json_atomic(out / "run.json", run_json)
    _say(f"{method} ({cfg.name}) on {data.meta['name']} fold {fold}: {n} training / "
         f"{len(data.splits['val'])} validation cases, {len(data.channels)} channel(s), "
         f"{data.label_map.n_classes} classes, patch {net.patch}, batch {cfg.batch_size}, {net.model_cfg.arch} on "
         f"{device} x{info.world_size}, {tc.precision}, {tc.steps} steps "
         f"({' + '.join(f'{s.name} {s.steps}' for s in cfg.stages)}); run: {out}", info)
    summary = run_loop(out, tc, job, config=config, global_batch=cfg.batch_size, info=info, device=device,
                       state=state, progress=progress)
    summary.update(run_json=str(out / "run.json"), splits=str(out / "splits.json"), preprocessed=str(data.root),
                   recipe=cfg.name, method=method, n_train=n, transfer=net.report.to_dict())
    if info.is_main:
        write_json_atomic(out / "summary.json", summary)
    return summary


def _check_source(source: Source | None, cfg: Any, recipe: str) -> None:
    """ValueError unless the checkpoint (None: from scratch) suits the recipe's transfer and architecture."""
    if source is None and cfg.transfer != "none":
        raise ValueError(f"recipe {recipe!r} transfers pre-trained weights (transfer={cfg.transfer!r}); give a "
                         "checkpoint, or train from scratch with a scratch recipe")
    if source is not None and cfg.transfer == "none":
        raise ValueError(f"recipe {recipe!r} trains from scratch; use --checkpoint none (or a fine-tuning recipe "
                         "such as s3d)")
    if source is not None and cfg.arch and cfg.arch != source.model.arch:
        raise ValueError(f"arch={cfg.arch!r} but the checkpoint is a {source.model.arch!r} network")


@dataclasses.dataclass
class LabelledData:
    """The preprocessed labelled dataset of a fine-tuning run, its declared labels and channels, and the splits."""

    root: Path
    dataset: Any  # PreprocessedDataset
    splits: dict[str, Any] = dataclasses.field(default_factory=dict)  # set by split(), with the fields below
    labels: dict[str, int] = dataclasses.field(default_factory=dict)
    channels: list[str] = dataclasses.field(default_factory=list)
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    label_map: LabelMap | None = None

    def split(self, fold: int, n_train: int | None, fraction: float | None, seed: int, split_seed: int,
              n_folds: int) -> None:
        """The fold's (seeded subset of) training and validation cases, checked against the declared labels."""
        self.splits = make_splits(self.dataset.cases, fold, n_train, fraction, seed, split_seed, n_folds)
        by_id = {r.id: r for r in self.dataset.cases}
        cases = [by_id[c] for c in self.splits["train"] + self.splits["val"]]
        meta = dataset_meta(self.root, cases or self.dataset.cases)
        self.meta, self.labels, self.channels = meta, dict(meta["labels"]), list(meta["channels"])
        self.label_map = LabelMap(self.labels, meta["instance"])
        for rec in cases:
            if rec.shape and int(rec.shape[0]) != len(self.channels):
                raise ValueError(f"{self.root}: case {rec.id} has {rec.shape[0]} channel(s), the dataset declares "
                                 f"{self.channels}")
            bad = self.label_map.unknown(self.dataset.props(rec.id).get("label_values") or [])
            if bad:
                raise ValueError(f"{self.dataset.label_path(rec.id)}: label values {bad} are not declared in the "
                                 f"dataset's labels {self.labels}")


def _labelled_data(dataset: str | os.PathLike, source: Source | None, dynamic: Any, cfg: Any, out: Path,
                   preprocessed_dir: str | os.PathLike | None, workers: int, progress: bool, info: D.DistInfo,
                   explicit_plan: bool) -> LabelledData:
    """The labelled dataset preprocessed with the checkpoint's plan (from scratch: the recipe's, or the dynamic
    plan); a preprocessed dataset must match it unless training from scratch without an explicit plan."""
    from volssl.data.dataset import PreprocessedDataset
    from volssl.data.preprocess import get_plan

    plan = dynamic.plan.to_dict() if dynamic else source.plan if source is not None else get_plan(cfg.plan).to_dict()
    if plan is None:
        _say(f"{source.path} carries no preprocessing plan ({source.kind}); using the S3D plan", info)
        plan = get_plan("s3d").to_dict()
    root = prepare_dataset(dataset, plan, out, preprocessed_dir, workers, progress, info,
                           check=source is not None or explicit_plan or dynamic is not None)
    return LabelledData(root=root, dataset=PreprocessedDataset(root))


@dataclasses.dataclass
class FineTuneNetwork:
    """The network of a fine-tuning run: built, weights transferred, with its task and patch."""

    network: torch.nn.Module
    model_cfg: ModelConfig
    task: Any  # finetuning.tasks.Task
    report: TransferReport
    patch: tuple[int, ...]


def _build_network(cfg: Any, source: Source | None, dynamic: Any, data: LabelledData,
                   info: D.DistInfo) -> FineTuneNetwork:
    """The checkpoint's architecture (from scratch: the recipe's or the dynamic plan's) with the dataset's input
    channels and the task's outputs, pre-trained weights moved per the recipe, the patch checked."""
    from volssl.models.registry import build_model

    base = source.model if source is not None else ModelConfig(arch=cfg.arch or "resenc-l",
                                                               **(dynamic.model if dynamic else {}))
    task = get_task(cfg.task, data.label_map, cfg.affinity_distances)  # what the network predicts, and its loss
    task.check_dataset(data.meta, data.root, cfg.name)
    if not task.deep_supervision:
        cfg.deep_supervision = False
    model_cfg = dataclasses.replace(base, in_channels=len(data.channels), out_channels=task.n_outputs(),
                                    channel_fusion=cfg.channel_fusion)
    network = build_model(model_cfg)
    if not hasattr(network, "encoder") or not hasattr(network, "decoder"):
        raise ValueError(f"fine-tuning needs an encoder/decoder network, {model_cfg.arch!r} is not one")
    network.deep_supervision = cfg.deep_supervision
    report = TransferReport(new=sorted(network.state_dict()))
    if source is not None:
        report = transfer_weights(network, source.network, cfg.transfer, cfg.stem_init, where=source.path)
        _say(f"{source.path} (step {source.step}): {report.summary()}", info)
        source.network = {}  # the weights now live in the network
    init_heads(network, cfg.head_init, report.new)  # only heads the transfer left fresh
    patch = tuple(int(p) for p in (cfg.patch_size or (source.patch_size if source else None)
                                   or (dynamic.patch_size if dynamic else None) or ()))
    if len(patch) != 3:
        raise ValueError("no patch size: the checkpoint does not record its pre-training patch; set patch_size=X,Y,Z")
    stride = network.encoder.total_stride
    if any(p % stride for p in patch):
        raise ValueError(f"patch {patch} is not divisible by the network's total stride {stride}")
    return FineTuneNetwork(network=network, model_cfg=model_cfg, task=task, report=report, patch=patch)


def _param_groups(cfg: Any, network: torch.nn.Module) -> list[Any]:
    """The trainable parameters, as layer-decay groups (ViT), encoder / rest groups (``encoder_lr_scale``) or a list."""
    names = set(trainable_names(network, "all", deep_supervision=cfg.deep_supervision))
    if cfg.layer_decay is not None:  # ViT encoders: per-layer lr scales (and no decay of biases / norms)
        from volssl.training.lr_decay import param_groups_lrd

        return param_groups_lrd(network, cfg.optim.weight_decay, cfg.layer_decay, names=names)
    if cfg.encoder_lr_scale != 1.0:  # the encoder (stem included) at a fraction of the lr
        named = [(n, p) for n, p in network.named_parameters() if n in names]
        return [{"params": [p for n, p in named if n.startswith("encoder.")], "lr_scale": cfg.encoder_lr_scale},
                {"params": [p for n, p in named if not n.startswith("encoder.")], "lr_scale": 1.0}]
    return [p for n, p in network.named_parameters() if n in names]


def _finetune_job(cfg: Any, net: FineTuneNetwork, data: LabelledData, info: D.DistInfo, device: torch.device,
                  payload: Callable[[str], dict[str, Any]], title: str) -> StepJob:
    """The :class:`StepJob` of fine-tuning ``net`` with the checkpoint fields ``payload``: stage-wise trainable
    parameters and learning rates, nnU-Net-oversampled labelled patches, spatial (and intensity) augmentation
    of images and labels, the task's loss, and the validation loss on fixed validation patches."""
    from volssl.data.patches import PatchSampler, make_loader

    tc, network, splits = cfg.train, net.network, data.splits
    offset, local_b = D.local_rows(cfg.batch_size, info)
    optimizer = build_optimizer(_param_groups(cfg, network), cfg.optim)
    schedule = StepSchedule(optimizer, tc.steps, cfg.optim, lr_fn=lambda s: lr_at_step(cfg, s))

    def on_step(step: int) -> bool:
        k, local = stage_at(cfg, step)
        stage = cfg.stages[k]
        changed = set_trainable(network, stage.trainable, cfg.train_stem_with_decoder, cfg.deep_supervision)
        if changed or local == 0:
            n = sum(p.numel() for p in network.parameters() if p.requires_grad)
            _say(f"stage {k + 1}/{len(cfg.stages)} {stage.name!r} at step {step}: {stage.steps} steps, "
                 f"{stage.trainable} trainable ({n / 1e6:.2f}M parameters), lr {stage.lr}", info)
        return changed

    # nnU-Net's oversampling: the last foreground_prob of every global batch is centred on foreground
    # (at least one patch of a batch of 2), not an independent coin (which left 45% of batches of 2 without)
    sampler = PatchSampler(data.dataset, net.patch, foreground_prob=cfg.foreground_prob, seed=tc.seed,
                           channel_mode="all", with_labels=True, cases=splits["train"],
                           foreground_batch=cfg.batch_size)

    def batches(start: int, rank: int, world: int):
        return make_loader(sampler, cfg.batch_size, cfg.num_workers, start_batch=start, rank=rank, world_size=world,
                           pin_memory=device.type == "cuda")

    def forward(model: torch.nn.Module, batch: dict, step: int) -> tuple[torch.Tensor, dict]:
        images = batch["image"].to(device, non_blocking=True).float()
        target = batch["label"].to(device, non_blocking=True)
        if images.ndim != 5 or images.shape[0] != local_b or images.shape[1] != len(data.channels):
            raise ValueError(f"batch 'image' must be ({local_b}, {len(data.channels)}, X, Y, Z) per rank, got "
                             f"{tuple(images.shape)}")
        torch.manual_seed(step_seed(tc.seed, step))
        gen = torch.Generator().manual_seed(step_seed(tc.seed, step, AUGMENT_STREAM))
        with torch.no_grad():
            images, target = spatial_augment(images, cfg.augment, gen, offset, cfg.batch_size, labels=target)
            images = intensity_augment(images, cfg.intensity, gen, offset, cfg.batch_size)
        with autocast_context(tc.precision, device):
            outputs = model(images)
        return net.task.loss(outputs, target), {}

    return StepJob(module=network, optimizer=optimizer, schedule=schedule, scaler=make_scaler(tc.precision, device),
                   batches=batches, forward=forward, payload=payload, state_key="network",
                   grad_clip=cfg.optim.grad_clip, validate=_validation(cfg, net, data, info, device),
                   on_step=on_step, name="finetune", title=title)


def _validation(cfg: Any, net: FineTuneNetwork, data: LabelledData, info: D.DistInfo,
                device: torch.device) -> Callable[[], float] | None:
    """The validation loss on fixed patches of the fold's validation cases (None: no validation)."""
    from volssl.data.patches import PatchSampler, make_loader

    tc = cfg.train
    if not (tc.val_every > 0 and data.splits["val"]):
        return None
    val_sampler = PatchSampler(data.dataset, net.patch, foreground_prob=cfg.foreground_prob,
                               seed=step_seed(tc.seed, 0, VAL_STREAM), channel_mode="all", with_labels=True,
                               cases=data.splits["val"], foreground_batch=cfg.batch_size)
    it0 = iter(make_loader(val_sampler, cfg.batch_size, 0, rank=info.rank, world_size=info.world_size))
    val_data = [next(it0) for _ in range(VAL_BATCHES)]
    del it0

    def validate() -> float:
        losses = []
        with torch.no_grad():
            for b in val_data:
                with autocast_context(tc.precision, device):
                    outputs = net.network(b["image"].to(device).float())
                losses.append(net.task.loss(outputs, b["label"].to(device)).detach())
        return float(D.all_reduce_mean(torch.stack(losses).mean(), info).item())

    return validate
