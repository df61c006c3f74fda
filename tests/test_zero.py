"""ZeRO-1 (minitp.parallel.zero) against plain data parallelism, in float64 with dropout on.

Proven on every mesh with dp > 1 (tp 1 and 2): the parameters after several AdamW steps equal plain data
parallelism's within 1e-12, blocking and overlapped; the optimizer state per rank is 1/d of plain's
(exactly, when d divides every bucket; over the d ranks, always exactly plain's); the dp bytes moved
equal one all-reduce's (from the collective log); checkpoints hold the full state and resume on another
dp and tp, and serially, with the same losses.
"""
import numpy
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

from minitp import checkpoint, dist
from minitp.nn import GPT, AdamW, GPTConfig
from minitp.parallel.buckets import GradientBuckets
from minitp.parallel.data_parallel import train_step
from minitp.parallel.gpt import ParallelGPT
from minitp.parallel.shard import gather_serial_state
from minitp.parallel.zero import ZeroOptimizer

WORLD = MPI.COMM_WORLD
SAME = 1e-12
CONFIG = dict(vocab=24, seq_len=8, hidden=16, heads=4, layers=2, dropout=0.1, seed=1, dtype=numpy.float64)
BUCKET_BYTES = 3000  # several buckets per model
STEPS = 4


def batch_at(step):
    windows = numpy.random.default_rng([7, step]).integers(0, CONFIG["vocab"], (CONFIG["seq_len"] + 1, 12))
    return windows[:-1], windows[1:]


def meshes():
    """(tp, dp) with tp × dp = the world, tp in {1, 2}, dp > 1."""
    return [(tp, WORLD.size // tp) for tp in (1, 2) if WORLD.size % tp == 0 and WORLD.size // tp > 1]


def run(mesh, zero, overlap, sequence_parallel=False, steps=STEPS, first=0, model=None, optimizer=None):
    """Train ``steps`` steps (plain or ZeRO, blocking or overlapped); the model, optimizer, losses, log."""
    if model is None:
        model = ParallelGPT(GPTConfig(**CONFIG), mesh, sequence_parallel=sequence_parallel, overlap=overlap)
        optimizer = AdamW(model.named_parameters(), lr=1e-2)
        if zero:
            optimizer = ZeroOptimizer(optimizer, mesh, BUCKET_BYTES, overlap=overlap)
    gradients = None if zero else GradientBuckets(model.parameters(), mesh.dp, BUCKET_BYTES, overlap=overlap)
    with dist.log_collectives() as log:
        losses = [train_step(model, optimizer, *batch_at(step), mesh, max_norm=0.5, gradients=gradients)[0]
                  for step in range(first, first + steps)]
    return model, optimizer, losses, log


def worst(a, b):
    return max(float(numpy.abs(a[name] - b[name]).max()) for name in b)


@pytest.mark.parallel(nprocs=[2, 3, 4])
@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_zero_parameters_equal_plain_data_parallel(sequence_parallel):
    for tp, dp in meshes():
        mesh = dist.init(tp=tp, dp=dp)
        plain, _, plain_losses, _ = run(mesh, zero=False, overlap=False, sequence_parallel=sequence_parallel)
        expected = gather_serial_state(plain, mesh.tp)
        for overlap in (False, True):
            model, optimizer, losses, _ = run(mesh, zero=True, overlap=overlap, sequence_parallel=sequence_parallel)
            error = worst(gather_serial_state(model, mesh.tp), expected)
            parallel_assert(error <= SAME, f"tp {tp} dp {dp} overlap {overlap}: parameters differ by {error:.1e}")
            parallel_assert(max(abs(a - b) for a, b in zip(losses, plain_losses)) <= SAME, f"{losses} vs {plain_losses}")
            parallel_assert(optimizer.step_count == STEPS and len(optimizer.gradients) > 1, "several buckets")


def state_bytes(optimizer):
    return sum(a.nbytes for entry in optimizer.state.values() for name, a in entry.items() if name != "step")


@pytest.mark.parallel(nprocs=[2, 3, 4])
def test_optimizer_state_is_one_dth_and_the_bytes_are_one_all_reduce():
    for tp, dp in meshes():
        mesh = dist.init(tp=tp, dp=dp)
        _, plain_optimizer, _, plain_log = run(mesh, zero=False, overlap=False, steps=1)
        _, zero, _, zero_log = run(mesh, zero=True, overlap=False, steps=1)
        plain_bytes, zero_bytes = state_bytes(plain_optimizer), zero.state_bytes()
        padding = sum(b.padded - b.size for b in zero.gradients.buckets)
        itemsize, buffers = 8, 2  # float64; AdamW's exp_avg and exp_avg_sq

        # over the d replicas the slices are exactly plain's state; each rank's is 1/d of it when no padding
        total = mesh.dp.comm.allreduce(zero_bytes)
        parallel_assert(total == plain_bytes, f"tp {tp} dp {dp}: {total} B over the replicas vs plain {plain_bytes} B")
        if padding == 0:
            parallel_assert(zero_bytes * dp == plain_bytes, f"dp {dp}: {zero_bytes} B vs plain {plain_bytes} B")
        else:
            parallel_assert(dp == 3 and max(mesh.dp.comm.allgather(zero_bytes)) * dp - plain_bytes
                            <= buffers * itemsize * padding * dp, f"padding {padding}: {zero_bytes} B")

        def moved(log, ops):
            return sum(r.ring_bytes for r in log if r.group == "dp" and r.op in ops
                       and ("gradients" in r.tag or "parameters" in r.tag))
        all_reduce = moved(plain_log, ("all_reduce",))
        scatter, gather = moved(zero_log, ("reduce_scatter",)), moved(zero_log, ("all_gather",))
        expected_extra = 2 * (dp - 1) / dp * padding * itemsize  # the padding crosses the wire too
        parallel_assert(scatter == gather and scatter + gather == all_reduce + expected_extra,
                        f"tp {tp} dp {dp}: reduce-scatter {scatter} + all-gather {gather} vs all-reduce {all_reduce}, "
                        f"padding {padding}")
        parallel_assert(zero_log.count("all_reduce", tag="gradients") == 0, "ZeRO all-reduces no gradient")


def rank0_path(tmp_path, name="zero.npz"):
    return WORLD.bcast(str(tmp_path / name), root=0)


@pytest.mark.parallel(nprocs=[4])
def test_a_zero_checkpoint_resumes_on_another_dp_and_tp_and_serially(tmp_path):
    path, plain_path = rank0_path(tmp_path), rank0_path(tmp_path, "plain.npz")
    mesh = dist.init(tp=1, dp=4)
    _, _, uninterrupted, _ = run(mesh, zero=False, overlap=False, steps=6)
    model, optimizer, before, _ = run(mesh, zero=True, overlap=True, steps=3)
    checkpoint.save(path, model, optimizer, mesh, step=3)
    plain, plain_optimizer, _, _ = run(mesh, zero=False, overlap=False, steps=3)
    checkpoint.save(plain_path, plain, plain_optimizer, mesh, step=3)

    mesh = dist.init(tp=2, dp=2)  # ZeRO again, on another dp and tp
    model = ParallelGPT(GPTConfig(**CONFIG), mesh)
    optimizer = ZeroOptimizer(AdamW(model.named_parameters(), lr=1e-2), mesh, BUCKET_BYTES)
    step = checkpoint.load(path, model, optimizer, mesh)
    _, _, resumed, _ = run(mesh, zero=True, overlap=False, steps=3, first=step, model=model, optimizer=optimizer)

    serial = GPT(GPTConfig(**CONFIG))  # and serially, with a plain AdamW
    serial_optimizer = AdamW(serial.named_parameters(), lr=1e-2)
    checkpoint.load(path, serial, serial_optimizer)
    resumed_serially = [train_step(serial, serial_optimizer, *batch_at(s), None, max_norm=0.5)[0] for s in range(3, 6)]

    parallel_assert(step == 3, f"the saved step: {step}")
    error = max(abs(a - b) for a, b in zip(before + resumed, uninterrupted))
    parallel_assert(error <= SAME, f"resumed at tp 2 dp 2: {before + resumed} vs {uninterrupted}")
    error = max(abs(a - b) for a, b in zip(before + resumed_serially, uninterrupted))
    parallel_assert(error <= SAME, f"resumed serially: {resumed_serially} vs {uninterrupted[3:]}")

    difference = None
    if WORLD.rank == 0:  # the same file as plain data parallelism's: the full state under the serial names
        with numpy.load(path) as zero_file, numpy.load(plain_path) as plain_file:
            zero_arrays = {k: zero_file[k] for k in zero_file.files}
            plain_arrays = {k: plain_file[k] for k in plain_file.files}
        numbers = [k for k, a in plain_arrays.items() if a.dtype.kind in "fiu"]
        if set(zero_arrays) == set(plain_arrays) and all(zero_arrays[k] == plain_arrays[k]
                                                         for k in plain_arrays if k not in numbers):
            difference = max(float(numpy.abs(zero_arrays[k] - plain_arrays[k]).max()) for k in numbers)
    difference = WORLD.bcast(difference, root=0)
    parallel_assert(difference is not None and difference <= SAME, f"ZeRO's file vs plain's: {difference}")


@pytest.mark.parallel(nprocs=[2])
@pytest.mark.parametrize("bucket_bytes", [0, -5, 0.0])
def test_a_bucket_size_that_is_not_positive_is_refused_on_every_rank(bucket_bytes):
    mesh = dist.init(tp=1, dp=2)
    model = ParallelGPT(GPTConfig(**CONFIG), mesh)
    with dist.log_collectives() as log:
        try:
            ZeroOptimizer(AdamW(model.named_parameters()), mesh, bucket_bytes)
            error = None
        except ValueError as raised:
            error = str(raised)
    parallel_assert(error is not None and "bucket size" in error and len(log) == 0, f"ValueError: {error}")
