"""tutorials/train_gpt.py with pipeline stages: its --check holds for every schedule on (dp, pp, tp) meshes
(in process), and its command line trains with --pp and refuses a pipeline that cannot run, on every
rank, with one line."""
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

from minitp import comm
from test_train_gpt import SMALL, tutorial
from tutorial_runner import launch, needs_mpiexec

WORLD = MPI.COMM_WORLD


@pytest.mark.parallel(nprocs=[2, 4])
@pytest.mark.parametrize("schedule", ["afab", "1f1b", "interleaved"])
def test_check_mode_losses_equal_the_serial_run_through_the_stages(schedule):
    """10 steps, float64, dropout 0.1: pp = 2 with tp or dp filling the rest of the world."""
    train_gpt = tutorial()
    tp, dp = (2, 1) if schedule == "1f1b" else (1, WORLD.size // 2)
    if WORLD.size == 2:
        tp, dp = 1, 1
    microbatches = 4 if schedule != "afab" else 2
    args = train_gpt.check_args(tp, dp, sequence_parallel=tp > 1, tie_embeddings=schedule != "afab", pp=2,
                                microbatches=microbatches, schedule=schedule,
                                virtual_stages=2 if schedule == "interleaved" else 1)
    result = train_gpt.check(args, comm.init(tp=tp, dp=dp, pp=2))
    parallel_assert(result.max_difference <= train_gpt.CHECK_TOLERANCE,
                    f"{schedule} tp {tp} dp {dp}: {result.parallel} vs {result.serial}")
    parallel_assert(len(set(result.serial)) == 10, "the losses move: the check compares something")


@needs_mpiexec
def test_command_line_trains_through_stages_and_refuses_what_cannot_run():
    run = launch("train_gpt.py", *SMALL, "--layers", "2", "--pp", "2", "--microbatches", "2", "--steps", "2",
                 ranks=2, timeout=90)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1f1b schedule, 2 microbatches" in run.stdout and "step    2/2" in run.stdout, run.stdout
    refused = launch("train_gpt.py", *SMALL, "--layers", "3", "--pp", "2", "--steps", "1", ranks=2, timeout=90)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr, refused.stderr
    assert refused.stderr.count("error: the layers (split into pp × virtual stages = 2 × 1 chunks)=3") == 1, \
        refused.stderr
