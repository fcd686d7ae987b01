"""``volssl report RUN_DIRS... --out DIR``: tables, ranks, rank stability and low-data curves of runs."""
from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="methods x datasets tables, average rank, bootstrapped rank stability, low-data curves",
        description=(
            "Collects fine-tuning runs (directories with run.json and the metrics.json of `volssl "
            "evaluate`; RUN_DIRS may be parents, searched recursively) and writes to --out: results.csv "
            "(one row per run), table.md/.csv (mean Dice and NSD per method and dataset at the full "
            "training set, average, average rank), ranks.csv + rank_stability.png (rank distribution "
            "over bootstrap samples of the test cases), low_data.csv + low_data.png (Dice vs number of "
            "training cases, pre-trained vs scratch) and report.md tying them together."
        ),
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directory, or a folder containing runs")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="bootstrap samples (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--twin", action="append", default=[], metavar="METHOD=TWIN",
                   help="pair METHOD's runs with its from-scratch TWIN's (same folder, dataset, n_train, seed) and "
                        "report the paired Dice difference with a bootstrap 95%% interval (repeatable)")
    p.add_argument("--probe", action="append", default=[], metavar="DIR",
                   help="pre-training run (or folder of runs) whose probe.csv curves to plot (repeatable)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from volssl.reports.report import make_report
    from volssl.util.errors import check_input_path
    from volssl.util.paths import check_output_dir

    if args.bootstrap < 1:
        raise ValueError(f"--bootstrap must be >= 1, got {args.bootstrap}")
    twins = {}
    for item in args.twin:
        method, sep, twin = item.partition("=")
        if not sep or not method.strip() or not twin.strip():
            raise ValueError(f"--twin {item!r}: expected METHOD=TWIN, e.g. s3d=no-fixed")
        twins[method.strip()] = twin.strip()
    for d in args.run_dirs:
        check_input_path(d, "run directory", kind="dir")
    for d in args.probe:
        check_input_path(d, "--probe", kind="dir")
    check_output_dir(args.out, "--out folder")  # before any run is read
    summary = make_report(args.run_dirs, args.out, n_boot=args.bootstrap, seed=args.seed, twins=twins,
                          probe_dirs=args.probe)
    for note in summary["notes"]:
        print(f"volssl report: note: {note}", file=sys.stderr)
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"{summary['runs']} runs, methods: {', '.join(summary['methods'])}; "
          f"datasets: {', '.join(summary['datasets'])}")
    ranks = summary["average_rank"]["dice"]
    if ranks:
        print("average Dice rank: " + ", ".join(f"{m} {r:.2f}" for m, r in sorted(ranks.items(), key=lambda x: x[1])))
    for r in summary["paired"]:
        print(f"{r['method']} - {r['twin']} on {r['dataset']} (n_train {r['n_train']}, {r['n_pairs']} pairs): "
              f"{100 * r['diff']:+.1f} Dice points [{100 * r['ci_low']:+.1f}, {100 * r['ci_high']:+.1f}]")
    print(f"wrote {summary['files']['report.md']}")
    return 0
