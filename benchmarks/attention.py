"""Blockwise attention against the dense core and PyTorch's SDPA: the bytes each keeps for backward, and
their time forward + backward.

1. Bytes (``track_saved``) of the attention core alone, s = 256 … 4096, against the formulas: dense
   e(3sbh + as²b) + e (scaled q, k, v, the softmax output, the 0-d 1/√d), blockwise e(4sbh + asb)
   (q, k, v, O and one lse per row). No dropout: with it the dense core also keeps a bool mask and the
   dropped probabilities (as²b(1 + e)); blockwise draws the mask again in backward and keeps nothing more.
2. Time, causal, float32, best of N turn about: the dense core, blockwise (``BLOCK`` and other block
   sizes), and ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)``; one thread on the
   CPU, or ``--device gpu`` (CuPy; PyTorch on CUDA, TF32 off) at the issue's three block shapes.

Run: ``python benchmarks/attention.py`` (``--quick``: tiny, a smoke test). Writes
``benchmarks/results/attention.md`` (``--out``).
"""
import argparse
import os
import sys
from pathlib import Path

import numpy

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

BYTES_SEQ = [256, 512, 1024, 2048, 4096]
BYTES_SHAPE = dict(b=1, a=2, d=32)
CPU_SHAPES = [(256, 4, 8, 64), (1024, 1, 8, 64), (2048, 1, 8, 64)]  # (s, b, a, d)
GPU_SHAPES = [(256, 4, 8, 64), (1024, 8, 16, 64), (2048, 8, 16, 128)]  # the blocks: h = a·d
BLOCKS = {"cpu": [64, 128, 256], "gpu": [128, 512, 1024]}


def leaves(shape, dtype, seed=0):
    from minitp import Tensor, backend
    rng = numpy.random.default_rng(seed)
    return [Tensor(backend.from_host(rng.standard_normal(shape).astype(dtype)), requires_grad=True) for _ in range(3)]


def saved_bytes(seq, kind):
    from minitp import functional as F, track_saved
    b, a, d = BYTES_SHAPE.values()
    q, k, v = leaves((b, a, seq, d), numpy.float32)
    with track_saved() as saved:
        F.attention(q, k, v, True, None, kind=kind)
    return saved.total


def formula(seq, kind):
    b, a, d = BYTES_SHAPE.values()
    e, h = 4, a * d
    return e * (3 * seq * b * h + a * seq * seq * b) + e if kind == "dense" else e * (4 * seq * b * h + a * seq * b)


def timings(shape, device, repeats, torch):
    """{name: seconds} of forward + backward, turn about."""
    from minitp import backend, functional as F
    from minitp.functional.blockwise_attention import blockwise_attention
    s, b, a, d = shape
    q, k, v = leaves((b, a, s, d), numpy.float32)
    upstream = backend.from_host(numpy.random.default_rng(1).standard_normal(q.shape).astype(numpy.float32))

    def minitp_step(run):
        def step():
            fresh = [type(x)(x.data, requires_grad=True) for x in (q, k, v)]
            run(*fresh).backward(upstream)
        return step
    steps = {"dense": minitp_step(lambda *t: F.attention_core(*t, True, None))}
    for block in BLOCKS[device]:
        if block < s:
            steps[f"blockwise {block}"] = minitp_step(lambda *t, block=block: blockwise_attention(*t, True, None, block))
    synchronize = backend.synchronize
    if torch is not None:
        import speed_torch
        where = speed_torch.use_device(torch, device)
        tq = [torch.tensor(backend.to_host(x.data), device=where) for x in (q, k, v)]
        tu = torch.tensor(backend.to_host(upstream), device=where)

        def sdpa():
            fresh = [x.clone().requires_grad_() for x in tq]
            torch.nn.functional.scaled_dot_product_attention(*fresh, is_causal=True).backward(tu)
        steps["PyTorch SDPA"] = sdpa
        synchronize = speed_torch.synchronizer(torch, where)
    return harness.interleaved_best(steps, repeats, synchronize=synchronize)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-bytes", action="store_true", help="skip the bytes table")
    parser.add_argument("--out")
    args = parser.parse_args()
    from threadpoolctl import threadpool_limits
    threadpool_limits(int(os.environ.get("OMP_NUM_THREADS", "1")), user_api="blas")
    from minitp import backend
    if args.device == "gpu":
        backend.use("gpu")
    try:
        import torch
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        version = torch.__version__
    except ImportError:
        torch, version = None, None
    lines = ["# Blockwise attention, the dense core and PyTorch's SDPA", "",
             f"Measured {harness.machine()}; PyTorch {version or 'not installed'}"
             f"{', CUDA, TF32 off' if args.device == 'gpu' else ', 1 CPU thread'}.", ""]
    if not args.no_bytes:
        seqs = [64, 256] if args.quick else BYTES_SEQ
        rows = []
        for seq in seqs:
            dense, blockwise = saved_bytes(seq, "dense"), saved_bytes(seq, "blockwise")
            rows.append([seq, f"{dense:,}", f"{dense / formula(seq, 'dense'):.4f}", f"{blockwise:,}",
                         f"{blockwise / formula(seq, 'blockwise'):.4f}", f"{dense / blockwise:.1f}"])
        b, a, d = BYTES_SHAPE.values()
        lines += [f"## Bytes kept for backward (track_saved), causal, float32, b={b}, a={a}, d={d}", "",
                  "dense formula e(3sbh + as²b) + e; blockwise e(4sbh + asb).", "",
                  harness.table(["s", "dense B", "/ formula", "blockwise B", "/ formula", "dense / blockwise"],
                                rows), ""]
    shapes = [(16, 2, 2, 8), (64, 2, 2, 8)] if args.quick else (GPU_SHAPES if args.device == "gpu" else CPU_SHAPES)
    rows = []
    for shape in shapes:
        best = timings(shape, args.device, 1 if args.quick else args.repeats, torch)
        for name, seconds in best.items():
            sdpa = best.get("PyTorch SDPA")
            rows.append(["s={} b={} a={} d={}".format(*shape), name, harness.ms(seconds),
                         f"{seconds / best['dense']:.2f}", f"{seconds / sdpa:.2f}" if sdpa else "-"])
    lines += ["## Time, forward + backward, causal, float32 (best of turns)", "",
              harness.table(["shape", "core", "ms", "× dense", "× SDPA"], rows, "llrrr"), ""]
    harness.publish(args.out, "attention.md", lambda out: "\n".join(lines))


if __name__ == "__main__":
    main()
