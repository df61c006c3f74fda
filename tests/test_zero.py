"""ZeRO-1 (minitp.parallel.data.zero) against plain data parallelism, in float64 with dropout on.

Proven on every mesh with dp > 1 (tp 1 and 2): the parameters after several AdamW steps equal plain data
parallelism's within 1e-12, blocking and overlapped; the optimizer state per rank is 1/d of plain's
(exactly, when d divides every bucket; over the d ranks, always exactly plain's); the dp bytes moved
equal one all-reduce's (from the collective log); checkpoints hold the full state and resume on another
dp and tp, and serially, with the same losses. With context parallelism (cp = 2; dp 1 and 2) ZeRO-1
shards over dp × cp and equals the serial run. And what makes it ZeRO-1 rather than plain data
parallelism, counted by hand: each rank's moments (the padding rule), one reduce-scatter and one
all-gather per padded bucket, no gradient all-reduce.
"""
import numpy
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

from minitp import checkpoint, comm
from minitp.nn import GPT, AdamW, GPTConfig
from minitp.parallel.data.sync import AllReduceGradients
from minitp.training import train_step
from minitp.parallel.gpt import ParallelGPT
from minitp.parallel.tensor.shard import gather_serial_state
from minitp.parallel.data.zero import ZeroOptimizer

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
    gradients = None if zero else AllReduceGradients(model, mesh, BUCKET_BYTES, overlap=overlap)
    with comm.log_collectives() as log:
        losses = [train_step(model, optimizer, *batch_at(step), mesh, max_norm=0.5, gradients=gradients)[0]
                  for step in range(first, first + steps)]
    return model, optimizer, losses, log


def worst(a, b):
    return max(float(numpy.abs(a[name] - b[name]).max()) for name in b)


@pytest.mark.parallel(nprocs=[2, 3, 4])
@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_zero_parameters_equal_plain_data_parallel(sequence_parallel):
    for tp, dp in meshes():
        mesh = comm.init(tp=tp, dp=dp)
        plain, _, plain_losses, _ = run(mesh, zero=False, overlap=False, sequence_parallel=sequence_parallel)
        expected = gather_serial_state(plain, mesh.tp)
        for overlap in (False, True):
            model, optimizer, losses, _ = run(mesh, zero=True, overlap=overlap, sequence_parallel=sequence_parallel)
            error = worst(gather_serial_state(model, mesh.tp), expected)
            parallel_assert(error <= SAME, f"tp {tp} dp {dp} overlap {overlap}: parameters differ by {error:.1e}")
            parallel_assert(max(abs(a - b) for a, b in zip(losses, plain_losses)) <= SAME, f"{losses} vs {plain_losses}")
            parallel_assert(optimizer.step_count == STEPS and len(optimizer.gradients) > 1, "several buckets")


@pytest.mark.parallel(nprocs=[2, 3, 4])
def test_optimizer_state_is_one_dth_and_the_bytes_are_one_all_reduce():
    for tp, dp in meshes():
        mesh = comm.init(tp=tp, dp=dp)
        _, plain_optimizer, _, plain_log = run(mesh, zero=False, overlap=False, steps=1)
        _, zero, _, zero_log = run(mesh, zero=True, overlap=False, steps=1)
        plain_bytes, zero_bytes = plain_optimizer.state_bytes(), zero.state_bytes()
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
    mesh = comm.init(tp=1, dp=4)
    _, _, uninterrupted, _ = run(mesh, zero=False, overlap=False, steps=6)
    model, optimizer, before, _ = run(mesh, zero=True, overlap=True, steps=3)
    checkpoint.save(path, model, optimizer, mesh, step=3)
    plain, plain_optimizer, _, _ = run(mesh, zero=False, overlap=False, steps=3)
    checkpoint.save(plain_path, plain, plain_optimizer, mesh, step=3)

    mesh = comm.init(tp=2, dp=2)  # ZeRO again, on another dp and tp
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
    mesh = comm.init(tp=1, dp=2)
    model = ParallelGPT(GPTConfig(**CONFIG), mesh)
    with comm.log_collectives() as log:
        try:
            ZeroOptimizer(AdamW(model.named_parameters()), mesh, bucket_bytes)
            error = None
        except ValueError as raised:
            error = str(raised)
    parallel_assert(error is not None and "bucket size" in error and len(log) == 0, f"ValueError: {error}")


# -- context parallelism: ZeRO-1 over dp × cp, against the serial model ------------------------------

# 8 heads and 16 tokens, as test_context_parallel_gpt.py: cp = 2 splits them, Ulysses included
CP_CONFIG = dict(vocab=24, seq_len=16, hidden=16, heads=8, layers=2, dropout=0.1, seed=5, dtype=numpy.float64)
CP_STEPS = 3


def cp_batch_at(step):
    windows = numpy.random.default_rng([9, step]).integers(0, CP_CONFIG["vocab"], (CP_CONFIG["seq_len"] + 1, 4))
    return windows[:-1], windows[1:]


def cp_meshes():
    """(dp, cp) with cp = 2 on this world size: dp = 1, cp = 2 on 2 ranks; dp = 2, cp = 2 on 4."""
    return [(WORLD.size // 2, 2)] if WORLD.size in (2, 4) else []


@pytest.mark.parallel(nprocs=[2, 4])
@pytest.mark.parametrize("kind", ["ring", "zigzag", "ulysses"])
def test_zero_with_context_parallelism_equals_the_serial_run(kind):
    """With cp > 1 every parameter is replicated over dp × cp, and rank (dp, cp) holds the gradient of
    its own tokens' mean loss: the gradient of the global batch is the mean over all dp·cp ranks. ZeRO-1
    shards over that group (``replicas(mesh)``), so the reduce-scatter sums every token's contribution
    and the norm adds every slice once. Sharding over dp alone would miss the other cp ranks' tokens:
    the mean would be of this cp rank's tokens only (step 1's norm was 1.31 here instead of serial's
    1.06). Compared with the serial run in float64: the losses, the gradient norms before clipping,
    and every parameter after the steps."""
    serial = GPT(GPTConfig(**CP_CONFIG))
    serial_optimizer = AdamW(serial.named_parameters(), lr=1e-2)
    expected = [train_step(serial, serial_optimizer, *cp_batch_at(step), None, max_norm=0.5)
                for step in range(CP_STEPS)]
    expected_state = {name: p.data for name, p in serial.named_parameters()}
    for dp, cp in cp_meshes():
        mesh = comm.init(tp=1, dp=dp, cp=cp)
        model = ParallelGPT(GPTConfig(**CP_CONFIG), mesh, context_parallel=kind)
        optimizer = ZeroOptimizer(AdamW(model.named_parameters(), lr=1e-2), mesh, BUCKET_BYTES)
        with comm.log_collectives() as log:
            got = [train_step(model, optimizer, *cp_batch_at(step), mesh, max_norm=0.5) for step in range(CP_STEPS)]
        where = f"dp {dp} cp {cp} {kind}"
        losses = max(abs(a[0] - b[0]) for a, b in zip(got, expected))
        norms = max(abs(a[1] - b[1]) for a, b in zip(got, expected))
        parallel_assert(losses <= SAME and norms <= SAME, f"{where}: (loss, norm) {got} vs serial {expected}")
        error = worst(gather_serial_state(model, mesh.tp), expected_state)
        parallel_assert(error <= SAME, f"{where}: parameters differ from serial by {error:.1e}")
        groups = {r.group for r in log.select("reduce_scatter", "gradients") + log.select("all_gather", "parameters")}
        parallel_assert(groups == {"dp_cp"}, f"{where}: ZeRO-1's collectives ran over {groups}, not dp × cp")


# -- ZeRO-1 really shards: the state per rank and the collectives, counted by hand ----------------------

@pytest.mark.parallel(nprocs=[2, 3, 4])
def test_zero_keeps_one_dth_of_the_moments_and_reduce_scatters_and_all_gathers():
    """What tells ZeRO-1 from plain data parallelism, counted by hand (a ZeroOptimizer that all-reduced
    and kept every moment would still equal plain data parallelism's numbers; it fails here).

    The padding rule: a bucket of n elements is padded to d·⌈n/d⌉, and rank r owns the flat range
    [r·⌈n/d⌉, (r+1)·⌈n/d⌉) of it; the padding (at the end) has no parameter and so no moments. So rank
    r holds min(⌈n/d⌉, max(0, n - r·⌈n/d⌉)) elements of each of AdamW's two moments per bucket, at
    most 1/d of the n (rounded up), and over the d ranks exactly n. On the wire per bucket: one
    reduce-scatter of the padded gradients, d·⌈n/d⌉·8 B, and one all-gather of the parameters, the
    same bytes; (d-1)/d of them leave each rank. No gradient all-reduce: the only all-reduces are the
    norm's two numbers and the loss's one."""
    d, r = WORLD.size, WORLD.rank
    mesh = comm.init(tp=1, dp=d)
    model, optimizer, _, log = run(mesh, zero=True, overlap=False, steps=1)
    sizes = [sum(p.size for p in bucket.parameters) for bucket in optimizer.gradients.buckets]
    parameters = sum(p.size for p in model.parameters())
    parallel_assert(sum(sizes) == parameters and len(sizes) > 1, f"buckets {sizes} vs {parameters} parameters")

    per_rank = [-(-n // d) for n in sizes]  # ⌈n/d⌉
    mine = sum(min(k, max(0, n - r * k)) for n, k in zip(sizes, per_rank))
    moments = {name: sum(entry[name].size for entry in optimizer.state.values())
               for name in ("exp_avg", "exp_avg_sq")}
    parallel_assert(moments == {"exp_avg": mine, "exp_avg_sq": mine},
                    f"rank {r}: moments {moments}, by hand {mine} elements each of {parameters} parameters")
    parallel_assert(mine <= sum(per_rank) and d * sum(per_rank) - parameters < d * len(sizes),
                    f"rank {r}: {mine} elements, ⌈n/d⌉ per bucket {per_rank}")
    parallel_assert(mesh.dp.comm.allreduce(mine) == parameters, "over the d ranks: every parameter's moments once")

    itemsize, padded = 8, [d * k for k in per_rank]
    for op, tag in (("reduce_scatter", "gradients"), ("all_gather", "parameters")):
        records = log.select(op, tag)
        seen = [(rec.group, rec.group_size, rec.payload_bytes) for rec in records]  # blocking: bucket order
        parallel_assert(seen == [("dp", d, n * itemsize) for n in padded], f"{op}: {seen} vs padded buckets {padded}")
        ring = sum(rec.ring_bytes for rec in records)
        parallel_assert(ring == (d - 1) * sum(padded) * itemsize // d, f"{op}: {ring} B per rank")
    reductions = [rec for rec in log.select("all_reduce") if rec.group == "dp"]  # tp's are of size 1 here
    parallel_assert([(rec.tag, rec.payload_bytes) for rec in reductions]
                    == [("grad norm (ZeRO slices)", 2 * itemsize), ("loss", itemsize)],
                    f"no gradient all-reduce over dp: {[(rec.tag, rec.payload_bytes) for rec in reductions]}")
