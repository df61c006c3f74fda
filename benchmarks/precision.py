"""What does mixed precision cost and save? Step time and bytes per rank for float32, bf16 and fp16.

    .venv/bin/python benchmarks/precision.py           # ~1 min; writes results/precision.md and precision.png
    .venv/bin/python benchmarks/precision.py --quick   # tiny sizes: the CI smoke test

One launch per d (dp = d, tp = 1) trains a small GPT (untied, dropout 0.1) in each policy, the way
``tutorials/train_gpt.py --dtype`` builds it:

    float32   everything in float32: AdamW on the float32 parameters
    bf16      a bfloat16 model (ml_dtypes), fp32 master weights and moments (``MasterWeights``)
    fp16      a float16 model, fp32 masters and moments, dynamic loss scaling (``DynamicLossScaler``)

and measures per rank, on a step after a warm-up step:

    parameters, gradients   bytes of the model's arrays, and of the ``.grad`` arrays at the end of backward
                            (before the loss scaler's fp32 copies: those are in the peak)
    optimizer               what the optimizer keeps: moments (float32), + master copies (bf16, fp16)
    peak                    tracemalloc's peak during the step above what was allocated when it began
    step                    the fastest of several steps, the policies timed turn about (same weather)
    achieved                model flops of the step (``training.throughput.step_flops``) / step time, and that against
                            this machine's GEMM rate in the policy's dtype (``training.throughput.gemm_rate``), both
                            measured here

The formulas (Ψ parameters; Rajbhandari et al. 2020, §3.1, "2Ψ + 2Ψ + KΨ" with K = 12): float32 4Ψ + 4Ψ
+ 8Ψ; bf16 and fp16 2Ψ + 2Ψ + 12Ψ (4Ψ masters + 8Ψ moments). On the CPU a 2-byte product is an fp32 GEMM of
the rounded inputs, rounded once (``minitp.functional.precision``): no faster than float32, and the casts
around it cost time -- half precision here saves memory, not time. On a GPU (``MINITP_DEVICE=gpu``) fp16
products run on the tensor cores (bf16: CuPy has no bfloat16, so that row is skipped there).
"""
import argparse
import sys
import tracemalloc

import numpy

import harness

POLICIES = ("float32", "bf16", "fp16")


def sizes(quick):
    if quick:
        return dict(config=dict(vocab=64, seq_len=16, hidden=32, heads=4, layers=2), batch=4)
    return dict(config=dict(vocab=256, seq_len=128, hidden=256, heads=4, layers=4), batch=8)


def formula(policy, psi):
    """(parameters, gradients, optimizer) bytes for Ψ = ``psi`` parameters in ``policy``."""
    if policy == "float32":
        return 4 * psi, 4 * psi, 8 * psi
    return 2 * psi, 2 * psi, 12 * psi


def worker(args):
    import ml_dtypes
    from mpi4py import MPI

    from minitp import backend, comm
    from minitp.nn import AdamW, GPTConfig
    from minitp.nn.loss_scale import DynamicLossScaler
    from minitp.nn.master_weights import MasterWeights
    from minitp.parallel import AllReduceGradients, ParallelGPT
    from minitp.training import train_step
    from minitp.training.throughput import gemm_rate, step_flops

    size = sizes(args.quick)
    mesh = comm.init(dp=MPI.COMM_WORLD.size)
    d = mesh.dp_size
    gpu = backend.device() == "gpu"
    dtypes = {"float32": numpy.float32, "bf16": ml_dtypes.bfloat16, "fp16": numpy.float16}
    policies = [p for p in POLICIES if not (gpu and p == "bf16")]  # CuPy has no bfloat16
    windows = numpy.random.default_rng(0).integers(0, size["config"]["vocab"],
                                                   (size["config"]["seq_len"] + 1, size["batch"] * d))
    ids, targets = windows[:-1], windows[1:]

    def build(policy):
        config = GPTConfig(**size["config"], dtype=dtypes[policy], seed=0, dropout=0.1)
        model = ParallelGPT(config, mesh)
        optimizer = AdamW(model.named_parameters(), lr=1e-4)
        scaler = None
        if policy != "float32":
            optimizer = MasterWeights(optimizer, numpy.float32)
        if policy == "fp16":
            scaler = DynamicLossScaler()
        gradients = AllReduceGradients(model, mesh)
        return model, optimizer, gradients, scaler

    built = {policy: build(policy) for policy in policies}
    steps = {policy: (lambda m=m, o=o, g=g, s=s: train_step(m, o, ids, targets, mesh, max_norm=1.0, gradients=g,
                                                            scaler=s))
             for policy, (m, o, g, s) in built.items()}
    rows = {}
    for policy, (model, optimizer, gradients, scaler) in built.items():
        steps[policy]()  # warm-up: the optimizer state exists from here on
        seen, finish = {}, gradients.finish

        def measured_finish():  # the end of backward, before any unscaling: the gradients as backward made them
            seen["gradients"] = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
            return finish()
        gradients.finish = measured_finish
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        steps[policy]()
        peak = tracemalloc.get_traced_memory()[1] - before
        tracemalloc.stop()
        gradients.finish = finish
        parameters = sum(p.data.nbytes for p in model.parameters())
        grads = seen["gradients"]
        state = optimizer.state_bytes()
        psi = sum(p.size for p in model.parameters())
        rows[policy] = dict(measured=[parameters, grads, state], formula=list(formula(policy, psi)), peak=peak,
                            psi=psi, skipped=scaler.skipped if scaler is not None else 0)
    times = harness.interleaved_best(steps, 1 if args.quick else args.repeats,
                                     synchronize=lambda: (backend.synchronize(), MPI.COMM_WORLD.Barrier()))
    config = size["config"]
    flops = step_flops(size["batch"] * d, config["seq_len"], config["layers"], config["hidden"], config["vocab"])
    rates = {}
    for policy in policies:  # every rank at once, as train_gpt.py measures it: ranks share the cores
        MPI.COMM_WORLD.Barrier()
        rates[policy] = MPI.COMM_WORLD.allreduce(gemm_rate(dtypes[policy], n=256 if args.quick else None),
                                                 op=MPI.SUM)
    gathered = MPI.COMM_WORLD.gather(rows, root=0)
    if MPI.COMM_WORLD.rank == 0:
        harness.report({"d": d, "ranks": gathered, "times": times, "flops": flops, "rates": rates,
                        "device": backend.device()})


def render(results):
    lines = ["# Mixed precision: step time and bytes per rank", "", f"Measured {harness.machine()}.", "",
             "A small GPT (untied, dropout 0.1), plain data parallelism, one step after a warm-up; bytes per "
             "rank, measured / the formula (float32: 4Ψ + 4Ψ + 8Ψ; bf16 and fp16: 2Ψ + 2Ψ + 12Ψ, the ZeRO "
             "paper's mixed precision with K = 12). 'unexplained' is the largest |measured − formula| over "
             "the ranks. 'achieved' is the model's flops per second of step; 'of GEMM' divides it by this "
             "machine's measured GEMM rate in that dtype (all ranks at once).", ""]
    rows = []
    for result in results:
        d, times = result["d"], result["times"]
        for policy in POLICIES:
            if policy not in times:
                continue
            per_rank = [ranks[policy] for ranks in result["ranks"]]
            first = per_rank[0]
            unexplained = max(abs(m - f) for row in per_rank for m, f in zip(row["measured"], row["formula"]))
            mp, mg, mo = first["measured"]
            step = times[policy]
            achieved = result["flops"] / step
            rows.append((result["device"], d, policy, harness.ms(step), f"{step / times['float32']:.2f}×",
                         f"{first['peak']:,}", f"{mp:,}", f"{mg:,}", f"{mo:,}", f"{mp + mg + mo:,}",
                         f"{(mp + mg + mo) / first['psi']:.0f}", f"{achieved / 1e9:,.2f}",
                         f"{achieved / result['rates'][policy]:.1%}", f"{unexplained:,}"))
    lines.append(harness.table(["device", "d", "policy", "step ms", "vs float32", "peak of the step B",
                                "parameters B", "gradients B (end of backward)", "optimizer B", "states B", "B per parameter",
                                "achieved GFLOP/s", "of GEMM", "unexplained B"], rows))
    lines += ["", "The states per parameter are the paper's: 16 B in float32 (4 + 4 + 8) and 16 B in mixed "
                  "precision too (2 + 2 + 12) -- mixed precision alone saves no state memory; it halves the "
                  "parameters and gradients the forward and backward touch, and the activations (the peak "
                  "column). ZeRO is what cuts the 12Ψ (tests/test_mixed_precision_zero.py measures its "
                  "stages in mixed precision against 2Ψ + 2Ψ + 12Ψ/N_d, 2Ψ + 14Ψ/N_d and 16Ψ/N_d)."]
    return "\n".join(lines) + "\n"


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    last = results[-1]
    policies = [p for p in POLICIES if p in last["times"]]
    first = {p: last["ranks"][0][p] for p in policies}
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    bottoms = numpy.zeros(len(policies))
    for index, name in enumerate(("parameters", "gradients", "optimizer")):
        values = numpy.array([first[p]["measured"][index] for p in policies]) / 2 ** 20
        left.bar(policies, values, bottom=bottoms, label=name)
        bottoms += values
    peaks = numpy.array([first[p]["peak"] for p in policies]) / 2 ** 20
    left.plot(policies, peaks, "k^", label="peak of the step")
    left.set_ylabel("MiB per rank")
    left.set_title(f"bytes per rank at d = {last['d']}")
    left.legend()
    right.bar(policies, [last["times"][p] * 1e3 for p in policies], color="gray")
    right.set_ylabel("ms per step (fastest)")
    right.set_title(f"step time on the {last['device'].upper()}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, d = 1 and 2, one repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="directory for precision.md and precision.png (default benchmarks/results)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    directory = harness.output_dir(args.out)
    common = ["--repeats", args.repeats] + (["--quick"] if args.quick else [])
    results = []
    for d in (1, 2):
        print(f"dp {d} ...", flush=True)
        results.append(harness.launch(__file__, d, common, env=harness.ONE_THREAD))
    harness.write(directory, "precision.md", render(results))
    try:
        print(f"wrote {plot(results, harness.Path(directory) / 'precision.png')}")
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot")


if __name__ == "__main__":
    sys.exit(main())
