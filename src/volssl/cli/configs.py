"""``volssl presets`` and ``volssl config show NAME``."""
from __future__ import annotations

import argparse
import json


def add_set_argument(parser: argparse.ArgumentParser) -> None:
    """The shared ``--set key=value`` option (repeatable)."""
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a configuration field, e.g. --set optim.lr=3e-3 --set data.patch_size=96,96,96",
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("presets", help="list the named presets")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_presets)

    c = sub.add_parser("config", help="show the resolved configuration of a preset")
    csub = c.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    s = csub.add_parser("show", help="print the complete configuration of preset NAME")
    s.add_argument("name")
    s.add_argument("--json", action="store_true", help="print JSON (default: JSON too)")
    add_set_argument(s)
    s.set_defaults(func=_show)


def _presets(args: argparse.Namespace) -> int:
    from volssl.config import get_preset, list_presets

    rows = []
    for name in list_presets():
        cfg = get_preset(name)
        rows.append({"name": name, "method": cfg.method.name, "arch": cfg.model.arch,
                     "patch": list(cfg.data.patch_size), "batch": cfg.data.batch_size,
                     "steps": cfg.train.steps, "description": cfg.description})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        patch = "x".join(map(str, r["patch"]))
        print(f"{r['name']:<{width}}  {r['method']:<8} {r['arch']:<14} patch {patch:<11} batch {r['batch']:<3} "
              f"steps {r['steps']:<8}  {r['description']}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from volssl.config import config_to_dict, resolve

    cfg = resolve(args.name, args.overrides)
    print(json.dumps(config_to_dict(cfg), indent=2))
    return 0
