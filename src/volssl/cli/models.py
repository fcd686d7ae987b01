"""``volssl models`` (architectures and parameter counts) and ``volssl import-checkpoint``."""
from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the network architectures with their parameter counts")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.add_argument("--in-channels", type=int, default=1, help="input channels to count for (default 1)")
    p.add_argument("--out-channels", type=int, default=1, help="output channels to count for (default 1)")
    p.set_defaults(func=_models)

    p = sub.add_parser("import-checkpoint", help="convert published weights into a volssl checkpoint",
                       description="Convert weights published by another framework into a volssl checkpoint "
                                   "(kind 'import') that fine-tuning accepts. Files are read with "
                                   "torch.load(weights_only=True): they cannot run code.")
    from volssl.models.import_formats import IMPORT_FORMATS

    p.add_argument("--format", required=True, choices=sorted(IMPORT_FORMATS),
                   help="source format: " + "; ".join(f"{k} ({v[1]})" for k, v in sorted(IMPORT_FORMATS.items())))
    p.add_argument("src", help="source checkpoint file")
    p.add_argument("dst", help="volssl checkpoint to write (.pt)")
    p.add_argument("--arch", default=None,
                   help="architecture when the file does not say (nnssl: no nnssl_adaptation_plan; default: "
                        "the format's usual one)")
    p.add_argument("--json", action="store_true", help="print the import report as JSON")
    p.set_defaults(func=_import)


def _models(args: argparse.Namespace) -> int:
    from volssl.models.registry import describe_architectures

    rows = describe_architectures(args.in_channels, args.out_channels)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<12} {'params':>12} {'paper':>10}  description")
    for r in rows:
        paper = f"{r['params_paper'] / 1e6:.1f}M" if r["params_paper"] else "-"
        print(f"{r['name']:<12} {r['params'] / 1e6:>11.2f}M {paper:>10}  {r['description']}")
    return 0


def _import(args: argparse.Namespace) -> int:
    from volssl.models.import_formats import convert_checkpoint
    from volssl.training.checkpoint import save_checkpoint

    payload, report = convert_checkpoint(args.format, args.src, args.arch)
    save_checkpoint(args.dst, **payload)
    if args.json:
        print(json.dumps({"dst": str(args.dst), "model": payload["model"], **vars(report)}))
    else:
        print(f"{args.src} -> {args.dst}: {report.summary()}")
        print(f"architecture: {payload['model']}")
    return 0
