"""Reports over fine-tuning runs: ``ranking`` (average rank, bootstrapped rank stability; stateless)
and ``report`` (:func:`make_report`: tables, CSVs, plots and report.md from run directories)."""
from volssl.reports.ranking import BootstrapRanks, average_ranks, bootstrap_ranks, dataset_ranks
from volssl.reports.report import find_runs, make_report

__all__ = ["BootstrapRanks", "average_ranks", "bootstrap_ranks", "dataset_ranks", "find_runs", "make_report"]
