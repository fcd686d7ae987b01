"""Exit status of a training command from its run summary (shared by pretrain and finetune)."""
from __future__ import annotations

import sys


def exit_code(summary: dict, command: str) -> int:
    """0 when finished or stopped by SIGTERM/SIGUSR1 (a scheduler re-queues it), 130 after Ctrl-C."""
    if summary["status"] != "stopped":
        return 0
    if summary["signal"] == "SIGINT":
        return 130
    print(f"volssl {command}: stopped by {summary['signal']} at step {summary['step']}; re-queue the same "
          "command with --resume to continue", file=sys.stderr)
    return 0
