"""How much faster is the block on t tensor-parallel ranks? Strong scaling (a part of ``speed.py``).

The block of ``speed_block.py``, at the same size, with tensor parallelism (TP) and with TP + sequence
parallelism (TP+SP) on t = 1, 2, 4 ranks in one tensor-parallel group, one BLAS thread per rank
(``mpiexec -n t``): time per step and speedup over the plain serial ``TransformerBlock``.

Every ratio is taken inside one launch, turn about (``harness.interleaved_best``): the serial block runs
on rank 0 while the other ranks wait asleep, then the TP blocks on all t ranks, and so on in turn. (Timed
in separate launches, the serial and t = 2 steps met different loads on a shared machine, and the
speedup moved 1.44-2.08x between runs.)

Beside them, the block's GEMMs alone: whole on rank 0 (the others asleep), and at one rank's shard sizes
(``speed_blas.block_gemms`` with ``t``) on all t ranks at once. Their speedup is the ceiling for the
block's, set by the machine (cores that share memory bandwidth and cache, a clock that drops when every
core is busy) and by BLAS on smaller matrices, before any communication or elementwise work.

``worker`` runs inside the MPI launch that ``speed.py`` makes for each rank count.
"""
import os
import time

import numpy

import harness
from speed_blas import block_gemms, replay_gemms
from speed_block import block_shape

LABELS = ("TP", "TP+SP")
GEMMS_WHOLE, GEMMS = "GEMMs, whole, one rank", "GEMMs, one shard per rank"


def worker(args):
    """Time, turn about: the serial block and its GEMMs on rank 0 alone, the TP and TP+SP blocks and the
    sharded GEMMs on all the world's ranks (one tensor-parallel group)."""
    from mpi4py import MPI

    from minitp import backend, comm
    from minitp.autograd import Tensor
    from minitp.nn import TransformerBlock
    from minitp.parallel import ParallelTransformerBlock
    if args.device == "gpu":
        backend.use("gpu")
    mesh = comm.init(tp=MPI.COMM_WORLD.size)
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
        return numpy.ascontiguousarray(comm.split(array, mesh.tp, 0))

    def alone(make_step):
        """Rank 0 runs the step (only it builds it); the others wait asleep, not in a spinning MPI wait
        that would keep a core busy beside it. (They wake every 0.2 ms: at most that much is added to a
        step of hundreds of ms.)"""
        step = make_step() if mesh.tp.rank == 0 else None

        def run():
            if step is not None:
                step()
            done = MPI.COMM_WORLD.Ibarrier()
            while not done.Test():
                time.sleep(2e-4)
        return run

    steps = {"serial": alone(lambda: timed(TransformerBlock(h, a, dtype=numpy.float32), whole))}
    for label, sequence_parallel in (("TP", False), ("TP+SP", True)):
        steps[label] = timed(ParallelTransformerBlock(h, a, dtype=numpy.float32, sequence_parallel=sequence_parallel,
                                                      group=mesh.tp), shard if sequence_parallel else whole)
    steps[GEMMS_WHOLE] = alone(lambda: replay_gemms(backend.xp, block_gemms(s, b, h, a), numpy.float32))
    steps[GEMMS] = replay_gemms(backend.xp, block_gemms(s, b, h, a, t=mesh.tp_size), numpy.float32)

    def barrier():  # a step ends when its slowest rank ends
        backend.synchronize()
        MPI.COMM_WORLD.Barrier()
    times = harness.interleaved_best(steps, repeats, synchronize=barrier)
    return {"t": mesh.tp_size, "times": times}


# -- the report -------------------------------------------------------------------------------------

def speedup(entry, label):
    """How much faster ``label`` ran on the entry's t ranks than the serial block on one, same launch."""
    return entry["times"]["serial"] / entry["times"][label]


def ceiling(entry):
    """How much faster the sharded GEMMs ran on t ranks than the whole ones on one: the block's ceiling."""
    return entry["times"][GEMMS_WHOLE] / entry["times"][GEMMS]


def target(scaling):
    """The scaling target (t = 2 at least 1.9× faster than serial), with the figures measured here and
    the ceiling the GEMMs alone reached."""
    two = next((e for e in scaling if e["t"] == 2), None)
    if two is None:
        return []
    met = all(speedup(two, label) >= 1.9 for label in LABELS)
    return [f"- t = 2 at least 1.9× faster than serial, one thread per rank: TP {speedup(two, 'TP'):.2f}×, "
            f"TP+SP {speedup(two, 'TP+SP'):.2f}× ({'met' if met else 'NOT met'}); the block's GEMMs alone, "
            f"sharded the same way: {ceiling(two):.2f}× (the ceiling on this machine)."]


def render(scaling):
    if not scaling:
        return []
    lines = ["## Strong scaling: the block with tensor parallelism, one BLAS thread per rank", "",
             "`mpiexec -n t`, the same block and size, t ranks in one tensor-parallel group; a step ends when "
             "its slowest rank does (a barrier). Each launch times, turn about: the plain serial "
             "`TransformerBlock` on rank 0 while the others wait asleep, the TP and TP+SP blocks on all t "
             "ranks, and the block's GEMMs alone -- whole on rank 0, then one rank's shard of them on every "
             "rank at once. Each speedup is a ratio within one launch. The GEMMs' speedup is the ceiling the "
             "machine and BLAS set for the block's, before any communication or elementwise work.", ""]
    rows = []
    for entry in scaling:
        times = entry["times"]
        rows.append([entry["t"], f"{harness.ms(times['serial'])} ms"] +
                    [f"{harness.ms(times[label])} ms ({speedup(entry, label):.2f}×)" for label in LABELS] +
                    [f"{harness.ms(times[GEMMS_WHOLE])} → {harness.ms(times[GEMMS])} ms ({ceiling(entry):.2f}×)"])
    header = (["t", "serial, rank 0 alone"] + [f"{label}: ms / step (speedup)" for label in LABELS] +
              ["GEMMs alone: whole → one shard per rank (speedup)"])
    lines += [harness.table(header, rows, "rrrrr"), ""]
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
    for label in LABELS:
        time_axis.plot(ts, [1e3 * entry["times"][label] for entry in scaling], "o-", label=label)
        speedup_axis.plot(ts, [speedup(entry, label) for entry in scaling], "o-", label=label)
    time_axis.plot(ts, [1e3 * entry["times"]["serial"] / entry["t"] for entry in scaling], "k--", lw=1,
                   label="ideal (serial / t)")
    speedup_axis.plot(ts, ts, "k--", lw=1, label="ideal")
    speedup_axis.plot(ts, [ceiling(entry) for entry in scaling], "k:", marker="x", label="ceiling: the GEMMs alone")
    time_axis.set(xlabel="tensor-parallel ranks t", ylabel="ms per forward+backward", xticks=ts,
                  title="strong scaling: time per step")
    speedup_axis.set(xlabel="tensor-parallel ranks t", ylabel="speedup over the serial block", xticks=ts,
                     title="strong scaling: speedup")
    for axis in (time_axis, speedup_axis):
        axis.grid(alpha=0.3)
        axis.legend()
