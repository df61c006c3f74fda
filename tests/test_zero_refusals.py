"""What ZeRO-1 and the data-parallel step do not handle is refused, on every rank, before any collective,
with the reason -- instead of training silently wrong (issue 19, second pass).

- ``pipeline.train_step`` with a ZeroOptimizer: the pipeline all-reduces ``.grad`` and clips it, but
  ZeRO-1 takes the gradients itself (reduce-scatter) and keeps only its slices; composing the two is
  not built.
- ``ZeroOptimizer`` on a mesh with pp > 1: each stage holds other layers, so the global norm needs the
  stages' squares summed over pp (and a tied table counted once), which ZeRO-1's norm does not do.
- ``data_parallel.train_step`` on a mesh with pp > 1 (every stage would run the whole model, and the
  norm would add the same squares pp times); with ``gradients`` reduced over another group than the
  one the parameters are replicated over (dp, or dp × cp: a dp-only reduction with cp > 1 misses the
  other cp ranks' tokens), or sharded ones (they drop ``.grad``: the plain optimizer would step on
  nothing); and ``gradients`` beside a ZeroOptimizer, which reduces its own.
"""
import numpy
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

from minitp import comm
from minitp.nn import AdamW, GPTConfig
from minitp.parallel.data.buckets import GradientBuckets
from minitp.parallel.data.data_parallel import train_step
from minitp.parallel.gpt import ParallelGPT
from minitp.parallel.data.zero import ZeroOptimizer
from minitp.pipeline import PipelineGPT
from minitp.pipeline import training as pipeline

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
def test_pipeline_train_step_refuses_a_zero_optimizer_before_any_collective():
    mesh = comm.init(dp=2, pp=1)  # pp = 1: ZeroOptimizer itself takes this mesh
    model = PipelineGPT(GPTConfig(**CONFIG), mesh)
    optimizer = ZeroOptimizer(AdamW(model.named_parameters()), mesh)
    outcome = refusal(lambda: pipeline.train_step(model, optimizer, *batch(), mesh, max_norm=1.0))
    parallel_assert(refused(outcome, "reduce-scatter", "pipeline"), f"{outcome}")


@pytest.mark.parallel(nprocs=[2])
def test_zero_optimizer_refuses_pipeline_stages():
    mesh = comm.init(dp=1, pp=2)
    model = PipelineGPT(GPTConfig(**CONFIG), mesh)
    outcome = refusal(lambda: ZeroOptimizer(AdamW(model.named_parameters()), mesh))
    parallel_assert(refused(outcome, "pp", "stages"), f"{outcome}")


@pytest.mark.parallel(nprocs=[2])
def test_data_parallel_train_step_refuses_pipeline_stages():
    mesh = comm.init(dp=1, pp=2)
    model = ParallelGPT(GPTConfig(**CONFIG), mesh)
    optimizer = AdamW(model.named_parameters())
    outcome = refusal(lambda: train_step(model, optimizer, *batch(), mesh, max_norm=1.0))
    parallel_assert(refused(outcome, "pp", "pipeline.train_step"), f"{outcome}")


@pytest.mark.parallel(nprocs=[2])
def test_data_parallel_train_step_refuses_buckets_over_dp_alone_with_context_parallelism():
    mesh = comm.init(dp=1, cp=2)
    model = ParallelGPT(GPTConfig(**CONFIG), mesh, context_parallel="ring")
    optimizer = AdamW(model.named_parameters())
    wrong = GradientBuckets(model.parameters(), mesh.dp)  # dp alone: the other cp rank's tokens are missed
    outcome = refusal(lambda: train_step(model, optimizer, *batch(), mesh, max_norm=1.0, gradients=wrong))
    parallel_assert(refused(outcome, "dp × cp", "dp_cp"), f"{outcome}")
    right = GradientBuckets(model.parameters(), mesh.dp_cp)
    outcome = refusal(lambda: train_step(model, optimizer, *batch(), mesh, max_norm=1.0, gradients=right))
    parallel_assert(outcome[0] is None, f"the right group is taken: {outcome}")


@pytest.mark.parallel(nprocs=[2])
def test_data_parallel_train_step_refuses_sharded_buckets_and_buckets_beside_zero():
    mesh = comm.init(dp=2)
    model = ParallelGPT(GPTConfig(**CONFIG), mesh)
    sharded = GradientBuckets(model.parameters(), mesh.dp, shard=True)
    outcome = refusal(lambda: train_step(model, AdamW(model.named_parameters()), *batch(), mesh, gradients=sharded))
    parallel_assert(refused(outcome, "shard"), f"{outcome}")
    zero = ZeroOptimizer(AdamW(model.named_parameters()), mesh)
    plain = GradientBuckets(model.parameters(), mesh.dp)
    outcome = refusal(lambda: train_step(model, zero, *batch(), mesh, gradients=plain))
    parallel_assert(refused(outcome, "ZeRO"), f"{outcome}")


@pytest.mark.parallel(nprocs=[4])
def test_data_parallel_train_step_refuses_a_zero_optimizer_built_over_other_replicas():
    """A ZeroOptimizer built on a dp × cp mesh averages over all 4 ranks; a step on a mesh whose
    replicas are 2 (dp = 2, tp = 2) would take that mean over ranks holding other tensor blocks."""
    built_on = comm.init(dp=2, cp=2)
    model = ParallelGPT(GPTConfig(**CONFIG), built_on, context_parallel="ring")
    optimizer = ZeroOptimizer(AdamW(model.named_parameters()), built_on)
    other = comm.init(dp=2, tp=2)
    outcome = refusal(lambda: train_step(model, optimizer, *batch(), other, max_norm=1.0))
    parallel_assert(refused(outcome, "build it on the step's mesh"), f"{outcome}")
