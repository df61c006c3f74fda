"""python -m minitp.plan: plan a GPT's training on a mesh -- memory per rank and pipeline stage, bytes per axis,
the bubble, the flops; whether it fits in --gpu-memory, and the smallest change that makes it fit.

    python -m minitp.plan --hidden 8192 --layers 80 --heads 64 --seq 4096 --tp 8 --pp 4 --dp 2 --sp \\
        --recompute selective --zero 1 --dtype bf16 --gpu-memory 80 --png plan.png

Defaults: a GPT-2-style model as minitp builds it (MLP 4h, learned positions, untied head), V = 50304
(GPT-2's 50257 padded to a multiple of 128, as Megatron pads it), s = 2048, dropout 0.1, micro-batch 1 and
a global batch of 8·pp·dp micro-batches (m = 8·pp: the 1F1B bubble (p−1)/(m+p−1) below 1/8), float32.
--gpu-memory is in GiB (an "80 GB" GPU holds 80 GiB).
"""
import argparse
import sys

from minitp.plan import report, search
from minitp.plan.core import plan
from minitp.plan.shapes import GRAD_REDUCE, ITEMSIZE, Choices, Mesh, Model


def parse(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minitp.plan", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--hidden", type=int, required=True, help="h")
    add("--layers", type=int, required=True, help="l")
    add("--heads", type=int, required=True, help="a")
    add("--seq", type=int, default=2048, help="s (the model's seq_len and the batch's)")
    add("--vocab", type=int, default=50304, help="V (GPT-2's 50257 padded to a multiple of 128)")
    add("--ffn", type=int, default=None, help="MLP width f (unset: 4h)")
    add("--tie-embeddings", action="store_true", help="the LM head reuses the token table")
    add("--dropout", type=float, default=0.1, help="dropout (masks are kept for backward when > 0)")
    add("--micro-batch", type=int, default=1, help="b: sequences per microbatch per replica")
    add("--global-batch", type=int, default=None, help="B (unset: 8·pp·dp·b)")
    for axis in ("dp", "pp", "cp", "tp", "ep"):
        add(f"--{axis}", type=int, default=1, help=f"{axis} size")
    add("--virtual-stages", type=int, default=1, help="v: model chunks per pipeline rank (interleaved)")
    add("--sp", action="store_true", help="sequence parallelism")
    add("--recompute", choices=["none", "selective", "full"], default="none")
    add("--zero", type=int, choices=[0, 1, 2, 3], default=0, help="ZeRO stage (3 with pp > 1: formula only)")
    add("--dtype", choices=list(ITEMSIZE), default="float32",
        help="bf16/fp16: mixed precision (2-byte model, fp32 master weights and moments)")
    add("--grad-reduce", choices=list(GRAD_REDUCE), default="model",
        help="mixed precision: reduce the gradients in the model's dtype or in fp32 (4 bytes on the wire)")
    add("--schedule", choices=["afab", "1f1b", "interleaved"], default="1f1b")
    add("--cp-kind", choices=["ring", "zigzag", "ulysses"], default="ring")
    add("--experts", type=int, default=0, help="MoE experts per layer (activations and all-to-alls evenly spread: formula only)")
    add("--top-k", type=int, default=1)
    add("--bucket-mb", type=float, default=25.0, help="gradient bucket size, MiB")
    add("--gpu-memory", type=float, default=80.0, help="GiB per GPU")
    add("--png", metavar="FILE", help="draw the memory per pipeline stage as stacked bars")
    add("--sources", action="store_true", help="print each figure's formula and paper")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    try:
        model = Model(vocab=args.vocab, seq_len=args.seq, hidden=args.hidden, heads=args.heads, layers=args.layers,
                      ffn_hidden=args.ffn, dropout=args.dropout, tie_embeddings=args.tie_embeddings,
                      experts=args.experts, top_k=args.top_k)
        mesh = Mesh(dp=args.dp, pp=args.pp, cp=args.cp, tp=args.tp, ep=args.ep, virtual_stages=args.virtual_stages)
        choices = Choices(micro_batch=args.micro_batch,
                          global_batch=args.global_batch or 8 * args.pp * args.dp * args.micro_batch,
                          sequence_parallel=args.sp, recompute=None if args.recompute == "none" else args.recompute,
                          zero=args.zero, precision=args.dtype, grad_reduce=args.grad_reduce, schedule=args.schedule, cp_kind=args.cp_kind,
                          bucket_bytes=int(args.bucket_mb * 2 ** 20))
        result = plan(model, mesh, choices)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    budget = args.gpu_memory * 2 ** 30
    print(report.table(result))
    if args.sources:
        print(report.sources(result))
    worst = result.worst()
    name, figure = worst.largest()
    fits = result.peak <= budget
    print(f"fits: {'yes' if fits else 'NO'} -- the busiest rank (stage {worst.stage}) needs {worst.total / 2 ** 30:,.2f} "
          f"GiB of {args.gpu_memory:g} GiB; its largest consumer is {name} ({figure.value / 2 ** 30:,.2f} GiB: "
          f"{figure.formula})")
    if not fits:
        moves, better = search.smallest_change(model, mesh, choices, budget)
        if moves is None:
            print("no change of up to 3 moves makes it fit")
        else:
            print(f"smallest change that fits: {' '.join(moves)} -> {better.peak / 2 ** 30:,.2f} GiB on the busiest "
                  f"rank (smallest = fewest changes; then the same GPUs; then the fewest bytes sent; then the fewest flops)")
    if args.png:
        from minitp.plan import picture
        picture.draw(result, args.png, budget)
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
