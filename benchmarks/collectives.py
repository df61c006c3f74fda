"""Do minitp's collectives cost what raw MPI costs? ``comm.all_reduce``, ``all_gather``,
``reduce_scatter`` and the pipeline's point-to-point ``send``/``recv`` against the bare mpi4py calls into
a buffer allocated once, side by side in one run.

A minitp collective does more than MPI's: it returns a new array (a receive buffer allocated per call),
checks its arguments, and records itself when a collective log is open. The raw call is the floor: the
same MPI operation on the same message, writing into a preallocated buffer. The ratio minitp / raw is
what that convenience costs; the target is at most 1.1 at every size, in the default environment (no
variables set: ``minitp.allocator`` keeps freed memory in the heap, so the per-call receive buffer reuses
mapped pages instead of being faulted in and zeroed).

``all_reduce_in_place`` is ``comm.all_reduce(x, group, out=x)`` against ``Allreduce(MPI.IN_PLACE, x)``:
no result to allocate on either side, so it shows what minitp's wrapper alone costs. (The data-parallel
gradient buckets reduce their packed copy this way.)

The point-to-point column is a ping-pong: ranks 2i and 2i+1 pass S bytes there and back (``send`` then
``recv``, and the reverse), against mpi4py's ``Isend``/``Wait`` and ``Recv``; its time is a round trip.

At small sizes MPI itself takes a few microseconds, so even a few microseconds of Python (a function
call, the argument checks, allocating the result) show as a large ratio: the table gives the
microseconds too, and the summary the fixed cost per call.

The two are timed turn about (raw, minitp, raw, minitp, ...) and each keeps its best of several rounds,
so a burst of load from elsewhere on the machine hits both alike.

Run: ``python benchmarks/collectives.py`` (launches ``mpiexec -n 2`` and ``-n 4``; ``--quick``: tiny).
Writes ``benchmarks/results/collectives.md`` and ``collectives.png``.
"""
import argparse
import sys
from pathlib import Path

import numpy

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

OPS = ("all_reduce", "all_reduce_in_place", "all_gather", "reduce_scatter", "send_recv")
TARGET = 1.1


def worker(args):
    """Best seconds per call of each op and message size, raw and minitp, on the world's ranks."""
    from mpi4py import MPI

    from minitp import comm

    mesh = comm.init(tp=MPI.COMM_WORLD.size)  # an even number of ranks: the ping-pong pairs them
    group, communicator, n = mesh.tp, mesh.tp.comm, mesh.tp.size
    sizes = [2 ** k for k in (range(10, 15, 4) if args.quick else range(10, 27, 2))]  # 1 KiB .. 64 MiB
    results = []
    for size in sizes:
        x = numpy.ones(size // 8)  # float64, S bytes: the all-reduce's and reduce-scatter's input, the
        block = numpy.ones(size // 8 // n)  # all-gather's output (each rank sends S/n)
        out, gathered, mine = numpy.empty_like(x), numpy.empty(n * block.size), numpy.empty(x.size // n)
        zeros = numpy.zeros_like(x)  # reduced in place again and again: its sum stays 0
        raw = {"all_reduce": lambda: communicator.Allreduce(x, out),
               "all_reduce_in_place": lambda: communicator.Allreduce(MPI.IN_PLACE, zeros),
               "all_gather": lambda: communicator.Allgather(block, gathered),
               "reduce_scatter": lambda: communicator.Reduce_scatter_block(x, mine),
               "send_recv": _ping_pong(lambda peer: communicator.Isend(x, dest=peer).Wait(),
                                       lambda peer: communicator.Recv(out, source=peer), mesh.rank)}
        ours = {"all_reduce": lambda: comm.all_reduce(x, group),
                "all_reduce_in_place": lambda: comm.all_reduce(zeros, group, out=zeros),
                "all_gather": lambda: comm.all_gather(block, group),
                "reduce_scatter": lambda: comm.reduce_scatter(x, group),
                "send_recv": _ping_pong(lambda peer: comm.send(x, group, peer, match=0).wait(),
                                        lambda peer: comm.recv(x.shape, x.dtype, group, peer, match=0), mesh.rank)}
        count = 2 if args.quick else max(3, min(200, 2 ** 25 // size))
        for op in OPS:
            steps = {"raw": raw[op], "minitp": ours[op]}
            best = harness.interleaved_best({name: _repeat(step, count) for name, step in steps.items()},
                                            repeats=2 if args.quick else 11, synchronize=communicator.Barrier)
            results.append({"op": op, "bytes": size, "raw": best["raw"] / count, "minitp": best["minitp"] / count})
    if mesh.rank == 0:
        harness.report({"n": n, "results": results})


def _ping_pong(send, receive, rank):
    """One round trip between ranks 2i and 2i+1: the even one sends first, the odd one answers."""
    peer = rank ^ 1

    def run():
        if rank % 2 == 0:
            send(peer)
            receive(peer)
        else:
            receive(peer)
            send(peer)
    return run


def _repeat(step, count):
    def run():
        for _ in range(count):
            step()
    return run


def render(runs, out):
    from minitp import allocator
    lines = ["# minitp's collectives against raw MPI", "", f"Measured {harness.machine()}.", "",
             "Seconds per call, best of several rounds timed turn about; raw = the mpi4py buffer call into a "
             "buffer allocated once; minitp = `comm.<op>(x, group)`, which allocates its result "
             "(all_reduce_in_place: `comm.all_reduce(x, group, out=x)` against `Allreduce(MPI.IN_PLACE, x)`). "
             "The message size S is the all-reduce's input, the all-gather's output, the reduce-scatter's input "
             "and what each send carries (float64); send_recv is a round trip. Default environment: freed "
             f"memory kept = {allocator.KEPT}. Target: minitp / raw ≤ {TARGET} at every size.", ""]
    worst, fixed = 0.0, {}
    for run in runs:
        rows = []
        for size in sorted({r["bytes"] for r in run["results"]}):
            cells = [harness.human_bytes(size)]
            for op in OPS:
                r = next(r for r in run["results"] if r["op"] == op and r["bytes"] == size)
                ratio = r["minitp"] / r["raw"]
                worst = max(worst, ratio)
                if size == min(x["bytes"] for x in run["results"]):
                    fixed[(run["n"], op)] = 1e6 * (r["minitp"] - r["raw"])
                cells.append(f"{1e6 * r['raw']:,.1f} / {1e6 * r['minitp']:,.1f} µs = **{ratio:.2f}**")
            rows.append(cells)
        lines += [f"## {run['n']} ranks", "", harness.table(["S"] + [f"{op}: raw / minitp" for op in OPS], rows,
                                                            "l" + "r" * len(OPS)), ""]
    lines += [f"Largest ratio: {worst:.2f} ({'within' if worst <= TARGET else 'above'} the target {TARGET}).", "",
              "Fixed cost per call, minitp − raw at the smallest size: " + ", ".join(
                  f"{op} {cost:+.1f} µs (n={n})" for (n, op), cost in sorted(fixed.items())) + ".", ""]
    plt = harness.pyplot()
    if plt is not None:
        figure, axis = plt.subplots(figsize=(7, 4.5))
        for index, run in enumerate(runs):
            for style, op in zip(("o-", "x-", "s--", "^:", "d-."), OPS):
                points = sorted((r["bytes"], r["minitp"] / r["raw"]) for r in run["results"] if r["op"] == op)
                axis.plot(*zip(*points), style, color=f"C{index}", label=f"{op}, n={run['n']}")
        axis.axhline(TARGET, color="gray", lw=1, ls="--")
        axis.set(xscale="log", xlabel="message size S (bytes)", ylabel="minitp / raw MPI time",
                 title="the cost of minitp's collectives over raw mpi4py")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(Path(out) / "collectives.png", dpi=110)
        plt.close(figure)
        lines += ["![ratios](collectives.png)", ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 2 ranks: a smoke test in seconds")
    parser.add_argument("--ranks", type=int, nargs="+", help="rank counts (default 2 4; 2 with --quick)")
    parser.add_argument("--out", help="directory for collectives.md (default benchmarks/results)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    ranks = args.ranks or ([2] if args.quick else [2, 4])
    runs = [harness.launch(__file__, n, ["--quick"] if args.quick else [], env=harness.ONE_THREAD) for n in ranks]
    harness.publish(args.out, "collectives.md", lambda directory: render(runs, directory))


if __name__ == "__main__":
    main()
