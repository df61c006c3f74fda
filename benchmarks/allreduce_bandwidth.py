"""How fast is ``comm.all_reduce``, by message size? Bus bandwidth on 2 and 4 ranks (a part of ``speed.py``).

Bus bandwidth = 2(n-1)/n · S / time: the bytes each rank sends in a ring all-reduce of S bytes, per
second, comparable across n. With CuPy the transport (host staging or CUDA-aware MPI) is named in the
table, so ``benchmarks/gpu_check.sh`` can compare the two.

``worker`` runs inside the MPI launch that ``speed.py`` makes for each rank count.
"""
import numpy

import harness


def worker(args):
    """Seconds per ``comm.all_reduce`` of each message size on the world's ranks (float32)."""
    from mpi4py import MPI

    from minitp import backend, comm
    if args.device == "gpu":
        backend.use("gpu")
    mesh = comm.init(tp=MPI.COMM_WORLD.size)
    world = MPI.COMM_WORLD
    sizes = [2 ** k for k in (range(10, 17, 3) if args.quick else range(10, 27, 2))]
    times = {}
    for size in sizes:
        buffer = backend.xp.ones(size // 4, dtype=numpy.float32)
        count = 2 if args.quick else max(3, min(300, 2 ** 24 // size))
        best = float("inf")
        for _ in range(1 if args.quick else 3):
            world.Barrier()
            start = MPI.Wtime()
            for _ in range(count):
                comm.all_reduce(buffer, mesh.tp)
            backend.synchronize()
            world.Barrier()
            best = min(best, (MPI.Wtime() - start) / count)
        times[size] = best
    return {"n": world.size, "transport": comm.transport(), "times": times}


# -- the report -------------------------------------------------------------------------------------

def _bus_bandwidth(n, size, seconds):
    return 2 * (n - 1) / n * size / seconds / 1e9


def render(bandwidth):
    """``bandwidth``: one worker result per rank count (JSON: message sizes are string keys)."""
    if not bandwidth:
        return []
    lines = ["## all-reduce bandwidth (`minitp.comm.all_reduce`, float32)", "",
             "Bus bandwidth = 2(n-1)/n · S / time: the bytes each rank sends in a ring all-reduce, per second "
             "(comparable across n).", ""]
    sizes = sorted({int(size) for entry in bandwidth for size in entry["times"]})
    header = ["message"] + [f"n={e['n']}: time µs, bus GB/s ({e['transport']})" for e in bandwidth]
    rows = []
    for size in sizes:
        cells = [harness.human_bytes(size)]
        for entry in bandwidth:
            seconds = entry["times"].get(str(size))
            cells.append("-" if seconds is None else
                         f"{1e6 * seconds:,.1f} µs, {_bus_bandwidth(entry['n'], size, seconds):.2f} GB/s")
        rows.append(cells)
    return lines + [harness.table(header, rows, "l" + "r" * len(bandwidth)), ""]


PANELS = 1  # the plot's panel: bus bandwidth against message size


def draw(axis, bandwidth):
    for entry in bandwidth:
        n = entry["n"]
        sizes = sorted(int(size) for size in entry["times"])
        axis.plot(sizes, [_bus_bandwidth(n, s, entry["times"][str(s)]) for s in sizes], "o-", label=f"n={n}")
    axis.set(xscale="log", xlabel="message size (bytes)", ylabel="bus bandwidth (GB/s)",
             title="comm.all_reduce bandwidth")
    axis.grid(alpha=0.3)
    axis.legend()
