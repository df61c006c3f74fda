"""How much faster is the block on t tensor-parallel ranks? Strong scaling (a part of ``speed.py``).

The block of ``speed_block.py``, at the same size, with tensor parallelism (TP) and with TP + sequence
parallelism (TP+SP) on t = 1, 2, 4 ranks in one tensor-parallel group, one BLAS thread per rank
(``mpiexec -n t``): time per step and speedup over the plain serial ``TransformerBlock``, which is timed
in the t = 1 launch turn about with the t = 1 TP and TP+SP blocks.

Beside them each launch times the block's GEMMs alone at one rank's shard sizes (``speed_blas.block_gemms``
with ``t``), on all t ranks at once: the speedup those reach is the ceiling for the block's, set by the
machine (cores that share memory bandwidth and cache, a clock that drops when every core is busy) and by
BLAS on smaller matrices, before any communication or elementwise work. The TP blocks' speedups read
against it.

``worker`` runs inside the MPI launch that ``speed.py`` makes for each rank count.
"""
import os

import numpy

import harness
from speed_blas import block_gemms, replay_gemms
from speed_block import block_shape

LABELS = ("TP", "TP+SP")
GEMMS = "GEMMs alone"


def worker(args):
    """Time the TP (and TP+SP) block on all the world's ranks, one tensor-parallel group."""
    from mpi4py import MPI

    from minitp import backend, dist
    from minitp.autograd import Tensor
    from minitp.nn import TransformerBlock
    from minitp.parallel import ParallelTransformerBlock
    if args.device == "gpu":
        backend.use("gpu")
    mesh = dist.init(tp=MPI.COMM_WORLD.size)
    shape = block_shape(args)
    repeats = 1 if args.quick else args.repeats
    s, b, h, a = shape["s"], shape["b"], shape["h"], shape["a"]
    rng = numpy.random.default_rng(0)
    x_full = rng.standard_normal((s, b, h)).astype(numpy.float32)
    upstream_full = rng.standard_normal((s, b, h)).astype(numpy.float32)

    def timed(block, cut):
        x, upstream = backend.from_host(cut(x_full)), backend.from_host(cut(upstream_full))

        def step():
            block(Tensor(x, requires_grad=True)).backward(upstream)
            block.zero_grad()
        return step

    def whole(array):
        return array

    def shard(array):
        return numpy.ascontiguousarray(dist.split(array, mesh.tp, 0))

    steps = {}
    if mesh.tp_size == 1:  # the reference: the plain serial block, in the same conditions
        steps["serial"] = timed(TransformerBlock(h, a, dtype=numpy.float32), whole)
    for label, sequence_parallel in (("TP", False), ("TP+SP", True)):
        steps[label] = timed(ParallelTransformerBlock(h, a, dtype=numpy.float32, sequence_parallel=sequence_parallel,
                                                      group=mesh.tp), shard if sequence_parallel else whole)
    steps[GEMMS] = replay_gemms(backend.xp, block_gemms(s, b, h, a, t=mesh.tp_size), numpy.float32)

    def barrier():  # a step ends when its slowest rank ends
        backend.synchronize()
        MPI.COMM_WORLD.Barrier()
    times = harness.interleaved_best(steps, repeats, synchronize=barrier)
    return {"t": mesh.tp_size, "times": times}


# -- the report -------------------------------------------------------------------------------------

def serial_time(scaling):
    """The serial block's time, from the t = 1 launch; None if it did not run."""
    return next((e["times"]["serial"] for e in scaling if "serial" in e["times"]), None)


def gemm_speedup(scaling, entry):
    """How much faster the GEMMs alone ran on ``entry``'s t ranks than on one: the block's ceiling."""
    one = next((e for e in scaling if e["t"] == 1), None)
    return one["times"][GEMMS] / entry["times"][GEMMS] if one else None


def target(scaling):
    """The scaling target (t = 2 at least 1.9× faster than serial), with the figures measured here and
    the ceiling the GEMMs alone reached."""
    serial = serial_time(scaling)
    two = next((e for e in scaling if e["t"] == 2), None)
    if not (serial and two):
        return []
    speedups = {label: serial / two["times"][label] for label in LABELS}
    met = all(value >= 1.9 for value in speedups.values())
    ceiling = gemm_speedup(scaling, two)
    return [f"- t = 2 at least 1.9× faster than serial, one thread per rank: TP {speedups['TP']:.2f}×, "
            f"TP+SP {speedups['TP+SP']:.2f}× ({'met' if met else 'NOT met'}); the block's GEMMs alone, "
            f"sharded the same way: {ceiling:.2f}× (the ceiling on this machine)."]


def render(scaling):
    if not scaling:
        return []
    lines = ["## Strong scaling: the block with tensor parallelism, one BLAS thread per rank", "",
             "`mpiexec -n t`, the same block and size, t ranks in one tensor-parallel group; a step ends when "
             "its slowest rank does (a barrier). Speedup against the plain serial `TransformerBlock`, timed "
             "in the t = 1 launch, turn about with the t = 1 TP and TP+SP blocks. The last column is the "
             "block's GEMMs alone at one rank's shard sizes, run on all t ranks at once, and their speedup "
             "over the whole GEMMs on one rank: the ceiling the machine and BLAS set for the block's "
             "speedup, before any communication or elementwise work.", ""]
    serial = serial_time(scaling)
    rows = []
    for entry in scaling:
        cells = [entry["t"]]
        for label in LABELS:
            seconds = entry["times"][label]
            speedup = f" ({serial / seconds:.2f}×)" if serial else ""
            cells.append(f"{harness.ms(seconds)} ms{speedup}")
        ceiling = gemm_speedup(scaling, entry)
        cells.append(f"{harness.ms(entry['times'][GEMMS])} ms" + (f" ({ceiling:.2f}×)" if ceiling else ""))
        rows.append(cells)
    if serial:
        rows.insert(0, ["serial", f"{harness.ms(serial)} ms (1.00×)", "", ""])
    header = ["t"] + [f"{label}: ms / step (speedup)" for label in LABELS] + [f"{GEMMS}: ms (speedup)"]
    lines += [harness.table(header, rows, "rrrr"), ""]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    oversubscribed = [entry["t"] for entry in scaling if entry["t"] > cores]
    if oversubscribed:
        lines += [f"t = {', '.join(map(str, oversubscribed))} runs more ranks than this machine's {cores} "
                  "cores: those ranks share cores, so the time there measures contention, not scaling.", ""]
    return lines


PANELS = 2  # the plot's panels: time per step, speedup


def draw(time_axis, speedup_axis, scaling):
    """Time per step and speedup against t, with the ideal lines and the GEMMs' ceiling."""
    ts = [entry["t"] for entry in scaling]
    reference = serial_time(scaling) or scaling[0]["times"]["TP"]
    for label in LABELS:
        times = [entry["times"][label] for entry in scaling]
        time_axis.plot(ts, [1e3 * t for t in times], "o-", label=label)
        speedup_axis.plot(ts, [reference / t for t in times], "o-", label=label)
    time_axis.plot(ts, [1e3 * reference / t for t in ts], "k--", lw=1, label="ideal (serial / t)")
    speedup_axis.plot(ts, ts, "k--", lw=1, label="ideal")
    if any(entry["t"] == 1 for entry in scaling):
        speedup_axis.plot(ts, [gemm_speedup(scaling, entry) for entry in scaling], "k:", marker="x",
                          label="ceiling: the GEMMs alone")
    time_axis.set(xlabel="tensor-parallel ranks t", ylabel="ms per forward+backward", xticks=ts,
                  title="strong scaling: time per step")
    speedup_axis.set(xlabel="tensor-parallel ranks t", ylabel="speedup over the serial block", xticks=ts,
                     title="strong scaling: speedup")
    for axis in (time_axis, speedup_axis):
        axis.grid(alpha=0.3)
        axis.legend()
