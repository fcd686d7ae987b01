"""The model card (``README.md``) of an exported safetensors folder (``volssl export --format
safetensors``): what the network is, what it was trained on and for how long, how well it probes,
what it is for and not for, and how to fine-tune it with volssl and with nnU-Net. The YAML front
matter is the Hugging Face Hub's model-card metadata, so the folder can be uploaded as it is."""
from __future__ import annotations

from typing import Any

# ``info`` below is a volssl.training.export.RunInfo (not imported: that module imports this one)
RunInfo = Any


def _fmt(v: Any, digits: int = 4) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _front_matter(info: RunInfo) -> list[str]:
    tags = ["volssl", "3d", "medical-imaging", "image-segmentation", info.model.arch]
    tags += [info.method] if info.method and info.method not in tags else []
    if info.kind != "finetune":
        tags.append("self-supervised")
    return ["---", "library_name: volssl", "tags:"] + [f"- {t}" for t in tags] + ["---", ""]


def _model_table(info: RunInfo, config: dict[str, Any]) -> list[str]:
    from volssl.models.registry import resolve_widths

    m = info.model
    features, blocks, strides = resolve_widths(m)
    arch = (f"`{m.arch}` (widths {list(features)}, blocks {list(blocks)}, strides {list(strides)}), "
            f"{config['parameters']:,} parameters")
    data_cfg = (info.data.get("config") or {}).get("data") or {}
    batch = data_cfg.get("batch_size")
    steps = f"{info.step}" + (f" steps of {batch} patches" if batch and info.kind == "pretrain" else " steps")
    probe = info.probe
    probe_text = "not measured (pre-train with `train.probe_dataset` set, or run `volssl probe`)"
    if probe:
        probe_text = (f"linear-probe Dice {_fmt(probe.get('probe_dice'))} at step {probe.get('step')} "
                      f"(random-init floor {_fmt(probe.get('probe_floor'))})")
    kind = {"pretrain": "self-supervised pre-training", "finetune": "supervised fine-tuning",
            "import": "imported weights"}.get(info.kind, info.kind)
    return ["| | |", "|---|---|",
            f"| method | **{info.method}** ({kind}{', preset `' + info.preset + '`' if info.preset else ''}) |",
            f"| architecture | {arch} |",
            f"| input channels | {m.in_channels} |",
            f"| training | {steps} |",
            f"| final loss | {_fmt(info.final_loss)} (smoothed {_fmt(info.final_loss_ema)}) |",
            f"| probe | {probe_text} |", ""]


def _data_section(info: RunInfo) -> list[str]:
    plan = info.data.get("plan") or {}
    lines = ["## Data", ""]
    if info.kind == "finetune":
        ft = info.data
        lines += [f"Fine-tuned on {ft.get('n_train', '?')} labelled cases (fold {ft.get('fold', '?')}) with recipe "
                  f"`{ft.get('recipe', '?')}`; labels {ft.get('labels')}; input channels {ft.get('channels')}.", ""]
    else:
        lines += ["volssl does not record which images a run was trained on: describe the pre-training data "
                  "(modality, number of volumes, source, licence) here before you share this model.", ""]
    if plan:
        spacing = plan.get("target_spacing", plan.get("spacing"))
        name = f" `{plan['name']}`" if plan.get("name") else ""
        spacing_text = f"{spacing} mm (x, y, z)" if spacing else "each volume's own (no resampling)"
        clip = plan.get("clip_percentiles")
        lines += [f"- preprocessing plan{name}: spacing {spacing_text}, normalisation "
                  f"`{plan.get('normalization', 'not recorded')}`, intensity clipping "
                  f"{'to percentiles ' + str(clip) if clip else 'none'}"]
        if plan.get("source"):
            lines.append(f"- data source: {plan['source']}")
    else:
        lines.append("- no preprocessing plan recorded (imported weights: see their source)")
    if info.patch_size:
        lines.append(f"- patch size {info.patch_size} voxels (x, y, z)")
    return lines + [""]


def _use_section(info: RunInfo) -> list[str]:
    if info.kind == "finetune":
        use = ("Segmenting images like the fine-tuning data (same modality, channels, spacing and labels), "
               "e.g. with `volssl predict --model THIS_FOLDER`; or as the starting point of further fine-tuning.")
    else:
        use = ("Initialising 3D segmentation networks before supervised fine-tuning on data preprocessed like the "
               "pre-training data (same spacing and normalisation). It is a representation, not a segmentation "
               "model: its output heads are not part of the export.")
    short = info.step < 1000
    limits = ["- Research use only; not a medical device and not validated for clinical decisions.",
              "- Expect lower gains on modalities, spacings or anatomy far from the training data.",
              "- The 3D patch size and spacing above are what the network saw; very different ones transfer worse."]
    if short:
        limits.insert(0, f"- Trained for only {info.step} steps: a smoke test or demonstration, not a useful "
                         "model.")
    return ["## Intended use", "", use, "", "## Limits", ""] + limits + [""]


def _finetune_section(info: RunInfo) -> list[str]:
    lines = ["## How to use and fine-tune", "",
             "With volssl (this folder, or its Hub address `hf://ORG/NAME[@REVISION]`):", "", "```bash"]
    if info.kind == "finetune":
        lines += ["volssl predict --model THIS_FOLDER --input /data/images --output /data/predictions"]
    else:
        lines += ["volssl finetune --checkpoint THIS_FOLDER --dataset /data/DatasetXXX_Name --out runs/ft",
                  "volssl probe --checkpoint THIS_FOLDER --dataset /data/DatasetXXX_Name --work runs/probe_data"]
    lines += ["```", ""]
    if info.model.arch.startswith("resenc") and info.model.channel_fusion != "features":
        lines += ["With nnU-Net v2 (ResEnc U-Nets only): export the weights in nnU-Net's layout, add the printed "
                  "configuration to your plans and pass the weights to `nnUNetv2_train`:", "", "```bash",
                  "volssl export THIS_FOLDER nnunet_weights --format nnunet",
                  "nnUNetv2_train DATASET 3d_fullres_volssl FOLD -p PLANS -pretrained_weights "
                  "nnunet_weights/nnunet_pretrained_weights.pth", "```", "",
                  "The plans must match the input channels, architecture (`nnunet_plans.json`), spacing and "
                  "normalisation listed there.", ""]
    else:
        lines += [f"nnU-Net: `{info.model.arch}` has no nnU-Net counterpart; fine-tune it with volssl.", ""]
    return lines


def model_card(info: RunInfo, config: dict[str, Any]) -> str:
    """The README.md of an exported folder, from the run's :class:`~volssl.training.export.RunInfo`
    and the folder's ``config.json`` dict (before its weights fields are filled in)."""
    title = f"{info.method} {info.model.arch}" + (" (fine-tuned)" if info.kind == "finetune" else "")
    intro = (f"A `{info.model.arch}` network trained with **{info.method}** for {info.step} steps by "
             "volssl, exported as safetensors. `config.json` holds the "
             "architecture (volssl ModelConfig), the preprocessing plan and the training configuration; "
             "`model.safetensors` the weights (names as volssl's `build_model`).")
    lines = _front_matter(info) + [f"# {title}", "", intro, "", "## Model", ""] + _model_table(info, config)
    lines += _data_section(info) + _use_section(info) + _finetune_section(info)
    lines += ["## Files", "", "- `model.safetensors`: the network's state dict",
              "- `config.json`: architecture, plan, method, steps, losses, probe, training configuration",
              "- `README.md`: this card", ""]
    return "\n".join(lines)
