"""minitp.comm: the mesh, each collective against numpy, the collective log, and abort on exception.

Every rank r holds ``rank_array(r, ...)``, which every rank can also compute, so each rank builds the
expected result of a collective with plain numpy from all the ranks' data.
"""
import subprocess
import sys
import time
from pathlib import Path

import numpy
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

from minitp import backend, comm, launcher
from minitp.testing import max_error
from parallel_helpers import value_error
from tutorial_runner import needs_mpiexec

WORLD = MPI.COMM_WORLD
REPO = Path(__file__).resolve().parent.parent
DTYPES = ["float32", "float64", "int64"]
# MPI may add the ranks' values in another order than numpy.sum: allow rounding, nothing more
TOLERANCE = {"float32": 1e-6, "float64": 1e-15, "int64": 0.0}


def rank_array(rank, shape, dtype="float64"):
    """Rank ``rank``'s data: any rank can rebuild any other rank's array."""
    rng = numpy.random.default_rng(100 + rank)
    if numpy.dtype(dtype).kind == "i":
        return rng.integers(-1000, 1000, size=shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def all_ranks(shape, dtype="float64"):
    return [rank_array(r, shape, dtype) for r in range(WORLD.size)]


def world():
    return comm.Group(WORLD, "world")  # wrapping COMM_WORLD creates no communicator


def same_on_every_rank(value):
    return all(v == value for v in WORLD.allgather(value))


# -- the mesh ---------------------------------------------------------------------------------------

@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_mesh_groups_have_the_right_members():
    n, rank = WORLD.size, WORLD.rank
    for tp in [d for d in range(1, n + 1) if n % d == 0]:
        mesh = comm.Mesh(tp_size=tp)
        dp_rank, tp_rank = rank // tp, rank % tp
        parallel_assert((mesh.tp_size, mesh.dp_size, mesh.tp_rank, mesh.dp_rank) == (tp, n // tp, tp_rank, dp_rank),
                        f"tp={tp}: {mesh}")
        parallel_assert(mesh.tp.ranks == tuple(dp_rank * tp + i for i in range(tp)), f"tp={tp}: {mesh.tp}")
        parallel_assert(mesh.dp.ranks == tuple(j * tp + tp_rank for j in range(n // tp)), f"tp={tp}: {mesh.dp}")
        parallel_assert((mesh.tp.rank, mesh.dp.rank, mesh.world.rank) == (tp_rank, dp_rank, rank))
        parallel_assert((mesh.world.name, mesh.tp.name, mesh.dp.name) == ("world", "tp", "dp"))
        parallel_assert(mesh.world.ranks == tuple(range(n)))


@pytest.mark.parallel(nprocs=[4])
@pytest.mark.parametrize("dp, pp, cp, tp", [(1, 2, 1, 2), (1, 1, 2, 2), (2, 2, 1, 1), (1, 2, 2, 1), (1, 4, 1, 1)])
def test_four_axis_mesh_lays_ranks_out_dp_pp_cp_tp(dp, pp, cp, tp):
    """rank = ((dp_rank·pp + pp_rank)·cp + cp_rank)·tp + tp_rank; each group holds the ranks that differ only
    in its coordinate(s), in coordinate order; dp_cp joins the dp and cp coordinates."""
    mesh = comm.Mesh(tp_size=tp, dp_size=dp, pp_size=pp, cp_size=cp)
    rank = WORLD.rank
    coordinates = dict(tp=rank % tp, cp=rank // tp % cp, pp=rank // (tp * cp) % pp, dp=rank // (tp * cp * pp))
    parallel_assert(mesh.coordinates == coordinates, f"{mesh.coordinates} vs {coordinates}")

    def ranks_along(*axes):
        sizes = dict(dp=dp, pp=pp, cp=cp, tp=tp)
        found = []
        for other in range(WORLD.size):
            theirs = dict(tp=other % tp, cp=other // tp % cp, pp=other // (tp * cp) % pp, dp=other // (tp * cp * pp))
            if all(theirs[a] == coordinates[a] for a in sizes if a not in axes):
                found.append(other)
        return tuple(found)
    for name, axes in (("tp", ("tp",)), ("cp", ("cp",)), ("pp", ("pp",)), ("dp", ("dp",)), ("dp_cp", ("dp", "cp"))):
        group = getattr(mesh, name)
        parallel_assert(group.ranks == ranks_along(*axes) and group.ranks[group.rank] == rank, f"{name}: {group}")
    parallel_assert(mesh.pp.rank == mesh.pp_rank and mesh.first_stage == (mesh.pp_rank == 0)
                    and mesh.last_stage == (mesh.pp_rank == pp - 1))
    parallel_assert(mesh.rank_of(tp=0) == rank - coordinates["tp"])


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_mesh_sizes_that_do_not_multiply_raise_on_every_rank():
    n = WORLD.size
    for tp, dp, pp in [(n + 1, None, 1), (1, n + 1, 1), (n, 2, 1), (0, None, 1), (1, None, 0),
                       (1, None, n + 1)] + ([(3, None, 1), (2, None, 3)] if n == 4 else []):
        try:
            comm.Mesh(tp_size=tp, dp_size=dp, pp_size=pp)
            message = None
        except ValueError as error:
            message = str(error)
        parallel_assert(message is not None, f"tp={tp}, dp={dp} on {n} ranks: no ValueError")
        parallel_assert(same_on_every_rank(message), f"tp={tp}, dp={dp}: the ranks disagree")
    parallel_assert(comm.all_reduce(numpy.ones(1), world())[0] == n, "the ranks are still in step")


@pytest.mark.parallel(nprocs=[1, 2, 4])
def test_init_returns_the_same_mesh_and_sets_no_default_group():
    """Groups are passed explicitly: init() hands back the mesh, and nothing in minitp looks one up."""
    mesh = comm.init(tp=WORLD.size)
    parallel_assert(comm.init(tp=WORLD.size) is mesh)
    parallel_assert(not hasattr(comm, "current_mesh") and not hasattr(comm, "tensor_parallel_group"))


# -- each collective against numpy ------------------------------------------------------------------

@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 7), (1,), (2, 1, 3)])
def test_all_reduce_is_the_sum(shape, dtype):
    x = rank_array(WORLD.rank, shape, dtype)
    before = x.copy()
    total = comm.all_reduce(x, world())
    expected = numpy.sum(all_ranks(shape, dtype), axis=0)
    parallel_assert(total.shape == shape and total.dtype == x.dtype)
    parallel_assert(max_error(total, expected) <= TOLERANCE[dtype], f"{max_error(total, expected)}")
    parallel_assert(numpy.array_equal(x, before), "all_reduce wrote into its input")


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
@pytest.mark.parametrize("where", ["in place", "another array", "a non-contiguous view"])
def test_all_reduce_into_out_writes_the_sum_there(where, device):
    """``out=x`` reduces in place (MPI_IN_PLACE); any other ``out`` receives the sum and x is untouched;
    on the GPU half, a CuPy out is filled through the host staging or directly."""
    xp = backend.xp
    x = xp.asarray(rank_array(WORLD.rank, (4, 6)))
    before = backend.to_host(x).copy()
    backing = xp.zeros((4, 12))
    out = {"in place": x, "another array": xp.zeros((4, 6)), "a non-contiguous view": backing[:, ::2]}[where]
    result = comm.all_reduce(x, world(), out=out)
    expected = numpy.sum(all_ranks((4, 6)), axis=0)
    parallel_assert(result is out and max_error(out, expected) <= 1e-15, f"{max_error(out, expected)}")
    parallel_assert(where == "in place" or numpy.array_equal(backend.to_host(x), before), "wrote into x")
    parallel_assert(where != "a non-contiguous view" or not backend.to_host(backing)[:, 1::2].any(),
                    "wrote between the view's columns")


@pytest.mark.parallel(nprocs=[1, 2, 3])
@pytest.mark.parametrize("out", [numpy.zeros((4, 5)), numpy.zeros((4, 6), dtype="float32")])
def test_all_reduce_refuses_an_out_of_another_shape_or_dtype_on_every_rank_before_communicating(out):
    message, collectives = value_error(lambda: comm.all_reduce(rank_array(WORLD.rank, (4, 6)), world(), out=out))
    parallel_assert(message is not None and "out has shape" in message and collectives == 0, str(message))


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_all_gather_concatenates_in_rank_order(axis, dtype):
    shape = (3, 5, 7)
    x = rank_array(WORLD.rank, shape, dtype)
    before = x.copy()
    gathered = comm.all_gather(x, world(), axis=axis)
    expected = numpy.concatenate(all_ranks(shape, dtype), axis=axis)
    parallel_assert(gathered.shape == expected.shape and gathered.dtype == x.dtype, f"{gathered.shape}")
    parallel_assert(numpy.array_equal(gathered, expected), f"axis {axis}")
    parallel_assert(numpy.array_equal(x, before), "all_gather wrote into its input")


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_reduce_scatter_keeps_this_ranks_block_of_the_sum(axis, dtype):
    n, rank = WORLD.size, WORLD.rank
    shape = [3, 5, 7]
    shape[axis] = 2 * n  # divisible along the scattered axis, odd along the others
    x = rank_array(rank, tuple(shape), dtype)
    before = x.copy()
    mine = comm.reduce_scatter(x, world(), axis=axis)
    total = numpy.sum(all_ranks(tuple(shape), dtype), axis=0)
    expected = numpy.split(total, n, axis=axis)[rank]
    parallel_assert(mine.shape == expected.shape and mine.dtype == x.dtype, f"{mine.shape} vs {expected.shape}")
    parallel_assert(max_error(mine, expected) <= TOLERANCE[dtype], f"axis {axis}: {max_error(mine, expected)}")
    parallel_assert(numpy.array_equal(x, before), "reduce_scatter wrote into its input")


@pytest.mark.parallel(nprocs=[2, 3, 4])
def test_reduce_scatter_of_an_indivisible_length_raises_on_every_rank():
    n = WORLD.size
    for axis in (0, 1):
        shape = [4 * n, 4 * n]
        shape[axis] = n + 1
        try:
            comm.reduce_scatter(rank_array(WORLD.rank, tuple(shape)), world(), axis=axis)
            message = None
        except ValueError as error:
            message = str(error)
        parallel_assert(message is not None, f"axis {axis} of length {n + 1} on {n} ranks: no ValueError")
        parallel_assert(same_on_every_rank(message))
    # nobody is left inside a collective: the next one completes with the right value
    parallel_assert(comm.all_reduce(numpy.ones(2), world())[0] == n)


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_broadcast_copies_the_roots_array(dtype):
    root = WORLD.size - 1
    x = rank_array(WORLD.rank, (3, 5), dtype)
    before = x.copy()
    received = comm.broadcast(x, world(), root=root)
    parallel_assert(numpy.array_equal(received, rank_array(root, (3, 5), dtype)))
    parallel_assert(numpy.array_equal(x, before), "broadcast wrote into its input")


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_split_is_a_view_of_this_ranks_block_and_all_gather_undoes_it(axis):
    n = WORLD.size
    shape = [3, 5, 7]
    shape[axis] = 3 * n
    x = rank_array(0, tuple(shape))  # replicated: the same on every rank
    mine = comm.split(x, world(), axis)
    parallel_assert(numpy.array_equal(mine, numpy.split(x, n, axis=axis)[WORLD.rank]))
    parallel_assert(numpy.shares_memory(mine, x), "split copied")
    parallel_assert(numpy.array_equal(comm.all_gather(mine, world(), axis=axis), x))
    try:
        comm.split(numpy.zeros((n + 1, 2)), world(), 0)
        raised = n == 1
    except ValueError:
        raised = True
    parallel_assert(raised, "split of an indivisible length did not raise")


@pytest.mark.parallel(nprocs=[1, 2])
def test_a_group_of_one_rank_returns_the_input_and_logs_no_ring_bytes():
    alone = comm.init(tp=1).tp  # each rank is its own tensor-parallel group
    x = rank_array(WORLD.rank, (4, 3))
    with comm.log_collectives() as log:
        results = [comm.all_reduce(x, alone), comm.all_gather(x, alone, axis=1),
                   comm.reduce_scatter(x, alone, axis=0), comm.broadcast(x, alone)]
    parallel_assert(all(result is x for result in results))
    parallel_assert(log.count() == 4 and log.total_ring_bytes() == 0, log.table())
    parallel_assert(log.total_payload_bytes() == 4 * x.nbytes, log.table())


@pytest.mark.parallel(nprocs=[1, 2])
def test_collectives_return_arrays_of_the_inputs_module(device):
    """On the GPU: CuPy in, CuPy out, whichever transport (host staging by default)."""
    xp = backend.xp
    n = WORLD.size
    x = xp.asarray(rank_array(WORLD.rank, (2 * n, 3)))
    expected_sum = numpy.sum(all_ranks((2 * n, 3)), axis=0)
    results = {
        "all_reduce": (comm.all_reduce(x, world()), expected_sum),
        "all_gather": (comm.all_gather(x, world(), axis=1), numpy.concatenate(all_ranks((2 * n, 3)), axis=1)),
        "reduce_scatter": (comm.reduce_scatter(x, world()), numpy.split(expected_sum, n)[WORLD.rank]),
        "broadcast": (comm.broadcast(x, world()), rank_array(0, (2 * n, 3))),
    }
    for op, (result, expected) in results.items():
        parallel_assert(backend.array_module(result) is xp, f"{op} returned {type(result)}")
        parallel_assert(max_error(result, expected) <= 1e-15, op)
    transports = {"cpu": ["numpy buffers"],
                  "gpu": ["CuPy via host staging", "CuPy device buffers (CUDA-aware MPI)"]}[device]
    parallel_assert(comm.transport() in transports, comm.transport())


# -- the collective log -----------------------------------------------------------------------------

@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_the_log_counts_payload_and_ring_bytes_by_the_ring_formulas():
    n = WORLD.size
    group = world()
    x = rank_array(WORLD.rank, (2 * n, 3, 5))  # float64: 8 bytes an element
    S = x.size * 8
    with comm.log_collectives() as log:
        comm.all_reduce(x, group, tag="A")
        comm.all_gather(x, group, axis=2, tag="B")
        comm.reduce_scatter(x, group, axis=0, tag="C")
        comm.broadcast(x, group, tag="D")
        comm.split(x, group, axis=0)  # no communication: not logged
    expected = [  # (op, shape of the full buffer S, S in bytes, ring bytes per rank)
        ("all_reduce", (2 * n, 3, 5), S, 2 * (n - 1) / n * S),
        ("all_gather", (2 * n, 3, 5 * n), n * S, (n - 1) / n * (n * S)),
        ("reduce_scatter", (2 * n, 3, 5), S, (n - 1) / n * S),
        ("broadcast", (2 * n, 3, 5), S, (n - 1) / n * S),
    ]
    parallel_assert(len(log) == 4, log.table())
    for record, (op, shape, payload, ring), tag in zip(log, expected, "ABCD"):
        parallel_assert((record.op, record.shape, record.payload_bytes, record.tag) == (op, shape, payload, tag),
                        f"{record}")
        parallel_assert(abs(record.ring_bytes - ring) <= 1e-9 * S, f"{record}: ring bytes should be {ring}")
        parallel_assert((record.group, record.group_size, record.dtype) == ("world", n, "float64"))
    parallel_assert(abs(log.total_ring_bytes() - sum(e[3] for e in expected)) <= 1e-9 * S)
    parallel_assert(log.count("all_gather") == 1 and log.total_payload_bytes("all_gather") == n * S)
    table = log.table().splitlines()
    parallel_assert(len(table) == 1 + 4 + 1 and "4 collectives" in table[-1], log.table())


@pytest.mark.parallel(nprocs=[1, 2])
def test_logs_nest_and_record_nothing_once_closed():
    group, x = world(), numpy.ones(3)
    with comm.log_collectives() as outer:
        comm.all_reduce(x, group)
        with comm.log_collectives() as inner:
            comm.all_gather(x, group)
        comm.reduce_scatter(numpy.ones(2 * WORLD.size), group)
    comm.all_reduce(x, group)
    parallel_assert([r.op for r in outer] == ["all_reduce", "all_gather", "reduce_scatter"])
    parallel_assert([r.op for r in inner] == ["all_gather"])
    parallel_assert(comm.log._active_logs == [], "a closed log is still recording")


# -- processes: abort on exception, BLAS threads ----------------------------------------------------

def _launch(nprocs, script, timeout, environment=None, args=()):
    """Run ``mpiexec -n nprocs python script *args`` outside any MPI job this test runs in, with
    ``environment`` changed (None removes a variable); (exit code, seconds, stderr, stdout)."""
    start = time.monotonic()
    done = subprocess.run(launcher.command(nprocs) + [sys.executable, str(REPO / "tests" / "scripts" / script), *args],
                          capture_output=True, text=True, timeout=timeout, env=launcher.environment(environment),
                          cwd=REPO)
    return done.returncode, time.monotonic() - start, done.stderr, done.stdout


@needs_mpiexec
def test_an_exception_on_one_rank_aborts_the_whole_job():
    """Rank 2 of 4 raises while the others wait in an all-reduce: the job must end quickly, non-zero,
    with rank 2's traceback (without the abort handler it would hang until the 60 s timeout)."""
    code, seconds, stderr, stdout = _launch(4, "raise_on_one_rank.py", timeout=60)
    assert code != 0, stderr
    assert seconds < 20, f"took {seconds:.1f} s"
    assert "[rank 2] Traceback" in stderr and "[rank 2] RuntimeError: rank 2 fails on purpose" in stderr, stderr
    assert "unreachable" not in stdout


# Runs a script with its rank's sys.exit stamped: "left at <time.monotonic()>" on stdout, then minitp's own
# sys.exit (installed on import of minitp.comm). CLOCK_MONOTONIC is one clock for every process of a machine.
_STAMP_EXIT = """import runpy, sys, time
from minitp import comm
leave = sys.exit
def stamped(status=None):
    print("left at", time.monotonic(), flush=True)
    leave(status)
sys.exit = stamped
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@needs_mpiexec
@pytest.mark.parametrize("status", [0, 3])
def test_a_rank_that_leaves_with_sys_exit_ends_the_job_naming_itself(status):
    """Before: rank 1 left, rank 0 waited in its all-reduce forever. Now rank 1 waits briefly for the
    others to leave too, then aborts the job saying which rank left and which had not.

    Timed from rank 1's sys.exit to the job's end -- what the exit handshake controls: its wait (0.5 s
    after a non-zero status, MINITP_EXIT_WAIT = 2 s here after status 0), then the abort. It used to be
    timed from the launch, which also counts starting a job (mpiexec, two interpreters importing numpy,
    mpi4py and minitp, MPI_Init), ~1 s alone and as long as the machine's load makes it: on a 2-core
    machine shared with other MPI jobs (whose waiting ranks spin) it can pass any fixed bound. A job
    that hung would still fail: on the launch's timeout."""
    environment = {"MINITP_EXIT_WAIT": "2"}  # the wait after a normal (status 0) exit, shortened for the test
    script = str(REPO / "tests" / "scripts" / "exit_on_one_rank.py")
    try:
        done = subprocess.run(launcher.command(2) + [sys.executable, "-c", _STAMP_EXIT, script, str(status)],
                              capture_output=True, text=True, timeout=90, env=launcher.environment(environment),
                              cwd=REPO)
    except subprocess.TimeoutExpired as hung:
        raise AssertionError(f"the job did not end within {hung.timeout} s: {hung.stderr}") from None
    ended = time.monotonic()
    code, stderr, stdout = done.returncode, done.stderr, done.stdout
    left = [float(line.split()[-1]) for line in stdout.splitlines() if line.startswith("left at ")]
    assert code != 0 and len(left) == 1, f"status {code}, stdout {stdout!r}: {stderr}"
    assert ended - left[0] < 15, f"the job ended {ended - left[0]:.1f} s after rank 1 left: {stderr}"
    assert f"[rank 1] left the job (sys.exit({status}))" in stderr and "rank(s) [0] had not" in stderr, stderr
    assert "unreachable" not in stdout


@needs_mpiexec
def test_a_rank_that_raises_before_init_ends_the_job():
    code, seconds, stderr, stdout = _launch(2, "raise_before_init.py", timeout=60)
    assert code != 0 and seconds < 20, f"{code} after {seconds:.1f} s: {stderr}"
    assert "[rank 1] RuntimeError: rank 1 fails before comm.init" in stderr and "unreachable" not in stdout, stderr


@needs_mpiexec
def test_the_same_error_on_every_rank_is_printed_once():
    """A configuration error raised alike on every rank: one traceback (rank 0's), not one per rank."""
    code, seconds, stderr, _ = _launch(3, "same_error_on_every_rank.py", timeout=60)
    assert code == 1 and seconds < 20, f"{code} after {seconds:.1f} s: {stderr}"
    assert stderr.count("Traceback") == 1 and stderr.count("is not divisible by 3") == 1, stderr
    assert "(the same on all 3 ranks)" in stderr and "[rank" not in stderr, stderr


@needs_mpiexec
def test_pytest_under_mpiexec_for_a_rank_count_no_test_asks_for_fails_saying_so():
    """Before: `mpiexec -n 5 python -m pytest` reported every test skipped and exited 0."""
    done = subprocess.run(launcher.command(5) + [sys.executable, "-m", "pytest", "-q", "tests/test_init.py"],
                          capture_output=True, text=True, timeout=120, env=launcher.environment(), cwd=REPO)
    assert done.returncode == 5, done.stdout + done.stderr
    assert "no test is written for 5 ranks, so none ran" in done.stderr, done.stderr


@needs_mpiexec
def test_init_shares_the_cores_between_the_ranks_blas_threads():
    # no thread limit in the environment: numpy's BLAS would start one thread per core in each rank
    unlimited = {name: None for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    code, _, stderr, stdout = _launch(2, "print_blas_threads.py", timeout=60, environment=unlimited)
    assert code == 0, stderr
    lines = stdout.splitlines()
    assert len(lines) == 2, stdout
    for line in lines:
        cores, ranks_on_node, threads = map(int, line.split())
        assert threads <= max(1, cores // ranks_on_node), line
