"""Context parallelism, counted: the bytes ring attention and Ulysses send per rank as s and cp grow, against
their formulas; the causal work per rank, contiguous blocks against zigzag; the activation bytes per rank
against 1/cp; and the largest float64 difference from the serial GPT for each configuration.

The formulas (per rank, per layer; B = (s/cp)·b·h·e, one rank's share of an s×b×h activation):

- ring attention: K and V make cp - 1 hops forward, 2(cp-1)·B; backward K, V again and the dK, dV
  accumulators home, 4(cp-1)·B -- whatever the placement (contiguous or zigzag);
- Ulysses: an all-to-all of q, k, v and one of the output, each rank sending (cp-1)/cp of its blocks:
  4(cp-1)/cp·B forward and the same backward.

Run: ``python benchmarks/context.py`` (launches ``mpiexec -n 4`` itself; ``--quick`` for a smoke run).
Writes ``benchmarks/results/context.md``.
"""
import argparse
import sys
from pathlib import Path

import numpy

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

E = 4  # float32
KINDS = ("ring", "zigzag", "ulysses")
SEQS, QUICK_SEQS = (256, 512, 1024), (16, 32)
HEADS, HEAD_DIM, BATCH = 4, 32, 1  # h = 128
WORK_SEQ, WORK_CPS = 1024, (2, 4, 8)


def formula(kind, s, cp, direction):
    block = (s // cp) * BATCH * HEADS * HEAD_DIM * E
    if kind == "ulysses":
        return 4 * (cp - 1) / cp * block
    return (2 if direction == "forward" else 4) * (cp - 1) * block


# -- the worker -------------------------------------------------------------------------------------

def worker(args):
    from mpi4py import MPI

    from minitp import comm

    comm.install_abort_handler()
    world = MPI.COMM_WORLD
    seqs = QUICK_SEQS if args.quick else SEQS
    data = {"traffic": [], "activations": [], "equality": []}
    for cp in args.cp:
        group = comm.Group(world.Split(color=world.rank // cp, key=world.rank), "cp")
        for s in seqs:
            data["traffic"] += traffic(group, s)
        data["activations"] += activations(group, seqs[-1])
        group.comm.Free()
    data["equality"] = equality(world.size)
    if world.rank == 0:
        harness.report(data)


def usable(cp):
    """The kinds that run at this cp: Ulysses needs cp to divide the heads."""
    return [kind for kind in KINDS if kind != "ulysses" or HEADS % cp == 0]


def traffic(group, s):
    """The bytes each kind sends forward and backward, from the collective log."""
    from minitp import Tensor, comm
    from minitp.parallel import ring_attention, ulysses_attention

    rows = []
    for kind in usable(group.size):
        layout = "zigzag" if kind == "zigzag" else "contiguous"
        rng = numpy.random.default_rng(group.rank)
        leaves = [Tensor(rng.standard_normal((BATCH, HEADS, s // group.size, HEAD_DIM)).astype(numpy.float32),
                         requires_grad=True) for _ in range(3)]
        with comm.log_collectives() as forward:
            if kind == "ulysses":
                out = ulysses_attention(*leaves, group=group)
            else:
                out = ring_attention(*leaves, group=group, layout=layout)
        with comm.log_collectives() as backward:
            out.backward(numpy.ones(out.shape, dtype=numpy.float32))
        rows.append({"kind": kind, "s": s, "cp": group.size, "forward": forward.total_ring_bytes(),
                     "backward": backward.total_ring_bytes(), "messages": [len(forward), len(backward)]})
    return rows


def activations(group, s):
    """Bytes one transformer layer keeps for backward on one rank (track_saved), each kind, this cp."""
    from mpi4py import MPI

    from minitp import Tensor, comm, track_saved
    from minitp.nn import TransformerBlock
    from minitp.parallel import ContextParallelLayers

    tp = comm.Group(MPI.COMM_SELF, "tp")
    hidden = HEADS * HEAD_DIM
    rows = []
    for kind in usable(group.size):
        block = TransformerBlock(hidden, HEADS, dropout=0.1, attention_dropout=0.1, dtype=numpy.float32,
                                 layers=ContextParallelLayers(tp, group, kind))
        x = Tensor(numpy.random.default_rng(0).standard_normal((s // group.size, BATCH, hidden)).astype(numpy.float32),
                   requires_grad=True)
        with track_saved() as kept:
            block(x)
        rows.append({"kind": kind, "s": s, "cp": group.size, "bytes": kept.total})
    return rows


def equality(world_size):
    """The largest float64 difference from the serial GPT -- logits, loss, every gradient -- for each kind
    on each (cp, tp) this world allows, dropout on."""
    from mpi4py import MPI

    from minitp import comm
    from minitp import functional as F
    from minitp.nn import GPT, GPTConfig
    from minitp.parallel import (ParallelGPT, all_reduce_gradients, average_over_data_parallel, gather_serial_grads,
                                 split_batch)
    from minitp.testing import max_error

    config = GPTConfig(vocab=24, seq_len=16, hidden=16, heads=8, layers=2, dropout=0.1, seed=5, dtype="float64")
    windows = numpy.random.default_rng(0).integers(0, 24, (17, 8))  # 8 columns: split over dp <= 8
    ids, targets = windows[:-1], windows[1:]
    serial = GPT(config)
    logits_serial = serial(ids)
    loss_serial = F.cross_entropy(logits_serial, targets)
    loss_serial.backward()
    meshes = [(cp, 1, False) for cp in (1, 2, 4, 8) if world_size % cp == 0] + \
             [(cp, 2, True) for cp in (2, 4) if world_size % (2 * cp) == 0]
    rows = []
    for cp, tp, sequence_parallel in meshes:
        mesh = comm.init(tp=tp, cp=cp, dp=world_size // (cp * tp))
        for kind in KINDS:
            model = ParallelGPT(config, mesh, sequence_parallel=sequence_parallel, context_parallel=kind)
            loss = model.loss(split_batch(ids, mesh), split_batch(targets, mesh))  # the replica's columns
            loss.backward()
            all_reduce_gradients(model, mesh)
            grads = gather_serial_grads(model, mesh.tp)
            worst = max([abs(average_over_data_parallel(loss.item(), mesh) - loss_serial.item())]
                        + [max_error(grads[name], p.grad) for name, p in serial.named_parameters()])
            worst = mesh.world.comm.allreduce(worst, op=MPI.MAX)
            rows.append({"kind": kind, "cp": cp, "tp": tp, "sp": sequence_parallel, "error": worst})
    return rows


# -- the driver -------------------------------------------------------------------------------------

def work_rows():
    """Attended (query, key) pairs per rank: max/min over the ranks, contiguous against zigzag."""
    from minitp.parallel import attended_pairs

    rows = []
    for cp in WORK_CPS:
        pairs = {layout: [attended_pairs(r, cp, WORK_SEQ, layout) for r in range(cp)] for layout in ("contiguous", "zigzag")}
        C = WORK_SEQ // cp
        rows.append([cp, f"{min(pairs['contiguous']):,}", f"{max(pairs['contiguous']):,}",
                     f"{max(pairs['contiguous']) / min(pairs['contiguous']):.3f}", f"{1 + 2 * (cp - 1) * C / (C + 1):.3f}",
                     2 * cp - 1, f"{min(pairs['zigzag']):,}", f"{max(pairs['zigzag']):,}",
                     f"{max(pairs['zigzag']) / min(pairs['zigzag']):.3f}"])
    return rows


def render(data, directory=None):
    block = f"b={BATCH}, a={HEADS}, d={HEAD_DIM} (h={HEADS * HEAD_DIM}), float32"
    lines = ["# Context parallelism: bytes, work and activations per rank", "",
             f"Measured {harness.machine(timings=False)}.", "",
             "## Bytes each rank sends per layer", "",
             f"Attention alone, {block}; B = (s/cp)·b·h·e. Ring: 2(cp-1)·B forward, 4(cp-1)·B backward (the "
             "same for contiguous and zigzag placement); Ulysses: 4(cp-1)/cp·B each way. Measured: the "
             "collective log's bytes sent by rank 0 (`sendrecv`, `all_to_all`); at cp = 1 nothing is sent.", ""]
    rows = []
    for entry in data["traffic"]:
        if entry["cp"] == 1:
            continue  # one rank: every exchange is a no-op that sends nothing
        for direction in ("forward", "backward"):
            measured, expected = entry[direction], formula(entry["kind"], entry["s"], entry["cp"], direction)
            rows.append([entry["s"], entry["cp"], entry["kind"], direction,
                         entry["messages"][direction == "backward"], f"{measured:,.0f}", f"{expected:,.0f}",
                         f"{measured - expected:,.0f}"])
    lines += [harness.table(["s", "cp", "kind", "pass", "messages", "measured B/rank", "formula B/rank",
                             "unexplained B"], rows, "rrllrrrr"), ""]
    by = {(e["kind"], e["s"], e["cp"]): e for e in data["traffic"]}
    side = []
    for (kind, s, cp), entry in sorted(by.items(), key=lambda item: (item[0][1], item[0][2])):
        if kind == "zigzag" and cp > 1 and ("ulysses", s, cp) in by:
            ulysses = by[("ulysses", s, cp)]
            side.append([s, cp, f"{entry['forward']:,.0f}", f"{ulysses['forward']:,.0f}",
                         f"{ulysses['forward'] / entry['forward']:.3f}", f"{2 / cp:.3f}"])
    if side:
        lines += ["Side by side, forward (the backward ratio is half of this: the ring sends twice its forward):", "",
                  harness.table(["s", "cp", "ring B/rank", "Ulysses B/rank", "Ulysses / ring", "2/cp"], side), ""]
    lines += ["## Causal work per rank: contiguous blocks against zigzag", "",
              f"Attended (query, key) pairs per rank for s={WORK_SEQ} (`attended_pairs`, the schedule the ring "
              "computes). Contiguous blocks of C tokens: rank r attends r·C² + C(C+1)/2, so the last over the first "
              "is 1 + 2(cp-1)·C/(C+1), tending to 2cp-1; zigzag: (2cp-1)c² + c(c+1) on every rank.", "",
              harness.table(["cp", "contiguous min", "contiguous max", "max/min", "formula", "limit 2cp-1",
                             "zigzag min", "zigzag max", "max/min"], work_rows()), ""]
    rows = []
    base = {e["kind"]: e["bytes"] for e in data["activations"] if e["cp"] == 1}
    for entry in data["activations"]:
        constant = E if entry["kind"] == "ulysses" else 0  # the 0-d 1/√d, kept whatever cp
        expected = (base[entry["kind"]] - constant) / entry["cp"] + constant
        rows.append([entry["kind"], entry["s"], entry["cp"], f"{entry['bytes']:,}", f"{expected:,.0f}",
                     f"{entry['bytes'] / (base[entry['kind']] / entry['cp']):.4f}", f"{entry['bytes'] - expected:,.0f}"])
    lines += ["## Activation bytes per rank against 1/cp", "",
              f"What one transformer layer keeps for backward on one rank (`track_saved`), {block}, dropout 0.1: "
              "every activation is per token, so a cp rank keeps 1/cp of it. Ring attention keeps no s×s block "
              "(its probabilities are recomputed from the saved log-sum-exp); Ulysses runs the plain core on a/cp "
              "heads, whose (b, a/cp, s, s) probabilities also fall as 1/cp -- plus one 0-d 1/√d constant (e bytes, kept "
              "whatever cp: the formula adds it once). Ratio: bytes/rank over (cp=1 bytes)/cp.", "",
              harness.table(["kind", "s", "cp", "bytes/rank", "formula", "ratio", "unexplained B"], rows, "lrrrrrr"), ""]
    rows = [[e["kind"], e["cp"], e["tp"], "yes" if e["sp"] else "no", f"{e['error']:.1e}"] for e in data["equality"]]
    lines += ["## Largest float64 difference from the serial GPT", "",
              "A 2-layer GPT (vocab 24, s=16, h=16, 8 heads, dropout 0.1 including attention dropout), one forward "
              "and backward, the batch split over dp: the loss averaged over the dp × cp ranks and every gradient after the dp × cp all-reduce, "
              "against the serial model's.", "",
              harness.table(["kind", "cp", "tp", "SP", "max abs error"], rows, "lrrlr"), ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 ranks: a smoke test in seconds")
    parser.add_argument("--cp", type=int, nargs="+", help="context-parallel sizes (default 1 2 4; 1 2 with --quick)")
    parser.add_argument("--out", help="directory for context.md (default benchmarks/results)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.cp = args.cp or ([1, 2] if args.quick else [1, 2, 4])
    if args.worker:
        worker(args)
        return
    extra = ["--quick"] if args.quick else []
    data = harness.launch(__file__, max(args.cp), extra + ["--cp", *args.cp], env=harness.ONE_THREAD)
    harness.publish(args.out, "context.md", lambda directory: render(data, directory))


if __name__ == "__main__":
    main()
