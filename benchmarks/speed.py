"""Speed: one GPT block against PyTorch and against the machine's GEMM rate; strong scaling over tensor-
parallel ranks; MPI all-reduce bandwidth. The entry point that runs the parts and writes one report:

    speed_block.py          how fast is minitp's block (and a small GPT step) against PyTorch?
    speed_mlp.py            how fast is minitp's MLP alone against PyTorch, and against its GEMMs?
    speed_torch.py          how does a PyTorch user write them (F.linear, SDPA)? the baseline of the ratios
    speed_blas.py           where does minitp's time go, and what could this machine's GEMMs do?
    speed_scaling.py        how much faster is the block on t = 1, 2, 4 tensor-parallel ranks?
    allreduce_bandwidth.py  how fast is ``comm.all_reduce``, by message size, on 2 and 4 ranks?

The block and BLAS parts run in this process and are timed turn about (``harness.interleaved_best``),
so their ratios compare like with like; the scaling and bandwidth parts run in one ``mpiexec -n t``
launch of this script (``--worker``) per rank count.

Run: ``python benchmarks/speed.py`` (``--quick``: tiny sizes, a smoke test). PyTorch is optional: without
it the comparison rows say so. ``--device gpu`` times the block with CuPy against the GPU's FP32 peak
(see ``benchmarks/gpu_check.sh``). Writes ``benchmarks/results/speed.md`` and ``speed.png``.
"""
import argparse
import os
import sys
from pathlib import Path

import numpy

sys.path.insert(0, str(Path(__file__).resolve().parent))
import allreduce_bandwidth  # noqa: E402
import harness  # noqa: E402
import speed_blas  # noqa: E402
import speed_block  # noqa: E402
import speed_mlp  # noqa: E402
import speed_scaling  # noqa: E402
import speed_torch  # noqa: E402

WORKERS = {"scaling": speed_scaling.worker, "allreduce": allreduce_bandwidth.worker}


def serial(args):
    """Everything that runs in this process: the block, MLP and GPT step, the GEMM replays, the profiles."""
    from threadpoolctl import threadpool_limits

    from minitp import backend
    if args.device == "gpu":
        backend.use("gpu")
    xp = backend.xp
    threadpool_limits(args.threads, user_api="blas")  # for the rest of this process
    shape = speed_block.block_shape(args)
    repeats = 1 if args.quick else args.repeats
    dtype = numpy.float32
    result = {"threads": args.threads, "device": args.device, "shape": shape, "repeats": repeats}

    # Everything compared is timed round-robin (harness.interleaved_best): the same load for each.
    step, block, x = speed_block.minitp_block_step(shape, dtype, 0.0)
    steps = {"minitp": step}
    steps.update(speed_blas.steps(xp, shape, dtype, 256 if args.quick else args.gemm_size, result))
    steps.update(speed_block.minitp_variants(shape, dtype))
    torch = speed_block.import_torch(args, result)
    synchronize = backend.synchronize
    if torch is not None:
        device = speed_torch.use_device(torch, args.device)
        synchronize = speed_torch.synchronizer(torch, device)
        steps.update(speed_block.torch_steps(torch, block, x, shape["a"], result, device))
        if args.device == "cpu":
            result["float64_differences"] = speed_torch.float64_differences(torch)
    result.update(harness.interleaved_best(steps, repeats, synchronize=synchronize))
    speed_blas.machine_rate(result)
    result["faults"] = {"minitp": speed_blas.page_faults_per_step(step)}
    if torch is not None:
        result["faults"]["PyTorch"] = speed_blas.page_faults_per_step(steps["torch"])
    result["profile"] = speed_blas.profile(step, 14)
    if args.device == "gpu":
        result["gpu"] = speed_blas.gpu_description()
        return result
    result.update(speed_mlp.mlp(args, torch, dtype, repeats))
    result.update(speed_block.gpt(args, torch, dtype, repeats))
    return result


def worker(args):
    """One launch per rank count runs every task asked of that count; rank 0 reports them all."""
    from mpi4py import MPI
    results = {task: WORKERS[task](args) for task in args.task}
    if MPI.COMM_WORLD.rank == 0:
        harness.report(results)


# -- the report -----------------------------------------------------------------------------------

def render(r, scaling, bandwidth, out, command):
    lines = ["# Speed", "", f"Measured {harness.machine()}; {r['threads']} BLAS/PyTorch thread(s) in the serial "
             f"part, one per rank under MPI. Best of {r['repeats']} runs after a warm-up (the fastest run: "
             "noise on a shared machine only adds time).", "",
             f"Reproduce: `{command}`", ""]
    targets = speed_block.target(r) + speed_mlp.target(r) + speed_scaling.target(scaling)  # the issues' speed targets
    lines += (["## Targets", ""] + targets + [""]) if targets else []
    if r["device"] == "gpu":
        lines += speed_blas.render_gpu(r)
    lines += speed_block.render_heading(r) + speed_blas.render_rate(r) + speed_block.render_table(r)
    lines += speed_blas.render_share(r) + speed_block.render_no_torch(r) + render_same_computation(r)
    lines += speed_blas.render_faults(r)
    lines += speed_blas.render_profile(r) + speed_mlp.render(r) + speed_block.render_gpt(r)
    lines += speed_scaling.render(scaling) + allreduce_bandwidth.render(bandwidth)
    plot(scaling, bandwidth, out, lines)
    return "\n".join(lines)


def render_same_computation(r):
    differences = r.get("float64_differences")
    if not differences:
        return []
    return ["The same computation: in float64 (random weights), idiomatic PyTorch minus minitp, largest "
            "difference: " + ", ".join(f"{name} {value:.1e}" for name, value in differences.items()) + ".", ""]


def plot(scaling, bandwidth, out, lines):
    """speed.png: the scaling panels and the bandwidth panel, side by side (whichever ran)."""
    if not scaling and not bandwidth:
        return
    plt = harness.pyplot()
    if plt is None:
        return
    panels = (speed_scaling.PANELS if scaling else 0) + (allreduce_bandwidth.PANELS if bandwidth else 0)
    figure, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2), squeeze=False)
    axes = list(axes[0])
    if scaling:
        speed_scaling.draw(axes.pop(0), axes.pop(0), scaling)
    if bandwidth:
        allreduce_bandwidth.draw(axes.pop(0), bandwidth)
    figure.tight_layout()
    figure.savefig(Path(out) / "speed.png", dpi=110)
    plt.close(figure)
    lines += ["![scaling and bandwidth](speed.png)", ""]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: a smoke test in seconds")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")),
                        help="BLAS and PyTorch threads in the serial part (default $OMP_NUM_THREADS or 1)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (the best is kept)")
    parser.add_argument("--gemm-size", type=int, default=2048, help="side of the squares for the GEMM rate")
    parser.add_argument("--tp", type=int, nargs="*", help="ranks for strong scaling (default 1 2 4; 1 2 with --quick)")
    parser.add_argument("--bandwidth-ranks", type=int, nargs="*", help="ranks for all-reduce bandwidth (default 2 4)")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--block", type=int, nargs=4, metavar=("S", "B", "H", "A"),
                        help="the block's size (default s=256 b=4 h=512 a=8)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison (its import is slow)")
    parser.add_argument("--out", help="directory for speed.md and speed.png (default benchmarks/results)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--task", nargs="+", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    args.tp = args.tp if args.tp is not None else ([1, 2] if args.quick else [1, 2, 4])
    bandwidth_ranks = args.bandwidth_ranks if args.bandwidth_ranks is not None else ([2] if args.quick else [2, 4])
    common = ["--device", args.device, "--repeats", args.repeats] + (["--quick"] if args.quick else [])
    if args.block:
        common += ["--block", *args.block]
    result = serial(args)
    scaling, bandwidth = [], []
    for ranks in sorted(set(args.tp) | set(bandwidth_ranks)):  # one launch per rank count, every task in it
        tasks = [task for task, counts in (("scaling", args.tp), ("allreduce", bandwidth_ranks)) if ranks in counts]
        measured = harness.launch(__file__, ranks, common + ["--task", *tasks], env=harness.ONE_THREAD)
        scaling += [measured["scaling"]] if "scaling" in measured else []
        bandwidth += [measured["allreduce"]] if "allreduce" in measured else []
    command = "python benchmarks/speed.py " + " ".join(sys.argv[1:])
    harness.publish(args.out, "speed.md", lambda out: render(result, scaling, bandwidth, out, command.strip()))


if __name__ == "__main__":
    main()
