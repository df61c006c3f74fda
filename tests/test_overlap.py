"""Communication overlapped with computation stays exact.

Data parallel: every bucket's all-reduce starts inside backward (from the engine's gradient hooks), and
the gradients after ``wait()`` are the blocking path's, bit for bit. Tensor parallel: the column-parallel
layers' asynchronous backward (dX reduced during the dA GEMM) gives the serial gradients within 1e-12,
with or without sequence parallelism and tied embeddings, moving the same bytes as the blocking layers.
"""
import numpy
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

from minitp import Tensor, comm, trace, trace_report
from minitp.nn import GPT, GPTConfig, Linear
from minitp.parallel.data.buckets import GradientBuckets
from minitp.parallel.data.data_parallel import split_batch
from minitp.parallel.data.sync import all_reduce_gradients
from minitp.parallel.gpt import ParallelGPT
from minitp.parallel.tensor.shard import gather_serial_grads
from minitp.testing import max_error

WORLD = MPI.COMM_WORLD
SAME = 1e-12
CONFIG = dict(vocab=24, seq_len=12, hidden=24, heads=12, layers=2, dropout=0.1, seed=5, dtype=numpy.float64)


def batch(shape, seed=0):
    windows = numpy.random.default_rng(seed).integers(0, CONFIG["vocab"], (shape[0] + 1, shape[1]))
    return windows[:-1], windows[1:]


@pytest.mark.parallel(nprocs=[2, 4])
def test_data_parallel_buckets_start_inside_backward_and_equal_the_blocking_reduction():
    mesh = comm.init(tp=1, dp=WORLD.size)
    ids, targets = batch((12, 4 * WORLD.size), seed=1)
    blocking = ParallelGPT(GPTConfig(**CONFIG), mesh)
    blocking.loss(split_batch(ids, mesh), split_batch(targets, mesh)).backward()
    all_reduce_gradients(blocking, mesh, bucket_bytes=3000)
    expected = {name: p.grad for name, p in blocking.named_parameters()}

    model = ParallelGPT(GPTConfig(**CONFIG), mesh)
    buckets = GradientBuckets(model.parameters(), mesh.dp, 3000, overlap=True)
    with comm.log_collectives() as log, comm.record_timeline(mesh) as timeline:
        loss = model.loss(split_batch(ids, mesh), split_batch(targets, mesh))
        with trace.span("backward", "phase"):
            loss.backward()
        buckets.wait()
    exact = all(numpy.array_equal(p.grad, expected[name]) for name, p in model.named_parameters())
    parallel_assert(exact, "the overlapped reduction equals the blocking one, bit for bit")
    started = [r for r in log if "gradients" in r.tag]
    parallel_assert(len(started) == len(buckets) > 1 and not any(r.blocking for r in started), log.table())

    inside = None
    if timeline.trace is not None:  # rank 0 holds every rank's timeline: did each start inside backward?
        inside = True
        for _, spans in trace_report.spans_by_rank(timeline.trace).values():
            backward = [(s, e) for c, s, e, name, _ in spans if c == "phase" and name == "backward"][0]
            starts = [s for c, s, _, _, args in spans if c == "inflight" and "gradients" in args["tag"]]
            inside &= len(starts) == len(buckets) and all(backward[0] <= s <= backward[1] for s in starts)
    parallel_assert(WORLD.bcast(inside, root=0), "every bucket's all-reduce started inside backward")


@pytest.mark.parallel(nprocs=[2])
def test_a_parameter_without_a_gradient_keeps_none_and_a_second_backward_is_refused():
    mesh = comm.init(tp=1, dp=2)
    used, unused = Linear(3, 2, dtype=numpy.float64, seed=1), Linear(3, 2, dtype=numpy.float64, seed=2)
    parameters = used.parameters() + unused.parameters()
    buckets = GradientBuckets(parameters, mesh.dp, bucket_bytes=1 << 20, overlap=True)
    x = Tensor(numpy.full((4, 3), 1.0 + WORLD.rank))
    used(x).sum().backward()
    buckets.wait()  # the bucket never completed in backward: wait() starts it, zeros for the missing ones
    parallel_assert(unused.weight.grad is None and unused.bias.grad is None, "no gradient stays no gradient")
    parallel_assert(numpy.allclose(used.weight.grad, numpy.full((3, 2), 4 * 1.5)), f"{used.weight.grad}")

    for p in parameters:
        p.grad = None
    for p in (used.weight, used.bias, unused.weight, unused.bias):
        (p * 2.0).sum().backward()  # every gradient in: the bucket starts
    try:
        (used.weight * 2.0).sum().backward()
        message = None
    except RuntimeError as error:
        message = str(error)
    buckets.wait()
    parallel_assert(message is not None and "more often than the 1 backward" in message, f"RuntimeError: {message}")


@pytest.mark.parallel(nprocs=[1, 2, 4])
@pytest.mark.parametrize("sequence_parallel", [False, True])
@pytest.mark.parametrize("tie_embeddings", [False, True])
def test_async_linear_backward_equals_serial_with_the_same_bytes(sequence_parallel, tie_embeddings):
    mesh = comm.init(tp=WORLD.size)
    ids, targets = batch((12, 3))
    config = GPTConfig(**CONFIG, tie_embeddings=tie_embeddings)
    serial = GPT(config)
    serial.loss(ids, targets).backward()
    logs = {}
    for overlap in (False, True):
        model = ParallelGPT(config, mesh, sequence_parallel=sequence_parallel, overlap=overlap)
        with comm.log_collectives() as logs[overlap]:
            model.loss(ids, targets).backward()
        grads = gather_serial_grads(model, mesh.tp)
        error = max(max_error(grads[name], p.grad) for name, p in serial.named_parameters())
        parallel_assert(error <= SAME, f"overlap {overlap}: gradients {error:.1e} from serial")

    def summary(log):
        return sorted((r.op, r.shape, r.ring_bytes, r.tag) for r in log)
    blocking = summary(logs[False])
    if sequence_parallel and tie_embeddings:
        # the blocking tied head keeps the gathered X for dA; the asynchronous one keeps X's sequence
        # block, as every column-parallel layer does under SP, and gathers it again: one all-gather more
        blocking = sorted(blocking + [r for r in summary(logs[True]) if r[-1] == "lm_head (tied): g backward: "
                                                                                   "re-gather X for dA"])
    parallel_assert(summary(logs[True]) == blocking, "the same collectives, bytes and tags")
    started = [r for r in logs[True] if not r.blocking]
    layers = 2 * CONFIG["layers"] + 1  # qkv and fc1 per block, and the LM head (tied or not)
    per_layer = 2 if sequence_parallel else 1  # dX's reduction, and under SP the re-gather of X for dA
    parallel_assert(len(started) == per_layer * layers, f"{len(started)} non-blocking:\n{logs[True].table()}")
