"""Test setup shared by every test file.

Three ways to run the suite, all supported:

- ``pytest``: serial tests run here; each ``@pytest.mark.parallel(nprocs=...)`` test is relaunched by
  mpi-pytest under ``mpiexec -n N`` (simple, slower: one launch per test).
- ``mpiexec -n N python -m pytest -m "parallel[N]"``: every N-rank test in one launch (what ``make test``
  does for N = 2, 3, 4).
- ``mpirun -n N python -m pytest`` with no marker: mpi-pytest alone would stop with a UsageError at the
  first test written for another rank count, so we skip those here, with the reason.

Every launch the tests make (mpi-pytest's, the tutorials', test_dist's, the benchmarks') uses the launcher
that ``minitp.launcher`` finds. Two ways a system MPI can fail are caught here and named, instead of
failing every parallel test obscurely: Open MPI before 5.0.7 under plain ``pytest`` (a singleton cannot
start ``mpiexec``), and an mpi4py built against another MPI than the launcher's (every rank alone).
"""
import os
import shlex
import sys
from pathlib import Path

import pytest
from mpi4py import MPI

STANDIN = Path(__file__).resolve().parent / "cupy_standin"


def _cupy_or_the_standin():
    """The GPU half of the suite runs everywhere: on real CuPy where it has a GPU, else on the strict
    stand-in in tests/cupy_standin (numpy behind CuPy's rules), put first on ``sys.path`` here and on
    ``PYTHONPATH`` for the tutorials and ranks the tests launch. ``MINITP_NO_CUPY_STANDIN=1``: skip the
    GPU half instead, as without a GPU before."""
    if os.environ.get("MINITP_NO_CUPY_STANDIN") == "1":
        return
    try:
        import cupy
        if Path(cupy.__file__).resolve().is_relative_to(STANDIN) or cupy.cuda.runtime.getDeviceCount() > 0:
            return  # the stand-in already (a launched process), or a GPU
    except Exception:  # no CuPy, or CuPy without a driver or a device
        pass
    for name in [name for name in sys.modules if name.split(".")[0] in ("cupy", "cupyx")]:
        del sys.modules[name]
    sys.path.insert(0, str(STANDIN))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(STANDIN), os.environ.get("PYTHONPATH")]))


_cupy_or_the_standin()  # before minitp: MINITP_DEVICE=gpu makes it import CuPy at once

from minitp import backend, comm, launcher  # noqa: E402

CHILD = "_PYTEST_MPI_CHILD_PROCESS"  # set by mpi-pytest in the processes it launches

# Checked mode (minitp.comm.checks): every collective first verifies that the ranks agree on its shape and
# dtype, and a sequence-parallel layer that every rank feeds the same array says so. On for the whole
# suite, and for the tutorials and scripts it launches (they inherit the environment).
os.environ["MINITP_CHECKED"] = "1"
comm.set_checked(True)

# mpi-pytest launches `mpiexec` from PATH: make it minitp.launcher's ($MPIEXEC, else the venv's MPICH beside
# this Python, else PATH's), so that plain `.venv/bin/python -m pytest` works without activating the venv.
_MPIEXEC = launcher.mpiexec()
os.environ["PATH"] = os.pathsep.join(filter(None, [str(Path(_MPIEXEC).parent) if _MPIEXEC else None,
                                                   str(Path(sys.executable).parent), os.environ.get("PATH")]))



def _library():
    """The MPI library mpi4py loaded, in one line (Open MPI's ends in a NUL)."""
    return MPI.Get_library_version().replace("\0", "").splitlines()[0].strip()


def _run_instead():
    command = shlex.join(launcher.command()) if _MPIEXEC else "mpiexec"
    return (f"run `tests/run-mpi 2 3 4` (what `make test` does), or for each N "
            f"`{command} -n N {sys.executable} -m pytest -m 'parallel[N]'`")


def _singleton_cannot_launch():
    """Why plain `pytest` cannot start the parallel tests here, or None.

    mpi-pytest runs each N-rank test under a nested `mpiexec`, started from this process, which MPI
    initialised as a singleton. Open MPI before 5.0.7 cannot do that: the singleton leaves its own job's
    variables in the environment, and the nested mpiexec exits 1 without a word
    (github.com/open-mpi/ompi/issues/7164, python/cpython#132377, fixed in Open MPI 5.0.7)."""
    if MPI.COMM_WORLD.size != 1 or CHILD in os.environ:
        return None
    name, version = MPI.get_vendor()
    if name == "Open MPI" and tuple(version) < (5, 0, 7):
        return (f"Open MPI {'.'.join(map(str, version))} cannot start `mpiexec` from a process that is already "
                f"an MPI singleton (plain `pytest`); fixed in Open MPI 5.0.7: {_run_instead()}")
    return None


def pytest_configure(config):
    # The launcher started n ranks but MPI sees one: mpi4py speaks another MPI than the launcher (e.g. a
    # cached mpi4py wheel built against Open MPI, run by MPICH's mpiexec), and every rank runs alone.
    launched = os.environ.get("OMPI_COMM_WORLD_SIZE") or os.environ.get("PMI_SIZE")
    if launched and int(launched) > 1 and MPI.COMM_WORLD.size == 1:
        raise pytest.UsageError(
            f"the launcher started {launched} ranks, but MPI sees 1: mpi4py is built against "
            f"{_library()!r}, not the MPI of {_MPIEXEC}. Rebuild it "
            f"against your mpicc without pip's cache: {sys.executable} -m pip install --force-reinstall "
            f"--no-cache-dir --no-binary mpi4py mpi4py (or: make clean test MPI=system)")


def pytest_report_header(config):
    lines = [f"MPI: {_library()}; launcher: "
             f"{' '.join(launcher.command()) if _MPIEXEC else 'none found'}"]
    reason = _singleton_cannot_launch()
    return lines + ([f"the tests for 2 or more ranks skip: {reason}"] if reason else [])


_cannot_launch = []  # the tests skipped for _singleton_cannot_launch()


def pytest_terminal_summary(terminalreporter):
    if _cannot_launch:
        terminalreporter.write_line(f"{len(_cannot_launch)} tests for 2 or more ranks skipped: "
                                    f"{_singleton_cannot_launch()}", yellow=True)


def _nprocs(item):
    if hasattr(item, "callspec") and "_nprocs" in item.callspec.params:
        return item.callspec.params["_nprocs"]
    marker = item.get_closest_marker("parallel")
    if marker is None:
        return 1
    n = marker.kwargs.get("nprocs", marker.args[0] if marker.args else 3)
    return n if isinstance(n, int) else tuple(n)[0]


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    size = MPI.COMM_WORLD.size
    reason = _singleton_cannot_launch()
    if reason:
        for item in items:
            if _nprocs(item) > 1:
                item.add_marker(pytest.mark.skip(reason=reason))
                _cannot_launch.append(item.nodeid)
    if size == 1 or CHILD in os.environ:
        return
    counts = set()
    for item in items:
        n = _nprocs(item)
        counts.add(n)
        if n != size:
            item.add_marker(pytest.mark.skip(
                reason=f"written for {n} rank(s), this run has {size}: use plain `pytest` or "
                       f"`mpiexec -n {n} python -m pytest -m 'parallel[{n}]'`"))
    if items and size not in counts:
        config._minitp_nothing_for = (size, sorted(counts))


def pytest_sessionfinish(session, exitstatus):
    """``mpiexec -n N pytest`` for an N no test is written for ran nothing: say so and fail (status 5,
    pytest's "no tests ran"), instead of reporting every test skipped and exiting 0."""
    nothing = getattr(session.config, "_minitp_nothing_for", None)
    if nothing is not None:
        size, counts = nothing
        if MPI.COMM_WORLD.Get_rank() == 0:
            print(f"\nno test is written for {size} ranks, so none ran: the tests run on {counts} ranks "
                  f"(e.g. mpiexec -n {counts[-1]} python -m pytest -m 'parallel[{counts[-1]}]', or `make test`)",
                  file=sys.stderr)
        session.exitstatus = 5


@pytest.fixture(params=["cpu", "gpu"])
def device(request):
    """Run the test once per backend: numpy, then CuPy -- on a GPU, or else on the CuPy stand-in
    (skipped, with the reason, when neither is there)."""
    if request.param == "gpu":
        reason = backend.gpu_unavailable_reason()
        if reason:
            pytest.skip(reason)
    previous = backend.device()
    backend.use(request.param)
    yield request.param
    backend.use(previous)
