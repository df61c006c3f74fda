"""tutorials/train_gpt.py: its --check holds on every mesh (in process, fast), and its command line trains,
saves, resumes on another mesh and refuses a mesh that does not fit the ranks (as a learner runs it)."""
import importlib.util
import json
import sys

import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

from minitp import comm
from tutorial_runner import TUTORIALS, launch, needs_mpiexec

WORLD = MPI.COMM_WORLD
TUTORIAL = TUTORIALS / "train_gpt.py"


def tutorial():
    """The tutorial's module, loaded from its file. ``python tutorials/train_gpt.py`` puts the folder
    tutorials/ on sys.path, where its ``import train_gpt_options`` finds its sibling: so does this, last,
    so that the other tutorials' names (pipeline.py, plan.py, ...) shadow nothing the tests import."""
    if str(TUTORIALS) not in sys.path:
        sys.path.append(str(TUTORIALS))
    spec = importlib.util.spec_from_file_location("train_gpt", TUTORIAL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # definitions only: the run is behind `if __name__ == "__main__"`
    return module


@pytest.mark.parallel(nprocs=[1, 2, 4])
@pytest.mark.parametrize("sequence_parallel", [False, True])
@pytest.mark.parametrize("tie_embeddings", [False, True])
def test_check_mode_losses_equal_the_serial_run(sequence_parallel, tie_embeddings):
    """10 steps in float64 with dropout 0.1 on every (tp, dp) with tp × dp = the ranks, tp in {1, 2, 4},
    dp in {1, 2}: the per-step losses equal the serial nn.GPT's within 1e-9."""
    train_gpt = tutorial()
    meshes = [(tp, WORLD.size // tp) for tp in (1, 2, 4) if WORLD.size % tp == 0 and WORLD.size // tp <= 2]
    for tp, dp in meshes:
        args = train_gpt.check_args(tp, dp, sequence_parallel, tie_embeddings)
        result = train_gpt.check(args, comm.init(tp=tp, dp=dp))
        parallel_assert(len(result.parallel) == len(result.serial) == 10, f"10 steps: {result}")
        parallel_assert(result.max_difference <= train_gpt.CHECK_TOLERANCE,
                        f"tp {tp} dp {dp}: {result.parallel} vs {result.serial}")
        parallel_assert(len(set(result.serial)) == 10, "the losses move: the check compares something")


@pytest.mark.parallel(nprocs=[2])
def test_check_catches_gradients_summed_over_dp_instead_of_averaged(monkeypatch):
    """Clipping scales summed gradients back to the clip norm, so the losses of such a run stay within
    1e-9 for some steps; the gradient norms, compared every step, do not."""
    train_gpt = tutorial()
    from minitp import comm as minitp_dist
    from minitp.parallel.data import data_parallel
    real_all_reduce = minitp_dist.all_reduce
    monkeypatch.setattr(data_parallel.comm, "all_reduce",
                        lambda x, group, tag="", op="sum", out=None: real_all_reduce(x, group, tag, op, out) *
                        (group.size if tag.startswith("gradients") else 1))  # undo the mean: a sum
    result = train_gpt.check(train_gpt.check_args(1, 2), comm.init(tp=1, dp=2))
    norms = [abs(p / s - 1) for p, s in zip(result.parallel_norms, result.serial_norms)]
    parallel_assert(result.max_difference > 0.5 and max(norms) > 0.5, f"{result}")


@pytest.mark.parallel(nprocs=[2, 4])
@pytest.mark.parametrize("zero,overlap,sequence_parallel", [(1, False, False), (0, True, True), (1, True, True),
                                                          (2, False, False), (2, True, True), (3, False, False),
                                                          (3, True, True)])
def test_check_mode_covers_zero_and_overlap(zero, overlap, sequence_parallel):
    """--check with --zero 1, 2, 3 and/or --overlap on every (tp, dp) with dp > 1 (at 4 ranks dp 4 and tp 2 ×
    dp 2): the losses equal the serial run's."""
    train_gpt = tutorial()
    for tp in (1, 2):
        dp = WORLD.size // tp
        args = train_gpt.check_args(tp, dp, sequence_parallel, zero=zero, overlap=overlap)
        result = train_gpt.check(args, comm.init(tp=tp, dp=dp))
        parallel_assert(result.max_difference <= train_gpt.CHECK_TOLERANCE,
                        f"tp {tp} dp {dp} zero {zero} overlap {overlap}: {result.parallel} vs {result.serial}")


# Every axis at once (issue 20): the meshes that 4 and 8 ranks allow with pp and cp together, ZeRO-1 and
# overlap on pipelines, recomputation -- each --check equal to the serial run. (tests/test_composition.py
# compares every gradient and parameter of every combination; this is the command line's own proof.)
COMPOSED = {4: [dict(pp=2, cp=2, microbatches=2, cp_kind="ring", recompute="full"),
                dict(pp=2, dp=2, microbatches=2, zero=1, overlap=True, tie_embeddings=True),
                dict(cp=2, dp=2, zero=1, overlap=True, cp_kind="ulysses", recompute="selective"),
                dict(pp=2, tp=2, sequence_parallel=True, microbatches=2, schedule="interleaved",
                     virtual_stages=2, zero=1)],
            8: [dict(pp=2, cp=2, tp=2, sequence_parallel=True, microbatches=2, zero=1, overlap=True),
                dict(dp=2, pp=2, cp=2, microbatches=2, schedule="afab", cp_kind="zigzag", tie_embeddings=True)]}


@pytest.mark.parallel(nprocs=[4, 8])
def test_check_mode_takes_every_axis_at_once():
    train_gpt = tutorial()
    for case in COMPOSED[WORLD.size]:
        mesh = {axis: case.pop(axis, 1) for axis in ("tp", "dp", "pp", "cp")}
        args = train_gpt.check_args(mesh["tp"], mesh["dp"], cp=mesh["cp"], pp=mesh["pp"], **case)
        result = train_gpt.check(args, comm.init(**mesh))
        parallel_assert(result.max_difference <= train_gpt.CHECK_TOLERANCE and len(set(result.serial)) == 10,
                        f"{mesh} {case}: {result.parallel} vs {result.serial}")


# The command line, run as a learner does (tutorial_runner.launch): a fresh launch outside this test's MPI job.
SMALL = ["--seq", "16", "--hidden", "16", "--layers", "1", "--log-every", "1", "--sample", "20"]


def _trained_three_steps(tmp_path):
    """(the text, the checkpoint, the launch) of three steps of train_gpt.py saved to tmp_path."""
    # a text of our own: the repository's tutorials may change between two launches
    text = tmp_path / "text.txt"
    text.write_text(TUTORIAL.read_text(encoding="utf-8"), encoding="utf-8")
    saved = tmp_path / "gpt.npz"
    first = launch("train_gpt.py", *SMALL, "--text", str(text), "--steps", "3", "--save", str(saved), timeout=90)
    assert first.returncode == 0, first.stdout + first.stderr
    return text, saved, first


@needs_mpiexec
def test_command_line_trains_saves_and_resumes_on_another_mesh(tmp_path):
    text, saved, first = _trained_three_steps(tmp_path)
    assert "step    3/3" in first.stdout and "tokens/s" in first.stdout and "sample:" in first.stdout, first.stdout
    resumed = launch("train_gpt.py", *SMALL, "--text", str(text), "--tp", "2", "--sequence-parallel", "--steps", "5",
                     "--load", str(saved), ranks=2, timeout=90)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout and "step    5/5" in resumed.stdout, resumed.stdout
    assert "step    3/5" not in resumed.stdout, "steps 1..3 are not trained again"


@needs_mpiexec
def test_a_mesh_that_does_not_fit_the_ranks_is_a_clear_error():
    run = launch("train_gpt.py", *SMALL, "--tp", "2", "--dp", "2", "--steps", "1", ranks=2, timeout=90)
    assert run.returncode != 0
    assert "error: dp × pp × cp × tp must equal the number of ranks: 2 × 1 × 1 × 2 ≠ 2" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr, run.stderr


@needs_mpiexec
@pytest.mark.parametrize("options, message", [
    (["--tp", "2", "--sequence-parallel", "--seq", "15"], "--seq (split over the --tp ranks by --sequence-parallel)=15 is not divisible by 2"),
    (["--max-norm", "-1"], "--max-norm must be a finite positive number"),
])
def test_command_line_errors_end_every_rank_with_one_line_and_status_2(options, message):
    run = launch("train_gpt.py", *SMALL, *options, "--steps", "1", ranks=2, timeout=60)
    assert run.returncode == 2, run.stdout + run.stderr
    assert run.stderr.count("error:") == 1 and message in run.stderr and "Traceback" not in run.stderr, run.stderr


@needs_mpiexec
def test_a_text_that_is_not_utf8_ends_every_rank_with_the_reason(tmp_path):
    """Before: rank 0 printed the error and returned, the other ranks waited forever for its broadcast."""
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("déjà vu, encore et encore ".encode("latin-1") * 20)
    run = launch("train_gpt.py", *SMALL, "--text", str(latin1), "--steps", "1", ranks=2, timeout=60)
    assert run.returncode == 2 and "UnicodeDecodeError" in run.stderr and run.stderr.count("error:") == 1, run.stderr


@needs_mpiexec
def test_resuming_is_refused_past_steps_on_another_corpus_or_to_an_unwritable_path(tmp_path):
    text, saved, _ = _trained_three_steps(tmp_path)
    beyond = launch("train_gpt.py", *SMALL, "--text", str(text), "--steps", "2", "--load", str(saved), timeout=90)
    assert beyond.returncode == 2 and "at step 3, beyond --steps 2" in beyond.stderr, beyond.stderr
    other = tmp_path / "other.txt"
    other.write_text(text.read_text(encoding="utf-8")[::-1], encoding="utf-8")  # the same characters, reversed
    corpus = launch("train_gpt.py", *SMALL, "--text", str(other), "--steps", "5", "--load", str(saved), timeout=90)
    assert corpus.returncode == 2 and "another corpus" in corpus.stderr, corpus.stderr
    unwritable = launch("train_gpt.py", *SMALL, "--text", str(text), "--steps", "1",
                        "--save", str(tmp_path / "missing" / "gpt.npz"), ranks=2, timeout=90)
    assert unwritable.returncode == 2 and "cannot save a checkpoint" in unwritable.stderr, unwritable.stderr
    assert "step" not in unwritable.stdout, "refused before training"


@needs_mpiexec
def test_command_line_traces_zero_with_overlap(tmp_path):
    trace = tmp_path / "trace.json"
    run = launch("train_gpt.py", *SMALL, "--dp", "2", "--zero", "1", "--overlap", "--steps", "3", "--trace",
                 str(trace), ranks=2, timeout=90)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"traced steps 2..3 into {trace}" in run.stdout and "| rank 1: dp 1, tp 0 |" in run.stdout, run.stdout
    written = json.loads(trace.read_text())
    assert {e["pid"] for e in written["traceEvents"]} == {0, 1}


@needs_mpiexec
@pytest.mark.parametrize("option,message", [(("--bucket-mb", "0"), "error: --bucket-mb must be a positive size"),
                                            (("--trace", "/no/such/directory/t.json"), "error: cannot write the trace")])
def test_a_bad_bucket_size_or_trace_path_is_one_clear_error_before_training(option, message):
    run = launch("train_gpt.py", *SMALL, "--dp", "2", "--steps", "1", *option, ranks=2, timeout=90)
    assert run.returncode == 2 and run.stderr.count(message) == 1, run.stderr
    assert "step " not in run.stdout and "Traceback" not in run.stderr, run.stdout + run.stderr
