"""The GPU path: on a GPU, or on the strict CuPy stand-in (tests/cupy_standin) everywhere else.

What every GPU run relies on: CuPy arrays reach the host only when asked (``get``, ``to_host``, a
Python number from one element); rank r computes on GPU r % count; collectives stage device arrays
through the host by default, and hand them to a CUDA-aware MPI directly, once the stream has finished
writing them, when told to; train_gpt's check holds on CuPy with every parallelism; and
``MINITP_DEVICE=gpu`` selects CuPy in a launched job, or says in one line that there is no GPU. What
only the stand-in can show (how many buffers crossed, that a missing synchronisation is caught, a
machine without a GPU) is checked only on it.
"""
import os

import numpy
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

from minitp import backend, comm
from minitp.testing import max_error
from test_dist import all_ranks, rank_array, world
from test_train_gpt import tutorial
from tutorial_runner import assert_verdict, launch, needs_mpiexec

WORLD = MPI.COMM_WORLD
on_gpu = pytest.mark.parametrize("device", ["gpu"], indirect=True)  # conftest's fixture: skips without one


def standin():
    """The stand-in's record (cupy._standin) when the GPU half runs on it; None on real CuPy."""
    import cupy
    return getattr(cupy, "_standin", None)


def needs_standin(reason):
    return pytest.mark.skipif(backend.gpu_unavailable_reason() is not None or standin() is None,
                              reason=f"only the CuPy stand-in can show it: {reason}")


# -- CuPy's rules ---------------------------------------------------------------------------------

@on_gpu
def test_device_arrays_reach_the_host_only_when_asked(device):
    import cupy
    x = backend.xp.arange(6.0).reshape(2, 3)
    with pytest.raises(TypeError, match="Implicit conversion to a NumPy array is not allowed"):
        numpy.asarray(x)
    for mixed in (lambda: x + numpy.ones(3), lambda: numpy.ones(3) + x,
                  lambda: backend.xp.concatenate([x, numpy.ones((2, 3))])):
        with pytest.raises(TypeError):
            mixed()
    assert isinstance(backend.to_host(x), numpy.ndarray) and isinstance(cupy.asnumpy(x), numpy.ndarray)
    assert float(x.sum()) == 15.0 and x[1, 2].item() == 5.0  # one element: a Python number
    assert backend.array_module(x.sum()) is cupy  # a reduction stays on the device (0-d)
    assert backend.array_module(x * numpy.float64(2)) is cupy  # numpy scalars are operands
    assert backend.array_module(numpy.exp(x)) is cupy  # numpy's functions dispatch to CuPy's
    host = numpy.arange(3.0)
    on_device = backend.from_host(host)
    host[0] = 7.0
    assert backend.to_host(on_device)[0] == 0.0  # from_host copied
    assert backend.data_ptr(x.T) == backend.data_ptr(x) != backend.data_ptr(x.copy())


# -- where each rank computes ---------------------------------------------------------------------

@pytest.mark.parallel(nprocs=[1, 2, 3])
@on_gpu
def test_rank_r_computes_on_gpu_r_mod_the_device_count(device):
    import cupy
    count = cupy.cuda.runtime.getDeviceCount()
    parallel_assert(backend.local_rank() == WORLD.rank, "one node: the local rank is the rank")
    parallel_assert(cupy.cuda.Device().id == WORLD.rank % count,
                    f"rank {WORLD.rank} of {WORLD.size} is on {cupy.cuda.Device()} of {count}")
    parallel_assert(backend.xp.zeros(3).device.id == WORLD.rank % count)


# -- how device arrays reach MPI ------------------------------------------------------------------

@pytest.fixture(params=[False, True], ids=["host-staging", "cuda-aware"])
def cuda_aware(request):
    """minitp's transport setting, and the stand-in's MPI to match; both restored afterwards. A real
    CUDA-aware MPI is only assumed where MINITP_CUDA_AWARE_MPI=1 says there is one."""
    aware, record = request.param, standin()
    if aware and record is None and os.environ.get("MINITP_CUDA_AWARE_MPI") != "1":
        pytest.skip("CuPy with a GPU, but MINITP_CUDA_AWARE_MPI=1 does not say this MPI is CUDA-aware")
    previous = comm.runtime._cuda_aware
    comm.set_cuda_aware(aware)
    if record is not None:
        previous_mpi, record.cuda_aware_mpi = record.cuda_aware_mpi, aware
    yield aware
    comm.set_cuda_aware(previous)
    if record is not None:
        record.cuda_aware_mpi = previous_mpi


@pytest.mark.parallel(nprocs=[2, 3])
@on_gpu
def test_collectives_stage_through_the_host_or_hand_over_synchronised_device_buffers(device, cuda_aware):
    """Every collective, exchange and point-to-point op. Each input is computed just before the call
    (``x * 1``: work still queued on the stream), so a device buffer handed to MPI before the stream has
    run fails on the stand-in, as it would race on a GPU; by default no device buffer reaches MPI at all."""
    xp, n, r, group, record = backend.xp, WORLD.size, WORLD.rank, world(), standin()
    shape = (2 * n, 3 * n)
    x = xp.asarray(rank_array(r, shape))
    if record is not None:
        before = (record.buffers_to_mpi, record.copies_to_host)
    pending = comm.send(x * 1, group, dest=(r + 1) % n, match=5)  # the pipeline's, around the ring
    received = comm.recv(shape, "float64", group, source=(r - 1) % n, match=5)
    pending.wait()
    results = {
        "all_reduce": comm.all_reduce(x * 1, group),
        "all_gather": comm.all_gather(x * 1, group, axis=1),
        "reduce_scatter": comm.reduce_scatter(x * 1, group, axis=1),
        "broadcast": comm.broadcast(x * 1, group),
        "sendrecv": comm.sendrecv(x * 1, group, (r + 1) % n, (r - 1) % n),
        "all_to_all": comm.all_to_all(x * 1, group, split_axis=0, concat_axis=1),
        "recv": received,
    }
    if record is not None:
        handed, copied = record.buffers_to_mpi - before[0], record.copies_to_host - before[1]
        parallel_assert((handed > 0 and copied == 0) if cuda_aware else (handed == 0 and copied >= 7),
                        f"{handed} device buffers handed to MPI, {copied} copies to the host")
    everyone = all_ranks(shape)
    total = numpy.sum(everyone, axis=0)
    expected = {"all_reduce": total, "all_gather": numpy.concatenate(everyone, axis=1),
                "reduce_scatter": numpy.split(total, n, axis=1)[r], "broadcast": everyone[0],
                "sendrecv": everyone[(r - 1) % n], "recv": everyone[(r - 1) % n],
                "all_to_all": numpy.concatenate([block[2 * r:2 * r + 2] for block in everyone], axis=1)}
    for op, result in results.items():
        parallel_assert(backend.array_module(result) is xp, f"{op} returned {type(result)}")
        parallel_assert(max_error(result, expected[op]) <= 1e-15, op)
    parallel_assert(backend.to_host(x).tolist() == rank_array(r, shape).tolist(), "something wrote into x")
    parallel_assert(comm.transport() == ("CuPy device buffers (CUDA-aware MPI)" if cuda_aware
                                         else "CuPy via host staging"), comm.transport())


@pytest.mark.parallel(nprocs=[2])
@needs_standin("what a GPU would do with it is race, or crash")
@on_gpu
def test_the_standin_refuses_what_a_gpu_would_get_wrong(device):
    record, x = standin(), backend.xp.arange(4.0) * 2  # x * 2: still queued
    previous, record.cuda_aware_mpi = record.cuda_aware_mpi, True
    try:
        with pytest.raises(RuntimeError, match="ops were still queued"):
            WORLD.Allreduce([x, MPI.DOUBLE], [backend.xp.empty_like(x), MPI.DOUBLE])
        backend.synchronize()
        total = backend.xp.empty_like(x)
        WORLD.Allreduce([x, MPI.DOUBLE], [total, MPI.DOUBLE])
        parallel_assert(backend.to_host(total).tolist() == [WORLD.size * 2.0 * i for i in range(4)])
        record.cuda_aware_mpi = False  # an MPI without CUDA support: a device pointer would crash it
        with pytest.raises(TypeError, match="MPI here cannot read device memory"):
            WORLD.Allreduce([x, MPI.DOUBLE], [total, MPI.DOUBLE])
    finally:
        record.cuda_aware_mpi = previous


MESHES = {  # 4 ranks each: every parallelism minitp has, on device arrays
    "tp2-dp2-sp-tied": dict(tp=2, dp=2, sequence_parallel=True, tie_embeddings=True),
    "tp2-cp2-sp-zigzag": dict(tp=2, cp=2, sequence_parallel=True, cp_kind="zigzag"),  # ring attention
    "tp2-pp2-sp-1f1b": dict(tp=2, pp=2, sequence_parallel=True, microbatches=2, schedule="1f1b"),  # p2p
    "dp4-zero3": dict(dp=4, zero=3),  # parameters gathered per block, names for the saved weights
}


@pytest.mark.parallel(nprocs=[4])
@pytest.mark.parametrize("mesh, cuda_aware", [("tp2-dp2-sp-tied", False), ("tp2-dp2-sp-tied", True),
                                              ("tp2-cp2-sp-zigzag", True), ("tp2-pp2-sp-1f1b", True),
                                              ("dp4-zero3", True)],
                         indirect=["cuda_aware"])
@on_gpu
def test_train_gpt_check_holds_on_cupy_with_every_parallelism(device, mesh, cuda_aware):
    """All of minitp at once on the GPU path: tensor, sequence, data, context and pipeline parallelism,
    tied embeddings, dropout, 10 AdamW steps with gradient clipping -- each step's loss and gradient norm
    equal to the serial run's. The exchanges of ring attention and the pipeline's sends, which only
    these reach on CuPy, hand device buffers to the (stand-in's) CUDA-aware MPI."""
    train_gpt, options = tutorial(), MESHES[mesh]
    result = train_gpt.check(train_gpt.check_args(**options),
                             comm.init(**{axis: options.get(axis, 1) for axis in ("tp", "dp", "cp", "pp")}))
    parallel_assert(result.max_difference <= train_gpt.CHECK_TOLERANCE, f"{mesh}: {result}")
    parallel_assert(len(set(result.serial)) == 10, "the losses move: the check compares something")


@pytest.mark.parallel(nprocs=[4])
@pytest.mark.parametrize("mesh", ["tp2-dp2-sp-tied", "tp2-pp2-sp-1f1b", "dp4-zero3"])
@on_gpu
def test_train_gpt_fp16_check_holds_on_cupy(device, mesh):
    """Mixed precision on device arrays: an fp16 model (cuBLAS's products on a GPU, accumulated in fp32),
    fp32 masters (ZeRO-3: of each rank's slice), the loss scaled through the whole batch and the pipeline;
    every step within --check's 4u of the serial fp16 run on the same device."""
    train_gpt, options = tutorial(), MESHES[mesh]
    result = train_gpt.check(train_gpt.check_args(**options, dtype="fp16"),
                             comm.init(**{axis: options.get(axis, 1) for axis in ("tp", "dp", "cp", "pp")}))
    parallel_assert(result.passed, f"{mesh}: {result.worst_in_units:.2f} u: {result}")
    parallel_assert(len(set(result.serial)) >= 5, "the losses move: the check compares something")


# -- MINITP_DEVICE=gpu in a launched job ----------------------------------------------------------

gpu_or_standin = pytest.mark.skipif(backend.gpu_unavailable_reason() is not None,
                                    reason=f"{backend.gpu_unavailable_reason()}")


@needs_mpiexec
@gpu_or_standin
def test_minitp_device_gpu_runs_a_tutorial_on_cupy():
    run = launch("mlp.py", ranks=2, device="gpu")
    assert_verdict(run, "check: sharded MLP == serial MLP", 2)
    assert "| arrays: CuPy (GPU) | MPI: CuPy via host staging" in run.stdout.splitlines()[0], run.stdout


@needs_mpiexec
@gpu_or_standin
@needs_standin("a CUDA-aware MPI")
def test_a_cuda_aware_mpi_gets_the_device_buffers_of_a_tutorial():
    run = launch("transformer.py", ranks=2, device="gpu",
                 env={"MINITP_CUDA_AWARE_MPI": "1", "CUPY_STANDIN_CUDA_AWARE_MPI": "1"})
    assert_verdict(run, "check: TP+SP block == serial TransformerBlock", 2)
    assert "| arrays: CuPy (GPU) | MPI: CuPy device buffers (CUDA-aware MPI)" in run.stdout.splitlines()[0]


@needs_mpiexec
@gpu_or_standin
@needs_standin("a machine without a GPU")
def test_minitp_device_gpu_without_a_gpu_is_one_line_and_status_2():
    """minitp says it in one line, once for the job, and no traceback. What follows that line, if
    anything, is the launcher's own report of the exit status (Open MPI's mpiexec writes one; MPICH's
    does not)."""
    run = launch("mlp.py", ranks=2, device="gpu", env={"CUPY_STANDIN_DEVICES": "0"})
    assert run.returncode == 2, run.stdout + run.stderr
    assert run.stdout == "", run.stdout
    message = ("error: MINITP_DEVICE=gpu asked for, but no usable GPU "
               "(cudaErrorNoDevice: no CUDA-capable device is detected)")
    assert run.stderr.strip().splitlines()[0] == message, run.stderr
    assert run.stderr.count("MINITP_DEVICE") == 1 and "Traceback" not in run.stderr, run.stderr
