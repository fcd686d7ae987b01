"""Cluster launchers: the benchmark's cells, the search's trials and pre-training runs as submitit jobs.

``--launcher local`` runs each item as a job of submitit's ``LocalExecutor`` (a subprocess of this
machine, with its own log files under the launcher folder); ``--launcher slurm`` as one SLURM job
(``sbatch``) with its resources. Without ``--launcher`` the commands keep their own process pool and
never import this module's submitit side. The interface every command uses:

* :class:`LaunchSpec`: the launcher and what each job gets (partition, nodes, tasks, GPUs, CPUs, memory,
  time limit, setup lines, extra sbatch parameters, submitit's folder, how many jobs at once);
  :func:`executor_parameters` turns it into submitit's parameters, :func:`check_launcher` refuses a
  launcher that cannot run here (``slurm`` without ``sbatch``) in one line.
* :func:`map_jobs`: ``fn(job)`` for every job dict, each one submitit job, results in job order; a job
  that fails (``fn`` raised, the job was killed, cancelled or timed out too often) gives
  ``on_failure(job, why)`` in its place, and the other jobs go on.
* :class:`PretrainJob` and :func:`submit`: one pre-training run as a (multi-node, multi-GPU) job whose
  tasks are the data-parallel ranks; torchrun's variables come from submitit's ``JobEnvironment``.

Requeue. submitit has SLURM send ``SIGUSR2`` ``signal_delay_s`` before the time limit (and on
preemption); every callable here is checkpointable, so the job is requeued instead of lost, up to
``max_requeues`` timeouts. While a training loop runs, the signal is first turned into the loop's own
graceful stop (:class:`volssl.training.loop` saves ``latest.pt`` after the current step), then submitit
checkpoints and requeues; the rerun resumes (fine-tuning runs always resume; :class:`PretrainJob` calls
``pretrain(..., resume=True)``), so nothing but the interrupted step is redone. Outside a training loop
(prediction, evaluation) the job is requeued at once and redoes that part.

Keep this module free of torch and submitit at import time: the command modules import it to build
their parsers.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

#: the launchers of the command line; "debug" (submitit's DebugExecutor: in this process) is for tests
LAUNCHERS = ("local", "slurm")
KINDS = (*LAUNCHERS, "debug")
#: seconds between SLURM's warning signal and the time limit (the step in flight and a checkpoint fit)
SIGNAL_DELAY_S = 120


class LauncherUnavailable(ValueError):
    """The launcher asked for cannot run here (``--launcher slurm`` where ``sbatch`` is missing), or its
    first submission was refused (a bad partition, account, ...)."""


@dataclass(frozen=True)
class LaunchSpec:
    """Where and with what each job runs.

    Attributes:
        kind: "local" (submitit's LocalExecutor, subprocesses of this machine), "slurm" or "debug" (in this
            process; an exception opens pdb there, so tests only give it functions that do not raise).
        folder: submitit's folder (pickles, ``<job>_log.out`` / ``.err``); on SLURM it must be on a file
            system the nodes share.
        name: the jobs' name (``squeue``).
        partition: SLURM partition (None: the cluster's default).
        nodes, tasks_per_node: a job's nodes and tasks (processes) per node; a cell or trial is one task.
        gpus_per_node, cpus_per_task: GPUs per node, CPUs per task.
        mem_gb: memory per node in GB (None: the partition's default).
        time_min: time limit of one job (a requeued job gets it again).
        setup: shell lines run before the job starts (``module load ...``, ``source venv/bin/activate``).
        slurm_params: extra sbatch parameters as (key, value) pairs (``("account", "abc")``; value True: a
            flag such as ``exclusive``).
        max_parallel: jobs submitted at once (None: all).
        max_requeues: timeouts after which a job is not requeued again (preemptions do not count).
        poll_s: seconds between two looks at the running jobs.
    """

    kind: str
    folder: str
    name: str = "volssl"
    partition: str | None = None
    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem_gb: float | None = None
    time_min: int = 240
    setup: tuple[str, ...] = ()
    slurm_params: tuple[tuple[str, Any], ...] = ()
    max_parallel: int | None = None
    max_requeues: int = 3
    poll_s: float = 2.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown launcher {self.kind!r}; choose one of {', '.join(LAUNCHERS)}")
        if not str(self.folder).strip():
            raise ValueError("the launcher folder (--launcher-dir) must not be empty")
        for what, value in (("nodes", self.nodes), ("tasks per node", self.tasks_per_node),
                            ("CPUs per task", self.cpus_per_task), ("time limit (minutes)", self.time_min)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"launcher {what} must be a whole number >= 1, got {value!r}")
        if not isinstance(self.gpus_per_node, int) or self.gpus_per_node < 0:
            raise ValueError(f"launcher GPUs must be a whole number >= 0, got {self.gpus_per_node!r}")
        if self.mem_gb is not None and not self.mem_gb > 0:
            raise ValueError(f"launcher memory must be a positive number of GB, got {self.mem_gb!r}")
        if self.max_parallel is not None and self.max_parallel < 1:
            raise ValueError(f"jobs at once must be >= 1, got {self.max_parallel!r}")
        if self.max_requeues < 0 or self.poll_s <= 0:
            raise ValueError("max_requeues must be >= 0 and poll_s > 0")
        if self.kind != "slurm" and self.nodes > 1:
            raise ValueError(f"--launcher {self.kind} runs on this machine: one node, not {self.nodes} "
                             "(use --launcher slurm for several nodes)")
        for key, _ in self.slurm_params:
            if not key or not str(key).strip():
                raise ValueError("an extra SLURM parameter needs a name (KEY=VALUE)")


def parse_slurm_params(items: Sequence[str]) -> tuple[tuple[str, Any], ...]:
    """``["account=abc", "--qos=high", "exclusive"]`` -> ``(("account", "abc"), ("qos", "high"),
    ("exclusive", True))``: extra sbatch parameters (a bare name is a flag)."""
    out = []
    for item in items:
        key, eq, value = str(item).partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not key:
            raise ValueError(f"--slurm-param {item!r}: expected KEY=VALUE (e.g. account=abc) or a flag name")
        out.append((key, value.strip() if eq else True))
    return tuple(out)


def check_launcher(spec: LaunchSpec) -> None:
    """Raise :class:`LauncherUnavailable` (one line) when ``spec`` cannot run here: ``slurm`` needs
    ``sbatch`` (submitting) and ``srun`` (starting the tasks) on PATH."""
    if spec.kind != "slurm":
        return
    missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
    if missing:
        raise LauncherUnavailable(
            f"--launcher slurm: {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not on PATH, so this "
            "machine cannot submit SLURM jobs; run the command on a SLURM login node (or load the slurm module), "
            "or use --launcher local")


def executor_parameters(spec: LaunchSpec) -> dict[str, Any]:
    """submitit's ``update_parameters`` keywords for ``spec`` (generic names, ``slurm_*`` for SLURM only)."""
    params: dict[str, Any] = {"name": spec.name, "timeout_min": spec.time_min, "nodes": spec.nodes,
                              "tasks_per_node": spec.tasks_per_node, "gpus_per_node": spec.gpus_per_node,
                              "cpus_per_task": spec.cpus_per_task}
    if spec.mem_gb is not None:
        params["mem_gb"] = spec.mem_gb
    if spec.kind == "slurm":
        params["slurm_signal_delay_s"] = SIGNAL_DELAY_S
        if spec.partition:
            params["slurm_partition"] = spec.partition
        if spec.setup:
            params["slurm_setup"] = list(spec.setup)
        if spec.slurm_params:
            params["slurm_additional_parameters"] = dict(spec.slurm_params)
    return params


def make_executor(spec: LaunchSpec) -> Any:
    """A submitit ``AutoExecutor`` for ``spec`` (checked with :func:`check_launcher`), its parameters set."""
    check_launcher(spec)
    import submitit

    extra = {f"{spec.kind}_max_num_timeout": spec.max_requeues} if spec.kind in LAUNCHERS else {}
    Path(spec.folder).mkdir(parents=True, exist_ok=True)
    executor = submitit.AutoExecutor(folder=spec.folder, cluster=spec.kind, **extra)
    executor.update_parameters(**executor_parameters(spec))
    return executor


# ------------------------------------------------------------------------------------------ running jobs
class Requeueable:
    """``fn`` as a checkpointable submitit callable: a timeout or preemption requeues the same call
    (cells and trials resume their run folder), after a training loop in flight saved its state."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with graceful_requeue():
            return self.fn(*args, **kwargs)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's hook on a timeout / preemption: the same call, to be requeued."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(type(self)(self.fn), *args, **kwargs)


def _preempt_signal() -> signal.Signals:
    """The signal submitit asks SLURM for before a time limit / on preemption (``SIGUSR2`` by default)."""
    from submitit import JobEnvironment

    return signal.Signals[f"SIG{JobEnvironment.USR_SIG}"]


@contextmanager
def graceful_requeue() -> Iterator[dict[str, Any]]:
    """Inside a submitit job: submitit's requeue signal first stops a running training loop gracefully.

    The loop (``volssl.training.loop``) stops on ``SIGUSR1`` after the current step and saves ``latest.pt``;
    when the requeue signal arrives while it runs (its handler is installed), that handler is called and the
    requeue (submitit's own handler: ``checkpoint()``, requeue, exit) happens once the body returns. With no
    loop running, submitit's handler runs at once. Outside a job (no handler of submitit's) nothing changes.
    Yields ``{"signal": None | name}``.
    """
    state: dict[str, Any] = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield state
        return
    sig = _preempt_signal()
    submitit_handler = signal.getsignal(sig)
    if not callable(submitit_handler):
        yield state
        return

    def handler(signum: int, frame: Any) -> None:
        loop_handler = signal.getsignal(signal.SIGUSR1)
        if callable(loop_handler) and state["signal"] is None:
            state["signal"] = signal.Signals(signum).name
            loop_handler(signal.SIGUSR1, frame)  # the loop saves latest.pt after this step and returns
        else:
            submitit_handler(signum, frame)  # nothing to save: checkpoint and requeue now

    signal.signal(sig, handler)
    try:
        yield state
    finally:
        signal.signal(sig, submitit_handler)
        if state["signal"] is not None:
            print(f"[volssl launch] {state['signal']}: state saved; requeueing the job", file=sys.stderr, flush=True)
            submitit_handler(sig, None)  # task 0: checkpoint() + requeue + exit; other tasks return


def map_jobs(fn: Callable[[dict[str, Any]], Any], jobs: Sequence[dict[str, Any]], spec: LaunchSpec,
             on_failure: Callable[[dict[str, Any], str], Any], on_done: Callable[[Any], Any] | None = None,
             poll: Callable[[], None] | None = None) -> list[Any]:
    """``fn(job)`` for every job as one submitit job each, at most ``spec.max_parallel`` at a time; the
    results in the order of ``jobs``.

    ``fn`` must be picklable (a module-level function); ``on_failure(job, why)`` stands in for the result
    of a job that failed (``fn`` raised; the job was killed, cancelled or timed out ``max_requeues``
    times), ``on_done(result)`` is called as each job ends (progress lines), ``poll()`` every
    ``spec.poll_s`` while jobs run (a heartbeat). A refused first submission raises
    :class:`LauncherUnavailable`; a later one fails that job only. When this process is interrupted
    (Ctrl-C, SIGTERM, SIGHUP) its running jobs are cancelled: a rerun resubmits them, and they resume.
    """
    jobs = list(jobs)
    if not jobs:
        return []
    executor = make_executor(spec)
    task = Requeueable(fn)
    results: list[Any] = [None] * len(jobs)
    waiting = list(range(len(jobs)))[::-1]
    running: dict[int, Any] = {}
    limit = spec.max_parallel or len(jobs)
    submitted = 0
    with _cancel_on_stop(running):
        while waiting or running:
            while waiting and len(running) < limit:
                i = waiting.pop()
                try:
                    running[i] = executor.submit(task, jobs[i])
                except Exception as e:  # noqa: BLE001 - sbatch refused it
                    why = _one_line(e)
                    if not submitted:
                        raise LauncherUnavailable(f"--launcher {spec.kind}: the first job was not submitted: "
                                                  f"{why}") from None
                    results[i] = _finish(on_failure(jobs[i], f"submission failed: {why}"), on_done)
                    continue
                submitted += 1
            ended = [i for i, job in running.items() if job.done()]
            for i in ended:
                results[i] = _finish(_outcome(running.pop(i), jobs[i], on_failure), on_done)
            if running and not ended:
                if poll is not None:
                    poll()
                time.sleep(spec.poll_s)
    return results


def _finish(result: Any, on_done: Callable[[Any], Any] | None) -> Any:
    if on_done is not None:
        on_done(result)
    return result


def _outcome(job: Any, item: dict[str, Any], on_failure: Callable[[dict[str, Any], str], Any]) -> Any:
    """The result of an ended submitit ``job``, or ``on_failure(item, why)``."""
    try:
        results = job.results()
    except Exception as e:  # noqa: BLE001 - FailedJobError / UncompletedJobError: this job only
        return on_failure(item, job_failure(e, job))
    return results[0]


def job_failure(e: BaseException, job: Any = None) -> str:
    """One line on why a submitit job failed: the exception its function raised (the last line of the
    trace submitit reports) or the job's end (killed, timed out, cancelled), and where its logs are."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if lines and "with trace:" in lines[0]:  # FailedJobError: the trace between two rules of dashes
        trace = [ln for ln in lines[1:] if not set(ln) <= {"-"}]
        end = next((k for k, ln in enumerate(trace) if ln.startswith("You can check full logs")), len(trace))
        why = trace[end - 1] if end else lines[0]
    else:  # UncompletedJobError: "Job ... has not produced any output (state: ...)", then the logs
        head = []
        for ln in lines:
            if ln.startswith(("Error stream produced", "No error stream")) or set(ln) <= {"-"}:
                break
            head.append(ln)
        why = " ".join(head) or type(e).__name__
    if job is not None:
        try:
            where = job.paths.stderr
        except Exception:  # noqa: BLE001 - a job without files (debug)
            where = None
        why += f" (job {job.job_id}" + (f", log {where}" if where else "") + ")"
    return why


def _one_line(e: BaseException) -> str:
    return " ".join(ln.strip() for ln in str(e).splitlines() if ln.strip()) or type(e).__name__


@contextmanager
def _cancel_on_stop(running: dict[int, Any]) -> Iterator[None]:
    """Cancel the ``running`` jobs when the block ends by an exception; SIGTERM / SIGHUP end it like Ctrl-C."""
    old: dict[int, Any] = {}

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if sig is not None:
                old[sig] = signal.signal(sig, stop)
    try:
        yield
    except BaseException:
        for job in list(running.values()):
            try:
                job.cancel(check=False)
            except Exception:  # noqa: BLE001 - cancelling is best effort
                pass
        if running:
            print(f"[volssl launch] cancelled {len(running)} running job(s); rerun the command to resume them",
                  file=sys.stderr, flush=True)
        raise
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


# ------------------------------------------------------------------------------------------ pre-training
def master_port(job_id: str) -> int:
    """A port in [20000, 40000) that is a pure function of the job id (the same on every task and node)."""
    return 20000 + int(hashlib.sha1(str(job_id).encode()).hexdigest(), 16) % 20000


def torch_environment(job_env: Any) -> dict[str, str]:
    """torchrun's variables for this task of a submitit job (``job_env``: ``submitit.JobEnvironment()``):
    RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE from its ranks, MASTER_ADDR (the first node; 127.0.0.1
    on one node) and MASTER_PORT (``$MASTER_PORT`` if set, else :func:`master_port` of the job id)."""
    nodes = max(int(job_env.num_nodes), 1)
    tasks = int(job_env.num_tasks)
    return {"RANK": str(job_env.global_rank), "WORLD_SIZE": str(tasks), "LOCAL_RANK": str(job_env.local_rank),
            "LOCAL_WORLD_SIZE": str(max(tasks // nodes, 1)),
            "MASTER_ADDR": "127.0.0.1" if nodes == 1 else str(job_env.hostnames[0]),
            "MASTER_PORT": os.environ.get("MASTER_PORT") or str(master_port(job_env.job_id))}


class PretrainJob:
    """One ``volssl pretrain`` run as a submitit job; each task of the job is one data-parallel rank.

    ``__call__`` sets torchrun's variables from ``submitit.JobEnvironment`` (:func:`torch_environment`) and
    runs ``pretrain(cfg, data, out, resume=True)``: a fresh folder starts a new run, a requeued job continues
    from ``latest.pt`` (whoever submits checks or clears the folder first: ``volssl pretrain --launcher``
    refuses a folder holding a run without ``--resume`` / ``--overwrite``). ``checkpoint()`` is submitit's
    hook on a timeout or preemption: a ``DelayedSubmission`` of the same run, requeued. Returns the
    trainer's summary (task 0's is the job's result).
    """

    def __init__(self, cfg: Any, data: str | os.PathLike, out: str | os.PathLike, progress: bool = False) -> None:
        self.cfg = cfg
        self.data = str(data)
        self.out = str(out)
        self.progress = progress

    def __call__(self) -> dict[str, Any]:
        import submitit

        os.environ.update(torch_environment(submitit.JobEnvironment()))
        from volssl.training import distributed
        from volssl.training.trainer import pretrain

        try:
            with graceful_requeue():
                return pretrain(self.cfg, self.data, self.out, resume=True, progress=self.progress)
        finally:
            distributed.cleanup()

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """The same run as a ``DelayedSubmission`` (it resumes from the run's newest checkpoint)."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(type(self)(self.cfg, self.data, self.out, self.progress), *args, **kwargs)


def submit(spec: LaunchSpec, fn: Callable[..., Any], *args: Any) -> Any:
    """Submit one job ``fn(*args)`` (e.g. a :class:`PretrainJob`); returns the submitit job."""
    executor = make_executor(spec)
    try:
        return executor.submit(fn, *args)
    except Exception as e:  # noqa: BLE001 - sbatch refused it: one line
        raise LauncherUnavailable(f"--launcher {spec.kind}: the job was not submitted: {_one_line(e)}") from None


class JobFailed(ValueError):
    """A launched job ended without a result (its function raised, or it was killed, cancelled or timed out
    too often): one line naming the job and its log, where the job's own traceback is."""


def wait(job: Any, spec: LaunchSpec) -> Any:
    """Wait for one submitted ``job`` (cancelled if this process is interrupted); task 0's result, or
    :class:`JobFailed`."""
    running = {0: job}
    with _cancel_on_stop(running):
        while not job.done():
            time.sleep(spec.poll_s)
        running.clear()
    try:
        return job.results()[0]
    except Exception as e:  # noqa: BLE001 - FailedJobError / UncompletedJobError
        raise JobFailed(f"the {spec.kind} job failed: {job_failure(e, job)}") from None


def log_paths(job: Any) -> str:
    """``stdout`` / ``stderr`` files of a submitted job (task 0), for the user."""
    try:
        return f"{job.paths.stdout} / {job.paths.stderr}"
    except Exception:  # noqa: BLE001 - the debug executor has none worth showing
        return "(in this process)"
