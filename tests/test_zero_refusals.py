"""What the one training step cannot run correctly is refused, on every rank, before any collective,
with the reason -- instead of training silently wrong (issue 19, second pass; issue 20's one step):

- a mesh with pp > 1 run as a whole batch: a stage holds only its layers and needs a schedule;
- a gradient synchronisation over another group than the one the parameters are replicated over (dp,
  or dp × cp: a dp-only reduction with cp > 1 misses the other cp ranks' tokens);
- ``gradients=`` beside a ZeroOptimizer, which synchronises its own;
- a ZeroOptimizer built over other replicas than the step's mesh has.
"""
import numpy
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

from minitp import comm
from minitp.nn import AdamW, GPTConfig
from minitp.parallel.data.sync import AllReduceGradients
from minitp.parallel.gpt import ParallelGPT
from minitp.parallel.data.zero import ZeroOptimizer
from minitp.training import train_step

WORLD = MPI.COMM_WORLD
CONFIG = dict(vocab=16, seq_len=8, hidden=8, heads=2, layers=2, dropout=0.0, seed=3, dtype="float64")


def batch():
    windows = numpy.random.default_rng(0).integers(0, CONFIG["vocab"], (CONFIG["seq_len"] + 1, 4))
    return windows[:-1], windows[1:]


def refusal(call):
    """(the type and message of what ``call()`` raised, or None; the number of collectives it ran).
    Any exception is caught, so that a rank raising the wrong one reports it through parallel_assert."""
    with comm.log_collectives() as log:
        try:
            call()
        except Exception as error:  # noqa: BLE001 -- the type is what the test checks
            return f"{type(error).__name__}: {error}", len(log)
    return None, len(log)


def refused(outcome, *words):
    """True when ``outcome`` (from ``refusal``) is a ValueError naming every one of ``words``, raised
    before any collective."""
    message, collectives = outcome
    return message is not None and message.startswith("ValueError") and collectives == 0 \
        and all(word in message for word in words)


@pytest.mark.parallel(nprocs=[2])
def test_a_whole_batch_step_refuses_pipeline_stages():
    mesh = comm.init(dp=1, pp=2)
    model = ParallelGPT(GPTConfig(**CONFIG), mesh)
    optimizer = AdamW(model.named_parameters())
    outcome = refusal(lambda: train_step(model, optimizer, *batch(), mesh, max_norm=1.0))
    parallel_assert(refused(outcome, "pp", "Pipelined"), f"{outcome}")


@pytest.mark.parallel(nprocs=[2])
def test_a_step_refuses_a_synchronisation_over_dp_alone_with_context_parallelism():
    mesh = comm.init(dp=1, cp=2)
    model = ParallelGPT(GPTConfig(**CONFIG), mesh, context_parallel="ring")
    optimizer = AdamW(model.named_parameters())
    wrong = AllReduceGradients(model, comm.init(dp=1, tp=2))  # its replicas: dp alone, which misses the other cp rank's tokens
    outcome = refusal(lambda: train_step(model, optimizer, *batch(), mesh, max_norm=1.0, gradients=wrong))
    parallel_assert(refused(outcome, "dp × cp", "dp_cp"), f"{outcome}")
    right = AllReduceGradients(model, mesh)
    outcome = refusal(lambda: train_step(model, optimizer, *batch(), mesh, max_norm=1.0, gradients=right))
    parallel_assert(outcome[0] is None, f"the right group is taken: {outcome}")


@pytest.mark.parallel(nprocs=[2])
def test_a_step_refuses_a_synchronisation_beside_zero():
    mesh = comm.init(dp=2)
    model = ParallelGPT(GPTConfig(**CONFIG), mesh)
    zero = ZeroOptimizer(AdamW(model.named_parameters()), mesh)
    plain = AllReduceGradients(model, mesh)
    outcome = refusal(lambda: train_step(model, zero, *batch(), mesh, gradients=plain))
    parallel_assert(refused(outcome, "ZeRO"), f"{outcome}")


@pytest.mark.parallel(nprocs=[4])
def test_a_step_refuses_a_zero_optimizer_built_over_other_replicas():
    """A ZeroOptimizer built on a dp × cp mesh averages over all 4 ranks; a step on a mesh whose
    replicas are 2 (dp = 2, tp = 2) would take that mean over ranks holding other tensor blocks."""
    built_on = comm.init(dp=2, cp=2)
    model = ParallelGPT(GPTConfig(**CONFIG), built_on, context_parallel="ring")
    optimizer = ZeroOptimizer(AdamW(model.named_parameters()), built_on)
    other = comm.init(dp=2, tp=2)
    outcome = refusal(lambda: train_step(model, optimizer, *batch(), other, max_norm=1.0))
    parallel_assert(refused(outcome, "Build it on the step's mesh"), f"{outcome}")
