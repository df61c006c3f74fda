"""What does each ZeRO stage hold and send per rank? Measured against the formulas, at d = 1, 2 and 4.

    .venv/bin/python benchmarks/zero.py           # ~1 min; writes results/zero.md and zero3.png
    .venv/bin/python benchmarks/zero.py --quick   # tiny sizes: the CI smoke test

One launch per d (dp = d, tp = 1) trains a small float32 GPT (untied, dropout 0.1) with plain data
parallelism (stage 0) and ZeRO stages 1, 2, 3, all blocking, and measures per rank, on the step after a
warm-up step:

    parameters   bytes of the arrays the parameters' values live in, between steps: each parameter's own
                 (stages 0-2), or the rank's slices of the units plus the placeholder's one element (3)
    gradients    at the end of backward (when ``finish`` begins): the ``.grad`` arrays alive plus the
                 slices already reduce-scattered -- the whole gradient in stages 0 and 1, 1/d in 2 and 3
    optimizer    AdamW's moments this rank keeps
    peak         tracemalloc's peak during the step above what was allocated when it began (numpy
                 reports its buffers to tracemalloc; MPI's own buffers are not counted), rank 0
    wire         ring bytes this rank sends on dp for gradients and parameters (the collective log)
    step         the fastest of several steps, stages timed turn about

Formulas, written out here from the shapes (e = 4 bytes, Ψ parameters; bucket b holds n_b of them and
unit u n_u; ⌈n/d⌉ the padded slice): parameters Ψe (0-2), Σ_u⌈n_u/d⌉e + e (3); gradients Ψe (0, 1),
Σ_b⌈n_b/d⌉e (2), Σ_u⌈n_u/d⌉e (3); optimizer 2e·(this rank's real elements of each padded bucket or
unit); wire 2(d-1)/d·Ψe (0: all-reduce), 2(d-1)/d·Σ_b d⌈n_b/d⌉e (1, 2: reduce-scatter + all-gather),
3(d-1)/d·Σ_u d⌈n_u/d⌉e (3: gather forward, gather backward, reduce-scatter) -- the paper's 1.5×.
"""
import argparse
import sys
import tracemalloc

import numpy

import harness

STAGES = (0, 1, 2, 3)
E = 4


def sizes(quick):
    if quick:
        return dict(config=dict(vocab=64, seq_len=16, hidden=32, heads=4, layers=2), batch=4, bucket=8 * 1024)
    return dict(config=dict(vocab=256, seq_len=64, hidden=128, heads=4, layers=4), batch=8, bucket=256 * 1024)


def slices(n, d, r):
    """Real elements of rank r's slice [r⌈n/d⌉, (r+1)⌈n/d⌉) of n elements padded to d⌈n/d⌉."""
    length = -(-n // d)
    return max(0, min(n, (r + 1) * length) - r * length)


def formulas(stage, groups, d, r, psi):
    """(parameters, gradients, optimizer, wire) per rank from ``groups``: the element count of each bucket
    (stages 1-2) or unit (3)."""
    padded = sum(-(-n // d) for n in groups)  # Σ⌈n/d⌉
    ring = (d - 1) / d
    if stage == 0:
        return psi * E, psi * E, 2 * psi * E, 2 * ring * psi * E
    mine = sum(slices(n, d, r) for n in groups)
    parameters = psi * E if stage < 3 else padded * E + E
    gradients = psi * E if stage == 1 else padded * E
    wire = (2 if stage < 3 else 3) * ring * d * padded * E
    return parameters, gradients, 2 * mine * E, wire


def worker(args):
    from mpi4py import MPI

    from minitp import comm, trace_report
    from minitp.nn import AdamW, GPTConfig
    from minitp.parallel import AllReduceGradients, FullyShardedOptimizer, ParallelGPT, ZeroOptimizer
    from minitp.training import train_step

    size = sizes(args.quick)
    mesh = comm.init(dp=MPI.COMM_WORLD.size)
    d, r = mesh.dp_size, mesh.dp_rank
    config = GPTConfig(**size["config"], dtype="float32", seed=0, dropout=0.1)
    windows = numpy.random.default_rng(0).integers(0, config.vocab, (config.seq_len + 1, size["batch"] * d))
    ids, targets = windows[:-1], windows[1:]

    def build(stage):
        model = ParallelGPT(config, mesh)
        optimizer = AdamW(model.named_parameters(), lr=1e-4)
        gradients = None
        if stage == 3:
            optimizer = FullyShardedOptimizer(optimizer, model, mesh)
        elif stage:
            optimizer = ZeroOptimizer(optimizer, mesh, size["bucket"], stage=stage)
        else:
            gradients = AllReduceGradients(model, mesh, size["bucket"])
        return model, optimizer, gradients

    built = {stage: build(stage) for stage in STAGES}
    rows = {}
    for stage, (model, optimizer, gradients) in built.items():
        sync = gradients or optimizer
        step = lambda: train_step(model, optimizer, ids, targets, mesh, max_norm=1.0, gradients=gradients)  # noqa: E731
        step()  # warm-up: the optimizer state exists from here on
        seen = {}
        finish = sync.finish

        def measured_finish():  # the end of backward: what gradient is alive now
            grads = {id(p.grad): p.grad.nbytes for p in model.parameters() if p.grad is not None}
            shards = getattr(getattr(sync, "gradients", None), "grad_shards", None) or []
            seen["gradients"] = sum(grads.values()) + sum(s.nbytes for s in shards if s is not None)
            return finish()
        sync.finish = measured_finish
        if isinstance(optimizer, ZeroOptimizer):  # the slices of the step before are still referenced
            optimizer.gradients.grad_shards = [None] * len(optimizer.gradients.grad_shards)
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        with comm.log_collectives() as log:
            step()
        peak = tracemalloc.get_traced_memory()[1] - before
        tracemalloc.stop()
        sync.finish = finish
        owners = {}
        for p in model.parameters():
            owner = p.data if p.data.base is None else p.data.base
            owners[id(owner)] = owner.nbytes
        shards = getattr(getattr(optimizer, "gradients", None), "shards", [])
        parameters = sum(owners.values()) + sum(s.nbytes for s in shards)
        state = optimizer.state_bytes()
        wire = sum(x.ring_bytes for x in log if x.group == "dp" and (x.tag.startswith("gradients")
                                                                      or x.tag.startswith("parameters")))
        psi = sum(p.size for p in model.parameters())
        groups = [b.size for b in optimizer.gradients.buckets] if stage else []
        expected = formulas(stage, groups, d, r, psi)
        rows[stage] = dict(measured=[parameters, seen["gradients"], state, wire], formula=list(expected),
                           peak=peak, psi=psi, groups=len(groups))
    steps = {stage: (lambda m=m, o=o, g=g: train_step(m, o, ids, targets, mesh, max_norm=1.0, gradients=g))
             for stage, (m, o, g) in built.items()}
    times = harness.interleaved_best(steps, 1 if args.quick else args.repeats, synchronize=MPI.COMM_WORLD.Barrier)
    gathered = MPI.COMM_WORLD.gather(rows, root=0)
    picture = lifecycle = None
    if d == max(args.ds):
        model, optimizer, _ = built[3]
        with comm.record_timeline(mesh) as timeline:
            train_step(model, optimizer, ids, targets, mesh, max_norm=1.0)
        if timeline.trace is not None:
            lifecycle = life_of_rank0(timeline.trace)
            if args.out:
                try:
                    picture = trace_report.plot(timeline.trace, f"{args.out}/zero3.png", tag="parameters",
                                                title=f"one ZeRO-3 step at dp {d}: each block gathered before its "
                                                      "forward and backward, freed after")
                except ImportError:
                    picture = None
    if MPI.COMM_WORLD.rank == 0:
        harness.report({"d": d, "ranks": gathered, "times": times, "picture": picture, "lifecycle": lifecycle})


def life_of_rank0(trace):
    """Rank 0's gathers, frees and reduce-scatters in order: 'G b0' gather, 'F b0' free, 'R b0' reduce."""
    events = sorted((e for e in trace["traceEvents"] if e.get("ph") == "X" and e.get("pid") == 0),
                    key=lambda e: e["ts"])
    short = lambda name: name.replace("blocks.", "b").replace("embeddings", "emb")  # noqa: E731
    found = []
    for e in events:
        tag = str(e.get("args", {}).get("tag", ""))
        if e["name"].startswith("free "):
            found.append("F " + short(e["name"][5:]))
        elif tag.startswith("parameters: gather") and e.get("cat") == "comm":
            found.append("G " + short(tag.split()[2]))
        elif tag.startswith("gradients: reduce-scatter") and e.get("cat") == "comm":
            found.append("R " + short(tag.split()[2]))
    return found


def pick(by_stage, stage):
    """``by_stage[stage]``: JSON made the driver's keys strings."""
    return by_stage[str(stage)] if str(stage) in by_stage else by_stage[stage]


def render(results):
    lines = ["# ZeRO stages: what each rank holds and sends", "", f"Measured {harness.machine()}.", "",
             "A small GPT (float32, untied, dropout 0.1), one step after a warm-up, blocking; bytes per rank, "
             "measured / formula (formulas written out from the shapes in `benchmarks/zero.py`'s docstring). "
             "Stage 0 is plain data parallelism. Every rank's four counts equal the formula (column "
             "'unexplained': the largest |measured − formula| over the ranks).", ""]
    rows = []
    for result in results:
        d, times = result["d"], result["times"]
        for stage in STAGES:
            per_rank = [pick(ranks, stage) for ranks in result["ranks"]]
            first = per_rank[0]
            unexplained = max(abs(m - f) for row in per_rank for m, f in zip(row["measured"], row["formula"]))
            mp, mg, mo, mw = first["measured"]
            step, plain = pick(times, stage), pick(times, 0)
            rows.append((d, stage or "0 (dp)", harness.ms(step), f"{step / plain:.2f}×", f"{first['peak']:,}",
                         f"{mp:,.0f}", f"{mg:,.0f}", f"{mo:,.0f}", f"{mw:,.0f}",
                         f"{mw / first['formula'][3]:.4f}" if first["formula"][3] else "—", f"{unexplained:.0f}"))
    lines.append(harness.table(["d", "stage", "step ms", "vs dp", "peak of the step B", "parameters B",
                                "gradients B (end of backward)", "optimizer B", "wire B", "wire / formula",
                                "unexplained B"], rows))
    last = results[-1]
    psi = pick(last["ranks"][0], 0)["psi"]
    wires = {stage: pick(last["ranks"][0], stage)["measured"][3] for stage in STAGES}
    if wires[0]:
        lines += ["", f"At d = {last['d']} (Ψ = {psi:,}): stage 1 and 2 send {wires[1] / wires[0]:.3f}× and "
                      f"{wires[2] / wires[0]:.3f}× plain data parallelism's all-reduce, stage 3 {wires[3] / wires[0]:.3f}× "
                      "(the paper: 1, 1, 1.5; above it by the padding of each bucket or unit to d⌈n/d⌉)."]
    lines += ["", "What distinguishes stage 1 from stage 2 here: minitp's stage 1 already reduce-scatters (it "
                  "never all-reduces), so after `finish` both keep only their 1/d slices of the gradient. The "
                  "difference is when the whole gradient dies: stage 1 keeps every `.grad` until the backward is "
                  "over and then packs and reduce-scatters bucket by bucket (the paper's 2Ψ of fp16 gradient at "
                  "the end of backward: the column above shows Ψe); stage 2 reduce-scatters each bucket inside "
                  "backward as soon as it is complete and drops its `.grad` there, so at the end of backward "
                  "only the slices are alive. The peak column is the whole step's (activations, the bucket being "
                  "packed, AdamW's temporaries), measured, not a formula.", ""]
    if last.get("lifecycle"):
        lines += ["One stage-3 step on rank 0 (G gather, F free, R reduce-scatter of a unit's gradient; emb, "
                  "b0.., head the units):", "", "```", " ".join(last["lifecycle"]), "```", ""]
    if last.get("picture"):
        lines += ["![one ZeRO-3 step](zero3.png)", ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, d = 1 and 2, one repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="directory for zero.md and zero3.png (default benchmarks/results)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ds", type=int, nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.ds = args.ds or ([1, 2] if args.quick else [1, 2, 4])
    if args.worker:
        worker(args)
        return
    directory = harness.output_dir(args.out)
    common = ["--repeats", args.repeats, "--out", directory, "--ds", *args.ds] + (["--quick"] if args.quick else [])
    results = []
    for d in args.ds:
        print(f"dp {d} ...", flush=True)
        results.append(harness.launch(__file__, d, common, env=harness.ONE_THREAD))
    harness.write(directory, "zero.md", render(results))


if __name__ == "__main__":
    sys.exit(main())
