"""What the benchmarks share: launching MPI workers, timing, markdown tables, plots, the machine's name.

Each benchmark is one script with two roles. Run plainly (``python benchmarks/memory.py``) it is the
*driver*: it launches itself under ``mpiexec -n N ... --worker`` for each rank count it needs, reads
the numbers the workers print, and writes ``benchmarks/results/<name>.md`` and its plots. The workers
measure and print one JSON line (rank 0). So a reader can run any worker by hand, and the driver alone
needs matplotlib.
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))  # minitp from this checkout where it is not installed (the workers get PYTHONPATH)
from minitp import launcher  # noqa: E402  the one way the tests and the benchmarks find and call mpiexec
RESULT_PREFIX = "BENCH-RESULT "
ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# -- launching workers ------------------------------------------------------------------------------

def launch(script, ranks, args=(), env=None, timeout=1200):
    """Run ``script --worker *args`` on ``ranks`` MPI ranks; return what rank 0 ``report``-ed (a dict).

    The launcher is ``minitp.launcher``'s, as for the tests: $MPIEXEC, else the venv's mpiexec, else
    PATH's, with Open MPI's flags for root and for more ranks than cores, then $MPIEXEC_FLAGS.
    ``env`` adds to this process's environment (e.g. ``ONE_THREAD``), less any parent MPI job's identity.
    A failed worker raises with its output, so a broken benchmark cannot pass for a slow one.
    """
    command = launcher.command(ranks) + [sys.executable, str(script), "--worker", *map(str, args)]
    environment = launcher.environment(env)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), environment.get("PYTHONPATH")]))
    done = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=timeout)
    lines = [line[len(RESULT_PREFIX):] for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(command)} failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
    return json.loads(lines[-1])


def report(result):
    """Called by a worker's rank 0: hand ``result`` (JSON-able) to the driver."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# -- timing -----------------------------------------------------------------------------------------

def best_time(step, repeats, warmup=1, synchronize=None):
    """The fastest of ``repeats`` runs of ``step()`` in seconds, after ``warmup`` untimed runs.

    The minimum, not the mean: on a shared machine every disturbance only adds time, so the fastest run
    is the best estimate of what the code itself costs. ``synchronize`` (e.g. a GPU sync, or an MPI
    barrier) runs before each clock read.
    """
    sync = synchronize or (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def interleaved_best(steps, repeats, warmup=1, synchronize=None):
    """{name: fastest time} for several ``steps`` ({name: function}), timed round-robin.

    On a shared machine the load changes from second to second; timing A five times and then B five
    times can compare a quiet minute with a busy one. Taking turns gives every step the same weather,
    so their ratios stay meaningful even when the absolute times drift.
    """
    sync = synchronize or (lambda: None)
    for step in steps.values():
        for _ in range(warmup):
            step()
    sync()
    best = {name: float("inf") for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            sync()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


# -- output -----------------------------------------------------------------------------------------

def table(header, rows, align=None):
    """A markdown table; numbers right-aligned unless ``align`` (a string of 'l'/'r' per column) says."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def machine(timings=True):
    """One line naming where the numbers came from: date, CPU, cores, BLAS, and for ``timings`` the load
    average at the start (other work on a shared machine slows every timing)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    blas = "BLAS unknown"
    try:
        from threadpoolctl import threadpool_info
        pools = [p for p in threadpool_info() if p["user_api"] == "blas"]
        if pools:
            blas = f"{pools[0]['internal_api']} {pools[0]['version']} ({pools[0].get('architecture', '?')} kernels)"
    except ImportError:
        pass
    import numpy
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ""
    if timings and hasattr(os, "getloadavg"):
        load = f", load average {os.getloadavg()[0]:.2f} at the start (other work on the machine slows timings)"
    # whether glibc keeps freed memory (minitp.allocator, on by default) changes timings by 10-30%
    malloc = ""
    if timings:
        from minitp import allocator
        malloc = ", freed memory kept (minitp.allocator)" if allocator.KEPT else ", glibc's default allocator"
    return (f"{datetime.date.today().isoformat()}, {cpu}, {cores} cores{load}, Python {platform.python_version()}, "
            f"numpy {numpy.__version__}, {blas}{malloc}")


def output_dir(path=None):
    directory = Path(path) if path else RESULTS
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def write(directory, name, text):
    """Write ``text`` to ``directory/name`` and say so."""
    path = Path(directory) / name
    path.write_text(text if text.endswith("\n") else text + "\n")
    print(f"wrote {path}")
    return path


def publish(out, name, render):
    """The end of every driver: ``render(directory)`` (the report's text; plots saved beside it) written
    to ``directory/name`` -- ``out``, else benchmarks/results -- and printed."""
    directory = output_dir(out)
    text = render(directory)
    write(directory, name, text)
    print(text)


def pyplot():
    """matplotlib's pyplot with a file-only backend, or None (plots skipped, with a note) if missing."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: plots skipped (pip install matplotlib, or the [bench] extra)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def ms(seconds):
    """Seconds as milliseconds, one decimal: ``ms(0.0123) == "12.3"``."""
    return f"{1e3 * seconds:,.1f}"


def rate(value):
    """A rate in units of 10^9, one decimal and a "G" to put before the unit: ``rate(2.5e10) == "25.0 G"``."""
    return f"{value / 1e9:,.1f} G"


def human_bytes(value):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.2f} {unit}"
        value /= 1024


def main_for_exact_counts(script, description, worker, render, report):
    """The command line shared by the benches that count bytes (memory.py, comm.py): parse the options,
    and either be one of the MPI workers (``--worker``) or launch them at the largest t, render what
    they measured into ``report`` (``render(data, directory)``) and print it.

    Counts, not timings: the workers run with one BLAS thread and the numbers are the same on any machine.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 ranks: a smoke test in seconds")
    parser.add_argument("--ranks", type=int, help="world size of the worker launch (default: the largest t)")
    parser.add_argument("--tp", type=int, nargs="+", help="tensor-parallel sizes (default 1 2 4; 1 2 with --quick)")
    parser.add_argument("--out", help=f"directory for {report} (default benchmarks/results)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.tp = args.tp or ([1, 2] if args.quick else [1, 2, 4])
    if args.worker:
        worker(args)
        return
    extra = ["--quick"] if args.quick else []
    data = launch(script, args.ranks or max(args.tp), extra + ["--tp", *args.tp], env=ONE_THREAD)
    publish(args.out, report, lambda directory: render(data, directory))
