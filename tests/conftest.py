"""Test setup shared by every test file.

Three ways to run the suite, all supported:

- ``pytest``: serial tests run here; each ``@pytest.mark.parallel(nprocs=...)`` test is relaunched by
  mpi-pytest under ``mpiexec -n N`` (simple, slower: one launch per test).
- ``mpiexec -n N python -m pytest -m "parallel[N]"``: every N-rank test in one launch (what ``make test``
  does for N = 2, 3, 4).
- ``mpirun -n N python -m pytest`` with no marker: mpi-pytest alone would stop with a UsageError at the
  first test written for another rank count, so we skip those here, with the reason.
"""
import os
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

from minitp import backend, dist  # noqa: E402

CHILD = "_PYTEST_MPI_CHILD_PROCESS"  # set by mpi-pytest in the processes it launches

# Checked mode (minitp.dist.checks): every collective first verifies that the ranks agree on its shape and
# dtype, and a sequence-parallel layer that every rank feeds the same array says so. On for the whole
# suite, and for the tutorials and scripts it launches (they inherit the environment).
os.environ["MINITP_CHECKED"] = "1"
dist.set_checked(True)

# mpi-pytest launches `mpiexec` from PATH: make it the one beside this Python (the venv's MPICH), so that
# plain `.venv/bin/python -m pytest` works without activating the venv.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


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
