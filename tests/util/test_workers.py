"""util/workers.watched_pool: a pool's workers exit when the main process is killed (kill -9), as the
benchmark's and the demo's cells must (a killed benchmark once left its cells running and writing)."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

MAIN = textwrap.dedent("""
    import multiprocessing, os, sys, time
    from volssl.util.workers import watched_pool

    def pid_then_sleep(_):
        print(os.getpid(), flush=True)
        time.sleep(120)

    if __name__ == "__main__":
        with watched_pool(1, multiprocessing.get_context("spawn")) as pool:
            pool.submit(pid_then_sleep, 0)
            time.sleep(120)
""")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_pool_workers_exit_when_the_main_process_is_killed(tmp_path):
    script = tmp_path / "main.py"
    script.write_text(MAIN)
    main = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        worker = int(main.stdout.readline())
        assert _alive(worker)
        os.kill(main.pid, signal.SIGKILL)
        main.wait(timeout=10)
        deadline = time.time() + 15
        while _alive(worker) and time.time() < deadline:
            time.sleep(0.2)
        assert not _alive(worker), "the pool worker outlived the killed main process"
    finally:
        if main.poll() is None:
            main.kill()
