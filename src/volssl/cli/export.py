"""``volssl export RUN OUT --format nnunet|nnssl|safetensors``: a run's network in the form the field
shares weights in (:mod:`volssl.training.export`).

    volssl export runs/s3d out/nnunet --format nnunet        # nnU-Net v2 -pretrained_weights + plans
    volssl export runs/s3d out/nnssl --format nnssl          # an nnssl checkpoint with its adaptation plan
    volssl export runs/s3d out/s3d-resenc --format safetensors   # a Hugging Face model folder + model card

The safetensors folder (or ``hf://ORG/NAME[@REVISION]`` once uploaded) is accepted wherever a
checkpoint is: ``volssl finetune --checkpoint``, ``volssl probe --checkpoint``, ``volssl predict --model``.
"""
from __future__ import annotations

import argparse
import json

#: = volssl.training.export.FORMATS (not imported here: it imports torch, and `volssl --help` stays fast)
FORMATS = ("nnunet", "nnssl", "safetensors")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="export a run's network for nnU-Net, nnssl or as a safetensors model folder",
        description="Export the network of RUN (a pre-training or fine-tuning run folder, a checkpoint .pt, an "
                    "exported folder or hf://ORG/NAME[@REVISION]) into the folder OUT. nnunet: "
                    "nnunet_pretrained_weights.pth (for nnUNetv2_train -pretrained_weights) and nnunet_plans.json "
                    "(the plans the weights need, also printed); nnssl: checkpoint_final.pth with its "
                    "nnssl_adaptation_plan and adaptation_plan.json; safetensors: model.safetensors, config.json "
                    "and a README.md model card. nnunet and nnssl take ResEnc U-Nets only.")
    p.add_argument("run", metavar="RUN", help="run folder, checkpoint .pt, exported folder or hf://ORG/NAME[@REV]")
    p.add_argument("out", metavar="OUT", help="output folder (created)")
    p.add_argument("--format", required=True, choices=FORMATS, help="nnunet, nnssl or safetensors")
    p.add_argument("--overwrite", action="store_true", help="replace files of this format already in OUT")
    p.add_argument("--json", action="store_true", help="print what was written as JSON")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from volssl.training.export import describe_result, export_run
    from volssl.util.hub import is_hub_reference, parse_hub_reference

    if is_hub_reference(args.run):
        parse_hub_reference(args.run)  # a malformed address fails before anything is created
    result = export_run(args.run, args.out, args.format, overwrite=args.overwrite)
    if args.json:
        print(json.dumps({"format": result.format, "out": str(result.out), "checkpoint": result.info.where,
                          "kind": result.info.kind, "method": result.info.method, "step": result.info.step,
                          "files": {k: str(v) for k, v in result.files.items()}, "plans": result.plans,
                          "notes": result.notes}, indent=2))
        return 0
    print("\n".join(describe_result(result)))
    return 0
