"""tutorials/train_gpt.py with context parallelism: its --check holds with --cp (ring, zigzag, Ulysses; with
tp, sequence parallelism and dp where the ranks allow), and its command line trains with --cp and
refuses a sequence the cp ranks cannot split, on every rank, before any training."""
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

from minitp import comm
from test_train_gpt import SMALL, tutorial
from tutorial_runner import launch, needs_mpiexec

WORLD = MPI.COMM_WORLD


def meshes(kind):
    """(cp, tp, dp, sequence_parallel) on this world size; Ulysses needs cp·tp to divide the check's 4 heads."""
    options = {2: [(2, 1, 1, False)], 4: [(2, 2, 1, True), (4, 1, 1, False), (2, 1, 2, False)],
               8: [(4, 2, 1, True), (2, 2, 2, True)]}[WORLD.size]
    return [mesh for mesh in options if kind != "ulysses" or 4 % (mesh[0] * mesh[1]) == 0]


@pytest.mark.parallel(nprocs=[2, 4, 8])
@pytest.mark.parametrize("kind", ["ring", "zigzag", "ulysses"])
def test_check_mode_losses_equal_the_serial_run_with_context_parallelism(kind):
    train_gpt = tutorial()
    for cp, tp, dp, sequence_parallel in meshes(kind):
        args = train_gpt.check_args(tp, dp, sequence_parallel, cp=cp, cp_kind=kind)
        result = train_gpt.check(args, comm.init(tp=tp, dp=dp, cp=cp))
        parallel_assert(result.max_difference <= train_gpt.CHECK_TOLERANCE,
                        f"cp {cp} tp {tp} dp {dp} {kind}: {result.parallel} vs {result.serial}")
        parallel_assert(len(set(result.serial)) == 10, "the losses move: the check compares something")


@needs_mpiexec
def test_command_line_trains_with_cp_and_refuses_a_sequence_it_cannot_split():
    run = launch("train_gpt.py", *SMALL, "--cp", "2", "--steps", "2", ranks=2, timeout=90)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "context parallel: zigzag" in run.stdout and "step    2/2" in run.stdout, run.stdout
    bad = launch("train_gpt.py", *SMALL, "--cp", "2", "--seq", "18", "--steps", "1", ranks=2, timeout=90)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr, bad.stderr
    assert "error: the sequence length s=18 under zigzag context parallelism over cp=2" in bad.stderr, bad.stderr
