"""The pipeline's bubble on the wall clock: how long each stage waits in a step, beside the formula --
(p-1)/(m+p-1) for AFAB and 1F1B, (p-1)/(v·m+p-1) interleaved -- and the activations each stage holds.

Each worker launch is ``mpiexec -n p`` with one stage per rank (``minitp.pipeline``), one BLAS thread per
rank. For each schedule and m, a GPT of equal blocks (a small vocabulary, so the first and last stage do
little extra) runs a few steps of microbatches of the same size, every action's compute timed
(``StageRun.rows``, ``time.perf_counter``: one clock for every process of a machine). A stage's idle
share is 1 - (its compute time) / (the step: first start to last end, over all stages); the fastest
step of the repeats is kept. What the formula leaves out shows up as the difference: a backward that is
not exactly 2 forwards is harmless (the formula holds for any ratio), but the first and last stages'
extra work (embedding, head, loss), Python's per-op cost and the messages' latency are not.

Run: ``python benchmarks/pipeline.py`` (p = 2 and 4; ``--quick``: tiny, p = 2). With more ranks than
cores (p = 4 on a 2-core machine) the ranks share cores, and a rank waiting in MPI_Recv (which polls)
takes time from one that computes: that column measures contention as well as the bubble. Writes
``benchmarks/results/pipeline.md`` and ``pipeline.png`` (the measured timelines of the largest p).
"""
import argparse
import sys
from pathlib import Path

import numpy

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

SIZES = dict(vocab=64, seq_len=64, hidden=256, heads=4, layers=8)
QUICK_SIZES = dict(vocab=16, seq_len=8, hidden=16, heads=2, layers=4)
MICROBATCH = 4  # sequences per microbatch: every action does the same work whatever m


def configurations(p, quick):
    """(schedule, m, v): m from 1 to 4p (interleaved: multiples of p, v = 2)."""
    ms = [2, 4] if quick else sorted({1, 2, p, 2 * p, 4 * p})
    found = [(schedule, m, 1) for schedule in ("afab", "1f1b") for m in ms]
    return found + [("interleaved", m, 2) for m in ms if m % p == 0]


def worker(args):
    from mpi4py import MPI

    from minitp import comm, pipeline
    from minitp.nn import GPTConfig

    world = MPI.COMM_WORLD
    mesh = comm.init(pp=world.size)
    p = mesh.pp_size
    config = GPTConfig(**(QUICK_SIZES if args.quick else SIZES), seed=0, dtype="float32")
    rng = numpy.random.default_rng(0)
    results = []
    for schedule, m, v in configurations(p, args.quick):
        model = pipeline.PipelineGPT(config, mesh, virtual_stages=v)
        windows = rng.integers(0, config.vocab, (config.seq_len + 1, MICROBATCH * m))
        best = None
        for _ in range(args.repeats + 1):  # the first is a warm-up
            model.zero_grad()
            world.Barrier()
            run = pipeline.forward_backward(model, windows[:-1], windows[1:], mesh, schedule, m)
            rows = world.gather([(start, end, tuple(action)) for start, end, action in run.rows], root=0)
            held = world.gather((run.peak_held, run.peak_bytes, run.saved_bytes[0]), root=0)
            if world.rank == 0:
                timeline = pipeline.Timeline([[(s, e, pipeline.Action(*a)) for s, e, a in row] for row in rows], v)
                if best is None or timeline.makespan < best[0].makespan:
                    best = (timeline, held)
            best = best if world.rank == 0 else None
        if world.rank == 0:
            timeline, held = best
            results.append({
                "schedule": schedule, "m": m, "v": v, "step": timeline.makespan,
                "idle": [timeline.idle_fraction(r) for r in range(p)],
                "rows": [[(s, e, list(a)) for s, e, a in row] for row in timeline.rows],
                "held": [list(h) for h in held],
                "expected_held": [pipeline.expected_in_flight(schedule, p, m, v, r) for r in range(p)],
            })
    if world.rank == 0:
        harness.report({"p": p, "config": config.to_dict(), "results": results})


def render(data_by_p, directory):
    from fractions import Fraction

    from minitp import pipeline

    lines = ["# The pipeline bubble on the wall clock", "", f"Measured {harness.machine()}.", ""]
    any_data = next(iter(data_by_p.values()))
    c = any_data["config"]
    lines += [f"A GPT of {c['layers']} blocks, hidden {c['hidden']}, {c['heads']} heads, seq {c['seq_len']}, "
              f"vocabulary {c['vocab']}, float32, one stage per rank, microbatches of {MICROBATCH} sequences; "
              "each row the fastest of its repeats. *Formula*: the papers' idle share of a step; *replay*: the "
              "schedule on a logical clock with unit costs (`minitp.pipeline.replay`, exact); *measured*: "
              "1 - compute / step, per stage.", ""]
    rows, held_rows = [], []
    for p, data in sorted(data_by_p.items()):
        for entry in data["results"]:
            schedule, m, v = entry["schedule"], entry["m"], entry["v"]
            formula = pipeline.bubble_formula(schedule, p, m, v)
            replay = pipeline.replay(schedule, p, m, v).idle_fraction(0)
            measured = entry["idle"]
            rows.append([p, schedule, m, v, f"{formula} = {float(formula):.3f}", f"{float(replay):.3f}",
                         f"{sum(measured) / p:.3f}", " ".join(f"{x:.3f}" for x in measured),
                         harness.ms(entry["step"])])
            held_rows.append([p, schedule, m, v, " ".join(str(h[0]) for h in entry["held"]),
                              " ".join(map(str, entry["expected_held"])),
                              " ".join(f"{h[1]:,}" for h in entry["held"]),
                              " ".join(f"{h[1] / h[2]:.2f}" for h in entry["held"])])
            assert replay == formula and isinstance(replay, Fraction)
    lines += [harness.table(["p", "schedule", "m", "v", "formula", "replay", "measured (mean)", "measured per stage",
                             "step ms"], rows, "rlrrrrrlr"), ""]
    lines += ["## Activations held at each stage's peak", "",
              "Microbatch-chunks held at once (`StageRun.peak_held`) against the schedules' count "
              "(m for AFAB, min(p - r, m) for 1F1B, the interleaved warm-up + 1); the bytes the ops kept for "
              "backward at the peak (`track_saved`), and that peak over one forward's bytes.", ""]
    lines += [harness.table(["p", "schedule", "m", "v", "held per stage", "formula", "peak bytes per stage",
                             "peak / one forward"], held_rows, "rlrrllll"), ""]
    largest = max(data_by_p)
    plt = harness.pyplot()
    if plt is not None:
        from minitp.pipeline.picture import draw
        data = data_by_p[largest]
        m_shown = 2 * largest if any(e["m"] == 2 * largest for e in data["results"]) else data["results"][-1]["m"]
        shown = {f"{e['schedule']}, p={largest}, m={e['m']}" + (f", v={e['v']}" if e["v"] > 1 else "") + " (measured)":
                 pipeline.Timeline([[(s, t, pipeline.Action(*a)) for s, t, a in row] for row in e["rows"]], e["v"])
                 for e in data["results"] if e["m"] == m_shown}
        draw(shown, Path(directory) / "pipeline.png", unit="seconds (each action's compute; the gaps are waits)")
        lines += [f"![measured timelines at p={largest}](pipeline.png)", ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, p = 2, one repeat: a smoke test")
    parser.add_argument("--pp", type=int, nargs="+", help="pipeline sizes (default 2 4; 2 with --quick)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="directory for pipeline.md (default benchmarks/results)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.repeats = 1
    if args.worker:
        worker(args)
        return
    extra = (["--quick"] if args.quick else []) + ["--repeats", args.repeats]
    data = {p: harness.launch(__file__, p, extra, env=harness.ONE_THREAD) for p in (args.pp or ([2] if args.quick else [2, 4]))}
    harness.publish(args.out, "pipeline.md", lambda directory: render(data, directory))


if __name__ == "__main__":
    main()
