"""Does overlapping communication with computation pay, and how much of it is hidden? Measured side by side.

    .venv/bin/python benchmarks/overlap.py           # ~2 min; writes results/overlap.md and overlap.png
    .venv/bin/python benchmarks/overlap.py --quick   # tiny sizes: the CI smoke test

For each mesh (dp 2; tp 2; tp 2 × dp 2) one MPI launch builds a small GPT training step five ways and
times them turn about (``harness.interleaved_best``: the same weather for all):

    blocking        the gradient buckets all-reduced after backward; the column-parallel layers reduce dX
                    before computing dA
    overlap         the buckets' all-reduces started inside backward, dX reduced during dA's GEMM;
                    progress thread on (``comm.set_progress("thread")``, minitp's default)
    overlap, calls  the same, progress left to MPI calls alone (``set_progress("calls")``)
    ZeRO-1          reduce-scatter, update 1/d, all-gather; blocking
    ZeRO-1 overlap  ... the reduce-scatters started inside backward, the all-gathers bucket by bucket

then records one traced step of each (``comm.record_timeline``) and reads from it, with
``minitp.trace_report``, the share of communication hidden behind compute: of the gradient reductions
(tag "gradients") and of all communication. A last launch repeats "overlap, calls" with MPICH's own
progress thread (``MPIR_CVAR_ASYNC_PROGRESS=1`` in the environment). The picture is the timeline of
one overlapped step at tp 2 × dp 2.

Timings on a shared machine move; ratios of modes timed turn about move less. With more ranks than
cores (4 ranks on 2 cores) a collective waits for descheduled ranks, and the hidden share measures that.
"""
import argparse
import sys

import numpy

import harness

MODES = ("blocking", "overlap", "overlap, calls", "ZeRO-1", "ZeRO-1 overlap")
MESHES = ((1, 2), (2, 1), (2, 2))  # (tp, dp)


def sizes(quick):
    if quick:
        return dict(config=dict(vocab=64, seq_len=16, hidden=32, heads=4, layers=2), batch=4, bucket=16 * 1024)
    return dict(config=dict(vocab=256, seq_len=128, hidden=256, heads=8, layers=4), batch=8, bucket=1 << 20)


def worker(args):
    """Time and trace the five modes on this launch's (tp, dp) mesh; rank 0 reports."""
    from mpi4py import MPI

    from minitp import comm, trace_report
    from minitp.nn import AdamW, GPTConfig
    from minitp.parallel.data.sync import AllReduceGradients
    from minitp.training import train_step
    from minitp.parallel.gpt import ParallelGPT
    from minitp.parallel.data.zero import ZeroOptimizer

    size = sizes(args.quick)
    mesh = comm.init(tp=args.tp, dp=MPI.COMM_WORLD.size // args.tp)
    config = GPTConfig(**size["config"], dtype="float32", seed=0)
    batch = size["batch"] * mesh.dp_size
    windows = numpy.random.default_rng(0).integers(0, config.vocab, (config.seq_len + 1, batch))
    ids, targets = windows[:-1], windows[1:]
    modes = MODES if not args.only else tuple(args.only)

    def build(mode):
        overlap = "overlap" in mode
        model = ParallelGPT(config, mesh, sequence_parallel=mesh.tp_size > 1, overlap=overlap)
        optimizer = AdamW(model.named_parameters(), lr=1e-4)
        gradients = None
        if mode.startswith("ZeRO"):
            optimizer = ZeroOptimizer(optimizer, mesh, size["bucket"], overlap=overlap)
        else:
            gradients = AllReduceGradients(model, mesh, size["bucket"], overlap=overlap)
        progress = "calls" if mode.endswith("calls") else "thread"

        def step():
            comm.set_progress(progress)
            train_step(model, optimizer, ids, targets, mesh, max_norm=1.0, gradients=gradients)
        return step

    steps = {mode: build(mode) for mode in modes}
    times = harness.interleaved_best(steps, 1 if args.quick else args.repeats, synchronize=MPI.COMM_WORLD.Barrier)
    hidden, picture = {}, None
    for mode, step in steps.items():
        with comm.record_timeline(mesh) as timeline:
            step()
        if timeline.trace is not None:
            shares = {}
            for name, tag in (("gradients", "gradients"), ("all", None)):
                rows = trace_report.breakdown(timeline.trace, tag=tag)
                total = sum(r.hidden + r.communication for r in rows)
                shares[name] = sum(r.hidden for r in rows) / total if total else None
            hidden[mode] = shares
            if mode == "overlap" and mesh.tp_size > 1 and mesh.dp_size > 1 and args.out:
                picture = trace_report.plot(timeline.trace, f"{args.out}/overlap.png",
                                            title=f"one overlapped step, tp {mesh.tp_size} × dp {mesh.dp_size}: "
                                                  "the gradient all-reduces and dX reductions in flight during backward")
    if MPI.COMM_WORLD.rank == 0:
        harness.report({"tp": mesh.tp_size, "dp": mesh.dp_size, "times": times, "hidden": hidden,
                        "picture": picture})


def percent(value):
    return "—" if value is None else f"{100 * value:.0f}%"


def render(results, directory, quick):
    lines = ["# Overlap: communication behind computation", "",
             f"Measured {harness.machine()}.", "",
             "Step = one training step of a small GPT (forward, backward, gradient reduction, clipping, AdamW), "
             "float32, the fastest of several, modes timed turn about. Hidden = |communication ∩ compute| / "
             "|communication| from a traced step (minitp.trace_report), summed over the ranks: of the gradient "
             "reductions, and of all communication (the tensor-parallel collectives of forward included).", ""]
    rows = []
    for result in results:
        blocking = result["times"].get("blocking")
        for mode, seconds in result["times"].items():
            shares = result["hidden"].get(mode, {})
            speedup = f"{blocking / seconds:.2f}×" if blocking else "—"
            rows.append((f"tp {result['tp']} × dp {result['dp']}", mode + result.get("suffix", ""), harness.ms(seconds),
                         speedup, percent(shares.get("gradients")), percent(shares.get("all"))))
    lines.append(harness.table(["mesh", "mode", "step ms", "vs blocking", "gradients hidden", "all comm hidden"],
                               rows, align="llrrrr"))
    lines += ["", "Progress: MPICH moves a non-blocking collective only inside MPI calls. \"overlap\" runs minitp's "
              "progress thread (tests the requests in flight every 100 µs; numpy's GEMMs release the GIL); "
              "\"overlap, calls\" leaves progress to the MPI calls made anyway; \"MPICH async progress\" is "
              "`MPIR_CVAR_ASYNC_PROGRESS=1`, MPICH's own thread, which spins on a core. A request's \"in flight\" "
              "span ends when the rank learns it is complete: with the progress thread, within ~0.1 ms of it; "
              "without, only at the wait -- so in the \"calls\" rows the hidden share counts time in flight, "
              "not bytes moved, and the step time is the honest measure.", ""]
    picture = next((r["picture"] for r in results if r.get("picture")), None)
    if picture:
        lines += ["![one overlapped step](overlap.png)", ""]
    harness.write(directory, "overlap.md", "\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: a smoke test in seconds")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="directory for overlap.md and overlap.png (default benchmarks/results)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="+", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    directory = harness.output_dir(args.out)
    common = ["--repeats", args.repeats, "--out", directory] + (["--quick"] if args.quick else [])
    meshes = ((1, 2), (2, 2)) if args.quick else MESHES
    results = []
    for tp, dp in meshes:
        print(f"tp {tp} × dp {dp} ...", flush=True)
        results.append(harness.launch(__file__, tp * dp, common + ["--tp", tp], env=harness.ONE_THREAD))
    if not args.quick:  # MPICH's own progress thread: set in the environment, so a launch of its own
        print("tp 2 × dp 2 with MPIR_CVAR_ASYNC_PROGRESS=1 ...", flush=True)
        env = dict(harness.ONE_THREAD, MPIR_CVAR_ASYNC_PROGRESS="1")
        extra = harness.launch(__file__, 4, common + ["--tp", 2, "--only", "blocking", "overlap, calls"], env=env)
        extra["suffix"] = " (MPICH async progress)"
        results.append(extra)
    render(results, directory, args.quick)


if __name__ == "__main__":
    sys.exit(main())
