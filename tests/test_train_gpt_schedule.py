"""The trainer's issue-24 pieces that have an exact answer: gradient accumulation at pp = 1 IS the
whole-batch step; the lr schedule reaches the update under ZeRO (the wrapper's ``lr`` is the wrapped
AdamW's); the held-out loss is the serial model's eval loss on every mesh (pipelines included) and leaves
the training untouched; every option of the trainer's new log at its edges is in test_train_gpt_options."""
import re

import numpy
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

from minitp import comm, pipeline
from minitp.nn import GPT, AdamW, GPTConfig
from minitp.parallel import ParallelGPT, ZeroOptimizer
from minitp.training.evaluate import evaluate_loss
from test_train_gpt import tutorial
from test_train_gpt_options import TINY, outcome
from tutorial_runner import launch, needs_mpiexec

WORLD = MPI.COMM_WORLD
EXACT = 1e-12


@pytest.fixture(scope="module")
def train_gpt():
    return tutorial()


def max_difference(out):
    return float(re.search(r"difference from the serial run .* is (\S+) \(tolerance", out).group(1))


@pytest.mark.parametrize("options", [["--microbatches", "4"], ["--microbatches", "2", "--zero", "1"]])
def test_gradient_accumulation_at_pp_1_equals_the_whole_batch_step(train_gpt, options, capsys):
    """--microbatches m at --pp 1 runs the batch as m microbatches through one stage (Pipelined): 10
    steps in float64 with dropout 0.1 equal the serial whole-batch steps to 1e-12 -- each microbatch's
    dropout mask is its block of the step's one mask, and its loss gradient is 1/m of its mean's."""
    status, out, _ = outcome(train_gpt, options + ["--check"], capsys)
    assert status == 0 and f"{options[1]} microbatches" in out, out
    assert max_difference(out) <= EXACT, out


@pytest.mark.parametrize("zero", ["1", "2", "3"])
def test_the_lr_schedule_reaches_the_update_under_zero(train_gpt, zero, capsys):
    """--check warms up and decays the lr (every step's differs); ZeRO's step runs the wrapped AdamW's
    update, so its ``lr`` property must write the wrapped one's -- an attribute of its own would leave
    the parallel run at the first lr, 0.15 away from the serial one."""
    status, out, _ = outcome(train_gpt, ["--zero", zero, "--check"], capsys)
    assert status == 0 and max_difference(out) <= EXACT, out


def test_zero_lr_is_the_wrapped_optimizers():
    mesh = comm.init()
    model = ParallelGPT(GPTConfig(vocab=16, seq_len=8, hidden=8, heads=2, layers=1, dtype="float64"), mesh)
    inner = AdamW(model.named_parameters(), lr=1e-3)
    zero = ZeroOptimizer(inner, mesh)
    zero.lr = 0.25
    assert inner.lr == 0.25 and zero.lr == 0.25


def test_evaluating_leaves_the_training_untouched_and_is_logged(train_gpt, capsys):
    """Dropout on: the held-out forwards run in eval mode, so the dropout counters do not move and the
    training losses are the same with an evaluation every step as with none."""
    runs = []
    for every in ("1", "0"):
        status, out, _ = outcome(train_gpt, ["--steps", "3", "--log-every", "1", "--dropout", "0.2",
                                             "--eval-every", every], capsys)
        assert status == 0, out
        runs.append((re.findall(r"^step\s+\d/3\s+loss (\S+)", out, re.M), out.count("held-out loss")))
    assert runs[0][0] == runs[1][0] and len(runs[0][0]) == 3 and (runs[0][1], runs[1][1]) == (3, 0), runs
    assert re.search(r"tokens/s\s+MFU\s+\d+\.\d%", out) and "measured GEMM rate" in out, out


CONFIG = dict(vocab=24, seq_len=8, hidden=16, heads=4, dropout=0.1, seed=2, dtype=numpy.float64)


def serial_eval_loss(ids, targets, layers):
    model = GPT(GPTConfig(layers=layers, **CONFIG))
    model.eval()
    return model.loss(ids, targets).item()


def batch():
    windows = numpy.random.default_rng(5).integers(0, CONFIG["vocab"], (CONFIG["seq_len"] + 1, 8))
    return windows[:-1], windows[1:]


@pytest.mark.parallel(nprocs=[2])
@pytest.mark.parametrize("where", ["dp2", "pp2 1f1b", "pp2 interleaved", "pp2 afab"])
def test_the_held_out_loss_is_the_serial_eval_loss_on_every_mesh(where):
    """Forward only, dropout off: the serial model's loss in eval mode, to 1e-12, on 2 replicas and
    through 2 pipeline stages by each schedule's forwards (the backwards left out of the plan)."""
    ids, targets = batch()
    if where == "dp2":
        mesh, layers = comm.init(dp=2), 2
        model, forward = ParallelGPT(GPTConfig(layers=layers, **CONFIG), mesh), {}
    else:
        schedule = where.split()[1]
        chunks = 2 if schedule == "interleaved" else 1
        mesh, layers = comm.init(pp=2), 2 * chunks
        model = pipeline.PipelineGPT(GPTConfig(layers=layers, **CONFIG), mesh, virtual_stages=chunks)
        forward = dict(schedule=schedule, microbatches=4)
    loss = evaluate_loss(model, ids, targets, mesh, **forward)
    expected = serial_eval_loss(ids, targets, layers)
    parallel_assert(abs(loss - expected) <= EXACT, f"{where}: {loss} vs serial {expected}")
    parallel_assert(model.training, "back in training mode")


def test_fp16_trains_with_master_weights_and_the_loss_scaler(train_gpt, capsys):
    """--dtype fp16: the model in fp16, AdamW's masters and moments in fp32, the loss scaled; at the tiny
    size it trains (20 steps: the mean loss of the last 5 below the first) and no step is skipped."""
    status, out, _ = outcome(train_gpt, ["--dtype", "fp16", "--steps", "20", "--log-every", "5", "--batch", "8",
                                         "--seq", "16", "--hidden", "32"], capsys)
    assert status == 0 and "fp16" in out and "skipped" not in out, out
    first, last = re.search(r"loss (\S+) \(first step\) -> (\S+)", out).groups()
    assert float(last) < float(first) - 0.3, out


@needs_mpiexec
def test_the_banner_says_when_ranks_share_a_gpu():
    """MINITP_DEVICE=gpu (the CuPy stand-in, 2 "GPUs"): 3 ranks put ranks 0 and 2 on GPU 0 -- the banner
    says so, with the issue's measured figures; 2 ranks, one GPU each, get no note."""
    runs = {ranks: launch("train_gpt.py", *TINY, "--steps", "1", "--batch", "6", ranks=ranks, device="gpu", timeout=120,
                          env=dict(CUPY_STANDIN_DEVICES="2")) for ranks in (3, 2)}
    for ranks, run in runs.items():
        assert run.returncode == 0, run.stdout + run.stderr
    assert runs[3].stdout.count("note: 2 ranks share one GPU") == 1 and "15x slower" in runs[3].stdout, runs[3].stdout
    assert "share one GPU" not in runs[2].stdout, runs[2].stdout
