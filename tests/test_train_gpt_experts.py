"""train_gpt.py with experts: its --check (in process) equals the serial run on ep 2 (2 ranks) and on ep 4,
ep 2 × expert-dp 2 and ep 2 × tp 2 (4 ranks; with and without capacity drops, top-1 and top-2, SP), one
launch of the command line as a learner runs it, and every expert option at its edges refused in one line
before any collective."""
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

from minitp import comm
from test_train_gpt import tutorial
from tutorial_runner import launch, needs_mpiexec

WORLD = MPI.COMM_WORLD

RUNS = {2: [dict(tp=1, dp=2, ep=2, experts=4, top_k=2),
            dict(tp=2, dp=1, ep=1, experts=2, top_k=1, capacity_factor=1.0),
            # the README's composition row: tied embeddings, selective recomputation, ZeRO-1 at ep = 1
            dict(tp=1, dp=2, ep=2, experts=4, top_k=2, capacity_factor=1.0, tie_embeddings=True),
            dict(tp=1, dp=2, ep=2, experts=4, recompute="selective"),
            dict(tp=1, dp=2, ep=1, experts=4, top_k=2, capacity_factor=1.0, zero=1, overlap=True)],
        4: [dict(tp=1, dp=4, ep=4, experts=4, top_k=2),  # ep 4
            dict(tp=1, dp=4, ep=2, experts=4, top_k=1, capacity_factor=1.0),  # ep 2 × expert-dp 2
            dict(tp=2, dp=2, ep=2, experts=4, top_k=2, capacity_factor=0.75),  # ep 2 × tp 2
            dict(tp=2, dp=2, ep=2, experts=4, top_k=2, sequence_parallel=True, z_loss_coef=1e-3)]}


@pytest.mark.parallel(nprocs=[2, 4])
def test_check_mode_with_experts_equals_the_serial_run():
    train_gpt = tutorial()
    for run in RUNS[WORLD.size]:
        run = dict(run)
        tp, dp, ep = run.pop("tp"), run.pop("dp"), run.pop("ep")
        args = train_gpt.check_args(tp, dp, ep=ep, **run)
        result = train_gpt.check(args, comm.init(tp=tp, dp=dp, ep=ep))
        parallel_assert(result.max_difference <= train_gpt.CHECK_TOLERANCE and len(set(result.serial)) == 10,
                        f"{tp, dp, ep, run}: {result.parallel} vs {result.serial}")


@needs_mpiexec
def test_command_line_check_with_experts():
    run = launch("train_gpt.py", "--experts", "4", "--top-k", "2", "--ep", "2", "--tp", "2", "--capacity-factor",
                 "1.0", "--check", ranks=4, timeout=120)
    assert run.returncode == 0 and "OK: the largest difference" in run.stdout and "ep 2" in run.stdout, run.stdout + run.stderr


@pytest.mark.parametrize("options, message", [
    (["--experts", "3", "--ep", "2"], "--ep 2 must divide --experts 3"),
    (["--experts", "4", "--top-k", "5"], "--top-k 5 must be in [1, --experts 4]"),
    (["--experts", "4", "--capacity-factor", "0"], "--capacity-factor must be a positive number"),
    (["--experts", "4", "--capacity-factor", "-1"], "--capacity-factor must be a positive number"),
    (["--ep", "2"], "--ep 2 spreads experts over ranks: pass --experts too"),
    (["--experts", "4", "--pp", "2"], "--pp/--microbatches"),
    (["--experts", "4", "--cp", "2"], "--cp"),
    (["--experts", "4", "--ep", "2", "--zero", "1"], "--zero 1 with --ep > 1"),
    (["--experts", "4", "--recompute", "full"], "--recompute full"),
    (["--experts", "-1"], "--experts must be 0"),
])
def test_expert_options_at_their_edges_are_one_error_line(options, message, capsys):
    train_gpt = tutorial()
    assert train_gpt.main(options + ["--steps", "1"]) == 2
    assert message in capsys.readouterr().err
