"""Communication per transformer layer: the ring bytes each rank sends, forward and backward, from the
collective log -- tensor parallelism (TP) against TP + sequence parallelism (SP) and the papers' formulas;
then the vocab-parallel cross-entropy against gathering the logits.

The facts to reproduce (S = sbh·e bytes, one s×b×h activation; ring collectives on t ranks):

- TP (Shoeybi et al. 2019): 2 all-reduces of S forward (f̄ after attention and after the MLP) and 2
  backward (f before each), each sending 2(t-1)/t·S per rank: 4(t-1)/t·S each way.
- TP+SP (Korthikanti et al. 2022): each all-reduce becomes a reduce-scatter plus an all-gather, (t-1)/t·S
  each: the same 4(t-1)/t·S each way.
- Vocab-parallel cross-entropy: three all-reduces of s·b numbers (max, target logit, sum of
  exponentials) instead of gathering the s×b×V logits.

Run: ``python benchmarks/comm.py`` (launches ``mpiexec -n 4`` itself; ``--quick`` for a smoke run).
Writes ``benchmarks/results/comm.md``.
"""
import sys
from pathlib import Path

import numpy

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

E = 4  # float32
SHAPE, QUICK_SHAPE = (256, 2, 256, 4), (8, 2, 16, 4)  # (s, b, h, a)
VOCAB, QUICK_VOCAB = 50304, 64  # GPT-2's 50257 padded to a multiple of 128, as Megatron does
CONFIGS = [("TP", False, None), ("TP+SP", True, None), ("TP+SP + selective", True, "selective"),
           ("TP + full", False, "full"), ("TP+SP + full", True, "full")]


def ring(t, payload, all_reduce=False):
    """Bytes one rank sends in a ring collective over t ranks on a full buffer of ``payload`` bytes."""
    return (2 if all_reduce else 1) * (t - 1) / t * payload


def formula(label, s, b, h, t, direction):
    """The papers' ring bytes per rank for one layer: 2 all-reduces (TP) or 2 reduce-scatter + all-gather
    pairs (SP) of S each way; full recomputation re-runs the forward's collectives in backward."""
    each_way = 2 * ring(t, s * b * h * E, all_reduce=True)
    return 2 * each_way if (direction == "backward" and "full" in label) else each_way


def known_extras(label, s, b, h, t):
    """{which collective, why: bytes} that minitp's backward sends beyond the formula (SP only)."""
    if "SP" not in label:
        return {}
    return {
        "all-gather of the qkv and fc1 inputs again, for dA = Xᵀ dY (SP keeps only the s/t-token shard "
        "of X: Megatron-LM does the same and overlaps it with the dX GEMM)": 2 * ring(t, s * b * h * E),
        "all-reduce of the gradients of the replicated LayerNorm weights and biases and the row-parallel "
        "biases (6 vectors of h): each rank saw only its s/t tokens": 6 * ring(t, h * E, all_reduce=True),
    }


# -- the worker -------------------------------------------------------------------------------------

def records(log):
    return [{"op": r.op, "tag": r.tag, "shape": list(r.shape), "payload": r.payload_bytes, "ring": r.ring_bytes}
            for r in log]


def worker(args):
    from mpi4py import MPI

    from minitp import comm
    from minitp.autograd import Tensor
    from minitp.parallel import ParallelTransformerBlock

    comm.install_abort_handler()
    world = MPI.COMM_WORLD
    s, b, h, a = QUICK_SHAPE if args.quick else SHAPE
    vocab = QUICK_VOCAB if args.quick else VOCAB
    rng = numpy.random.default_rng(0)
    x_full = rng.standard_normal((s, b, h)).astype(numpy.float32)
    upstream_full = rng.standard_normal((s, b, h)).astype(numpy.float32)
    layers, losses = [], []
    for t in args.tp:
        group = comm.Group(world.Split(color=world.rank // t, key=world.rank), "tp")
        for label, sequence_parallel, recompute in CONFIGS:
            block = ParallelTransformerBlock(h, a, dropout=0.1, attention_dropout=0.1, dtype=numpy.float32,
                                             sequence_parallel=sequence_parallel, group=group, recompute=recompute)
            cut = (lambda array: numpy.ascontiguousarray(comm.split(array, group, 0))) if sequence_parallel \
                else (lambda array: array)
            with comm.log_collectives() as forward:
                y = block(Tensor(cut(x_full), requires_grad=True))
            with comm.log_collectives() as backward:
                y.backward(cut(upstream_full))
            layers.append({"t": t, "config": label, "forward": records(forward), "backward": records(backward)})
        losses.append(cross_entropy_traffic(group, s, b, vocab, rng))
        group.comm.Free()
    if world.rank == 0:
        harness.report({"shape": [s, b, h, a], "vocab": vocab, "layers": layers, "losses": losses})


def cross_entropy_traffic(group, s, b, vocab, rng):
    """The collectives of the vocab-parallel cross-entropy and of gather-then-cross-entropy, on logits
    split by vocabulary over ``group``; or a note when the vocab-parallel op is not there."""
    from minitp import comm
    from minitp import functional as F
    from minitp.autograd import Tensor
    from minitp.parallel.tensor import mappings
    try:
        from minitp.parallel.tensor.cross_entropy import vocab_parallel_cross_entropy
    except ImportError as error:
        return {"t": group.size, "skipped": f"minitp.parallel.tensor.cross_entropy not available ({error})"}
    t = group.size
    if vocab % t:
        return {"t": t, "skipped": f"vocab {vocab} not divisible by t={t}"}
    logits = numpy.random.default_rng(1).standard_normal((s, b, vocab)).astype(numpy.float32)
    shard = numpy.ascontiguousarray(comm.split(logits, group, -1))
    targets = numpy.random.default_rng(2).integers(0, vocab, (s, b))
    result = {"t": t}
    for name in ("vocab-parallel", "gather logits"):
        tensor = Tensor(shard, requires_grad=True)
        with comm.log_collectives() as forward:
            if name == "vocab-parallel":
                loss = vocab_parallel_cross_entropy(tensor, targets, group=group)
            else:
                loss = F.cross_entropy(mappings.gather_from_tensor_parallel_region(tensor, group, "logits"), targets)
        with comm.log_collectives() as backward:
            loss.backward()
        result[name] = {"forward": records(forward), "backward": records(backward), "loss": float(loss.data)}
    return result


# -- the driver -------------------------------------------------------------------------------------

def total(entries):
    return sum(r["ring"] for r in entries)


def render(data, directory=None):  # directory: where plots would go; comm.md has none
    s, b, h, a = data["shape"]
    vocab = data["vocab"]
    S = s * b * h * E
    lines = [
        "# Communication per transformer layer",
        "",
        f"Measured {harness.machine(timings=False)}.",
        "",
        f"One layer, s={s}, b={b}, h={h}, a={a}, float32: S = sbh·e = {S:,} bytes. Ring bytes one rank sends "
        "(`minitp.comm.log_collectives()`: 2(t-1)/t·S per all-reduce, (t-1)/t·S per all-gather or "
        "reduce-scatter). Formula: 2 all-reduces of S each way for TP, 2 reduce-scatter + all-gather pairs "
        "for TP+SP: 4(t-1)/t·S forward and the same backward; full recomputation repeats the forward's "
        "collectives in backward. *Known* is what minitp sends beyond the formula (listed below the table).",
        "",
    ]
    rows = []
    for entry in data["layers"]:
        t, label = entry["t"], entry["config"]
        extras = sum(known_extras(label, s, b, h, t).values())
        for direction in ("forward", "backward"):
            measured, expected = total(entry[direction]), formula(label, s, b, h, t, direction)
            known = extras if direction == "backward" else 0
            rows.append([label, t, direction, len(entry[direction]), f"{measured:,.0f}", f"{expected:,.0f}",
                         "-" if expected == 0 else f"{measured / expected:.4f}", f"{known:,.0f}",
                         f"{measured - expected - known:,.0f}"])
    lines += [harness.table(["config", "t", "pass", "collectives", "measured B/rank", "formula B/rank", "ratio",
                             "known B", "unexplained B"], rows, "lrlrrrrrr"), ""]
    lines += ["Beyond the formula (TP+SP backward):", ""]
    t_max = max(entry["t"] for entry in data["layers"])
    for why, amount in known_extras("TP+SP", s, b, h, t_max).items():
        lines.append(f"- {why}: {amount:,.0f} B at t={t_max}.")
    lines += ["- Selective recomputation adds nothing: the attention core has no collective. Full recomputation "
              "re-runs the layer's forward, collectives included, inside backward.", ""]
    detail = next(e for e in data["layers"] if e["t"] == t_max and e["config"] == "TP+SP")
    lines += [f"Every collective of one TP+SP layer at t={t_max}:", ""]
    lines += [harness.table(["pass", "op", "tag", "shape", "payload B", "ring B/rank"],
                            [[direction, r["op"], r["tag"], "×".join(map(str, r["shape"])), f"{r['payload']:,}",
                              f"{r['ring']:,.0f}"] for direction in ("forward", "backward") for r in detail[direction]],
                            "lllrrr"), ""]

    lines += ["## Cross-entropy over a vocabulary split t ways", "",
              f"Logits (s, b, V) = ({s}, {b}, {vocab}) float32, split by vocabulary. *vocab-parallel*: "
              "`vocab_parallel_cross_entropy` (all-reduce the max, the target logit and the sum of exponentials: "
              f"3 messages of s·b·e = {s * b * E:,} bytes, formula 3·2(t-1)/t·sb·e, nothing backward). "
              "*gather logits*: all-gather the logits, then the ordinary cross-entropy "
              "(formula (t-1)/t·sbV·e forward; backward keeps its columns, nothing sent).", ""]
    rows = []
    for entry in data["losses"]:
        t = entry["t"]
        if "skipped" in entry:
            rows.append([t, "skipped", entry["skipped"], "", "", "", ""])
            continue
        for name, expected in (("vocab-parallel", 3 * ring(t, s * b * E, all_reduce=True)),
                               ("gather logits", ring(t, s * b * vocab * E))):
            forward, backward = entry[name]["forward"], entry[name]["backward"]
            rows.append([t, name, len(forward) + len(backward), f"{total(forward):,.0f}", f"{total(backward):,.0f}",
                         f"{expected:,.0f}", f"{entry[name]['loss']:.6f}"])
    lines += [harness.table(["t", "method", "collectives", "forward B/rank", "backward B/rank", "formula B/rank",
                             "loss"], rows, "rlrrrrr"), ""]
    split = [e for e in data["losses"] if "skipped" not in e and e["t"] > 1]
    if split:
        e = split[-1]
        ratio = total(e["gather logits"]["forward"]) / total(e["vocab-parallel"]["forward"])
        lines += [f"At t={e['t']} gathering the logits sends {ratio:,.0f}× the bytes (V/6 = {vocab / 6:,.0f}: "
                  "the s×b×V logits against 3 s×b vectors, each all-reduced at twice an all-gather's ring cost), "
                  "and both give the same loss.", ""]
    return "\n".join(lines)


def main():
    harness.main_for_exact_counts(__file__, __doc__.split("\n")[0], worker, render, "comm.md")


if __name__ == "__main__":
    main()
