"""The GPT block at several shapes in one process, minitp against PyTorch written both ways: the short
side-by-side of ``make gpu-check``'s quick step (``--device gpu``: CuPy against PyTorch on CUDA, TF32
off), also runnable on the CPU.

Per shape, turn about: minitp's block forward + backward (and with dropout 0.1), its GEMMs alone,
PyTorch idiomatic (F.linear, SDPA) and as minitp writes it (x @ W + b, attention by hand), each with
and without dropout. Ratios are against idiomatic PyTorch (the issue's 1.0× target) and PyTorch SDPA
as-minitp (1.2×); the share of the big-GEMM rate is minitp's (the issue's ≥ 80% at the large shape).

Run: ``python benchmarks/speed_shapes.py --device gpu`` (``--quick``: tiny shapes). Writes
``speed_shapes.md`` in ``--out`` (default benchmarks/results).
"""
import argparse
import os
import sys
from pathlib import Path

import numpy

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import speed_blas  # noqa: E402
import speed_block  # noqa: E402
import speed_torch  # noqa: E402

SHAPES = [(256, 4, 512, 8), (1024, 8, 1024, 16), (2048, 8, 2048, 16)]  # the (s, b, h, a)
QUICK = [(16, 2, 32, 4), (32, 2, 64, 4)]


def measure(shape, device, repeats, torch):
    from minitp import backend
    dtype = numpy.float32
    step, block, x = speed_block.minitp_block_step(shape, dtype, 0.0)
    result = {}
    steps = {"minitp": step, "minitp_dropout": speed_block.minitp_block_step(shape, dtype, speed_block.DROPOUT)[0],
             "gemm_replay": speed_blas.replay_gemms(backend.xp, speed_blas.block_gemms(**shape), dtype)}
    result["flops"] = speed_blas.gemm_flops(speed_blas.block_gemms(**shape))
    synchronize = backend.synchronize
    if torch is not None:
        where = speed_torch.use_device(torch, device)
        synchronize = speed_torch.synchronizer(torch, where)
        steps.update(speed_block.torch_steps(torch, block, x, shape["a"], result, where))
        steps["torch_sdpa"] = speed_block.torch_block_step(torch, block, x, shape["a"], 0.0, True, where)[0]
    result.update(harness.interleaved_best(steps, repeats, synchronize=synchronize))
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--gemm-size", type=int, default=8192)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    from minitp import backend
    if args.device == "gpu":
        backend.use("gpu")
    else:
        from threadpoolctl import threadpool_limits
        threadpool_limits(1, user_api="blas")
    try:
        import torch
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    except ImportError:
        torch = None
    gemm_size = 256 if args.quick else args.gemm_size
    square = speed_blas.big_square_gemm(backend.xp, numpy.float32, gemm_size)
    rate = 2 * gemm_size ** 3 / harness.best_time(square, 3, synchronize=backend.synchronize)
    rows = []
    for s, b, h, a in (QUICK if args.quick else SHAPES):
        r = measure(dict(s=s, b=b, h=h, a=a), args.device, 1 if args.quick else args.repeats, torch)
        idiomatic, sdpa = r.get("torch_idiomatic"), r.get("torch_sdpa")

        def ratio(seconds, base):
            return f"{seconds / base:.2f}" if base else "-"
        rows.append([f"s={s} b={b} h={h} a={a}", harness.ms(r["minitp"]), ratio(r["minitp"], idiomatic),
                     ratio(r["minitp"], r.get("torch")), ratio(r["minitp"], sdpa),
                     f"{100 * r['flops'] / r['minitp'] / rate:.0f}%", f"{100 * r['flops'] / r['gemm_replay'] / rate:.0f}%",
                     f"{100 * (r['minitp_dropout'] / r['minitp'] - 1):+.0f}%",
                     f"{100 * (r['torch_idiomatic_dropout'] / idiomatic - 1):+.0f}%" if idiomatic else "-"])
    where = "CUDA, TF32 off" if args.device == "gpu" else "1 CPU thread"
    version = torch.__version__ if torch is not None else "not installed"
    lines = ["# The block at several shapes, minitp against PyTorch", "",
             f"Measured {harness.machine()}; device {args.device}; PyTorch {version} ({where}); float32, forward + "
             f"backward, best of {1 if args.quick else args.repeats} turn about; big-GEMM rate "
             f"{harness.rate(rate)}FLOP/s ({gemm_size}² squares).", "",
             harness.table(["shape", "minitp ms", "× idiomatic PyTorch", "× PyTorch as minitp",
                            "× PyTorch as minitp + SDPA", "minitp of GEMM rate", "its GEMMs alone",
                            "minitp dropout 0.1", "PyTorch dropout 0.1"], rows), ""]
    harness.publish(args.out, "speed_shapes.md", lambda out: "\n".join(lines))


if __name__ == "__main__":
    main()
