"""Activation memory per transformer layer: the bytes minitp keeps for backward, beside the paper's formulas.

Korthikanti et al. (2022), section 4 and table 2, count the activations one layer keeps for backward
(s sequence, b batch, h hidden, a heads, t tensor-parallel size; 2-byte activations, 1-byte masks):

    no parallelism                       sbh(34 + 5as/h)
    tensor parallelism (TP)              sbh(10 + 24/t + 5as/(ht))
    TP + sequence parallelism (SP)       sbh(34/t + 5as/(ht))
    TP + selective recomputation         sbh(10 + 24/t)
    TP + SP + selective recomputation    sbh(34/t)
    full recomputation                   2sbh

We measure them with the engine's own accounting (``minitp.track_saved``: every array an op keeps, each
counted once, weights left out) in float32, so each formula is rescaled to e = 4 bytes per activation and
m = 1 byte per dropout mask (a bool): 34 = 16e + 2m and 5 = 2e + m at e = 2, m = 1, so

    none     = sbh(16e + 2m) + as²b(2e + m)
    TP       = sbh(4e + 2m + 12e/t) + as²b(2e + m)/t         (LayerNorm inputs, the qkv and fc1 inputs and
                                                             the two residual dropout masks are replicated)
    TP+SP    = [sbh(16e + 2m) + as²b(2e + m)] / t
    full     = e·sbh   (e·sbh/t with SP: the block's input is then a sequence shard)

And the memory of *building* a model: every rank draws only its own shards of the initial weights
(``minitp.nn.init``), so constructing a ``ParallelGPT`` at tensor-parallel size t should cost a rank about
1/t of the serial model, plus what is replicated (position table, LayerNorms, row-parallel biases). Peak
bytes while building (``tracemalloc``) and the parameter bytes kept, per rank, beside 1/t.

Run: ``python benchmarks/memory.py`` (launches ``mpiexec -n 4`` itself; ``--quick`` for a tiny smoke run).
Writes ``benchmarks/results/memory.md`` and ``memory.png``.
"""
import os
import sys
from pathlib import Path

import numpy

# The paper's attention core, whose s×s scores table 2 counts (minitp's default is blockwise from s > 128,
# which keeps none: benchmarks/attention.py measures that); the workers inherit it.
os.environ.setdefault("MINITP_ATTENTION", "dense")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

E, M = 4, 1  # float32 activations, bool masks
DROPOUT = 0.1  # on: the paper's counts include the masks
SHAPES = {"A": (256, 2, 256, 4), "B": (512, 1, 128, 8)}  # (s, b, h, a): as/h = 4 and 32
QUICK_SHAPES = {"A": (8, 2, 16, 4), "B": (16, 1, 8, 4)}
CONSTRUCTION = dict(vocab=8192, seq_len=256, hidden=512, heads=8, layers=4)  # ~21M parameters, float32
QUICK_CONSTRUCTION = dict(vocab=256, seq_len=16, hidden=32, heads=4, layers=2)

# (label, sequence_parallel, recompute); "none" is the serial TransformerBlock
CONFIGS = [("none", None, None), ("TP", False, None), ("TP+SP", True, None),
           ("TP + selective", False, "selective"), ("TP+SP + selective", True, "selective"),
           ("full (TP)", False, "full"), ("full (TP+SP)", True, "full")]
PAPER = {"none": "sbh(34 + 5as/h)", "TP": "sbh(10 + 24/t + 5as/(ht))", "TP+SP": "sbh(34/t + 5as/(ht))",
         "TP + selective": "sbh(10 + 24/t)", "TP+SP + selective": "sbh(34/t)", "full (TP)": "2sbh",
         "full (TP+SP)": "2sbh/t"}


def formula(label, s, b, h, a, t, e=E, m=M):
    """The paper's bytes for ``label``, rescaled to e bytes per activation and m per mask."""
    layer, scores = s * b * h, a * s * s * b
    return {
        "none": layer * (16 * e + 2 * m) + scores * (2 * e + m),
        "TP": layer * (4 * e + 2 * m + 12 * e / t) + scores * (2 * e + m) / t,
        "TP+SP": (layer * (16 * e + 2 * m) + scores * (2 * e + m)) / t,
        "TP + selective": layer * (4 * e + 2 * m + 12 * e / t),
        "TP+SP + selective": layer * (16 * e + 2 * m) / t,
        "full (TP)": layer * e,
        "full (TP+SP)": layer * e / t,
    }[label]


def known_deviations(label, s, b, h, a, t, e=E):
    """{which tensor, why: bytes} that minitp keeps beyond the paper's count (the terms it ignores)."""
    if label.startswith("full"):
        return {}
    tokens = s * b / t if "SP" in label else s * b
    deviations = {"LayerNorm row statistics: 1/std per token, 2 LayerNorms (sb·e; the paper counts only "
                  "the input)": 2 * tokens * e}
    if "selective" not in label:
        deviations["the 0-d constant 1/sqrt(d) that scales q, kept by its Mul (e bytes)"] = e
    return deviations


# -- the worker: measure on world-size ranks, every t that divides it ------------------------------

def worker(args):
    from mpi4py import MPI

    from minitp import comm, track_saved
    from minitp.autograd import Tensor
    from minitp.nn import TransformerBlock
    from minitp.parallel import ParallelTransformerBlock

    comm.install_abort_handler()  # an exception on one rank ends the job instead of hanging the others
    world = MPI.COMM_WORLD
    shapes = QUICK_SHAPES if args.quick else SHAPES
    results = []
    for t in args.tp:
        if world.size % t:
            raise ValueError(f"t={t} does not divide the {world.size} ranks")
        # ranks [k*t, (k+1)*t) form one tensor-parallel group; every group measures the same model
        group = comm.Group(world.Split(color=world.rank // t, key=world.rank), "tp")
        for name, (s, b, h, a) in shapes.items():
            x_full = numpy.random.default_rng(0).standard_normal((s, b, h)).astype(numpy.float32)
            for label, sequence_parallel, recompute in CONFIGS:
                if label == "none":
                    block = TransformerBlock(h, a, dropout=DROPOUT, attention_dropout=DROPOUT, dtype=numpy.float32)
                    x = x_full
                else:
                    block = ParallelTransformerBlock(h, a, dropout=DROPOUT, attention_dropout=DROPOUT,
                                                     dtype=numpy.float32, sequence_parallel=sequence_parallel,
                                                     group=group, recompute=recompute)
                    x = numpy.ascontiguousarray(comm.split(x_full, group, 0)) if sequence_parallel else x_full
                with track_saved() as saved:
                    block(Tensor(x, requires_grad=True))
                results.append({"shape": name, "t": t, "config": label, "bytes": saved.total,
                                "by_op": saved.by_op})
        group.comm.Free()
    construction = measure_construction(args)
    if world.rank == 0:
        harness.report({"shapes": shapes, "results": results, "construction": construction})


def measure_construction(args):
    """[{t, parameter bytes, peak bytes while building}] per t, the largest over the ranks; t = 0: serial."""
    import tracemalloc

    from mpi4py import MPI

    from minitp import comm
    from minitp.nn import GPT, GPTConfig
    from minitp.parallel import ParallelGPT

    config = GPTConfig(**(QUICK_CONSTRUCTION if args.quick else CONSTRUCTION))
    rows = []
    for t in [0] + list(args.tp):
        mesh = comm.Mesh(tp_size=t) if t else None
        tracemalloc.start()
        model = ParallelGPT(config, mesh) if t else GPT(config)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        kept = sum(p.data.nbytes for p in model.parameters())
        del model
        rows.append({"t": t, "kept": MPI.COMM_WORLD.allreduce(kept, op=MPI.MAX),
                     "peak": MPI.COMM_WORLD.allreduce(peak, op=MPI.MAX)})
    return {"config": config.to_dict(), "rows": rows}


# -- the driver: tables and plots -----------------------------------------------------------------

def render(data, out):
    shapes, results = data["shapes"], data["results"]
    ts = sorted({r["t"] for r in results})
    lines = [
        "# Activation memory per transformer layer",
        "",
        f"Measured {harness.machine(timings=False)}.",
        "",
        "Bytes one layer keeps for backward on one rank (`minitp.track_saved()` around the forward: each kept "
        "array once, weights left out), float32 activations (e = 4 bytes) and bool dropout masks (m = 1 byte), "
        f"dropout p = {DROPOUT}. The formula column is the paper's (Korthikanti et al. 2022, table 2) rescaled "
        "from e = 2, m = 1 to e = 4, m = 1: 34 = 16e + 2m, 5 = 2e + m, 10 = 4e + 2m, 24 = 12e. "
        "*Known* lists what minitp keeps beyond the paper's count (explained below the tables); "
        "*unexplained* = measured - formula - known, 0 when the accounting is complete.",
        "",
    ]
    for name, (s, b, h, a) in shapes.items():
        lines += [f"## Shape {name}: s={s}, b={b}, h={h}, a={a} (as/h = {a * s / h:g})", ""]
        rows = []
        for label, _, _ in CONFIGS:
            for t in ts:
                if label == "none" and t != ts[0]:
                    continue  # no parallelism: the same for every t
                r = next(r for r in results if r["shape"] == name and r["t"] == t and r["config"] == label)
                expected = formula(label, s, b, h, a, t)
                known = sum(known_deviations(label, s, b, h, a, t).values())
                rows.append([label, PAPER[label], "-" if label == "none" else t, f"{r['bytes']:,}",
                             f"{expected:,.0f}", f"{r['bytes'] / expected:.5f}", f"{known:,.0f}",
                             f"{r['bytes'] - expected - known:,.0f}"])
        lines += [harness.table(["config", "paper", "t", "measured B", "formula B", "ratio", "known B",
                                 "unexplained B"], rows, "llrrrrrr"), ""]
    lines += [
        "## The deviations, tensor by tensor",
        "",
        "- **LayerNorm row statistics**: minitp's fused LayerNorm keeps its normalised input x̂ (the paper's "
        "2sbh per LayerNorm) *and* 1/std per token, sb·e bytes per LayerNorm (two per layer; s/t tokens per "
        "rank under SP), so backward needs no second pass over x. The paper ignores these sb-sized terms.",
        "- **The scale constant**: `attention_core` multiplies q by 1/sqrt(d); the Mul keeps that 0-d constant "
        "(e bytes). Inside a recomputed attention core it is not kept.",
        "- **The causal mask**: nothing. `causal_mask` rebuilds the (s, s) boolean pattern from the shape in "
        "backward, so it adds no bytes (the paper's as²b mask term is the attention *dropout* mask, kept "
        "as 1 byte per element).",
        "- **GeLU**: keeps its input only (the paper's 8sbh at e = 2) and recomputes tanh in backward.",
        "- **Selective recomputation** keeps q, k, v (3sbh·e/t) — the same bytes the plain attention keeps "
        "for QKᵀ (q scaled, k) and for the product with V (v) — and drops the softmax output, the attention "
        "dropout mask and the dropped probabilities: exactly the as²b(2e + m)/t term.",
        "- **Full recomputation** keeps the layer input alone: e·sbh, or e·sbh/t under SP where the input is "
        "a sequence shard (the paper's table lists 2sbh, without SP).",
        "",
    ]
    plt = harness.pyplot()
    if plt is not None:
        figure, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5), squeeze=False)
        for axis, (name, (s, b, h, a)) in zip(axes[0], shapes.items()):
            for index, (label, _, _) in enumerate(CONFIGS):
                color = f"C{index}"
                grid = numpy.linspace(min(ts), max(ts), 50)
                axis.plot(grid, [formula(label, s, b, h, a, t) / 2**20 for t in grid], "--", color=color, lw=1)
                measured = [next(r["bytes"] for r in results if r["shape"] == name and r["t"] == t
                                 and r["config"] == label) for t in ts]
                axis.plot(ts, [m / 2**20 for m in measured], "o", color=color, label=label)
            axis.set(title=f"shape {name}: s={s}, b={b}, h={h}, a={a}", xlabel="tensor-parallel size t",
                     ylabel="MiB kept for backward per layer per rank", xticks=ts, yscale="log")
            axis.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        figure.suptitle("activation memory: measured (dots) vs the paper's formulas at e=4, m=1 (dashed)")
        figure.tight_layout()
        figure.savefig(Path(out) / "memory.png", dpi=110)
        plt.close(figure)
        lines += ["![memory vs t](memory.png)", ""]
    lines += construction_section(data["construction"])
    name = next(iter(shapes))
    serial = next(r for r in results if r["shape"] == name and r["config"] == "none")
    lines += [f"## Where the bytes go: shape {name}, no parallelism, by the op that keeps them", "",
              harness.table(["op", "bytes"], [[op, f"{n:,}"] for op, n in serial["by_op"].items()]), "",
              "MatMul: the inputs of the qkv, QKᵀ, ·V, proj, fc1 and fc2 products (the paper's 2 + 4 + 2 + 2 "
              "+ 2 + 8 sbh at e = 2, plus 2as²b for the dropped probabilities); LayerNorm: x̂ and 1/std twice; "
              "Softmax: its output; Dropout: three bool masks; GeLU: its input.", ""]
    return "\n".join(lines)


def construction_section(construction):
    config, rows = construction["config"], construction["rows"]
    serial = rows[0]
    table = [["serial", f"{serial['kept']:,}", f"{serial['peak']:,}", "1.000", "1.000", "1"]]
    table += [[f"t={r['t']}", f"{r['kept']:,}", f"{r['peak']:,}", f"{r['kept'] / serial['kept']:.3f}",
               f"{r['peak'] / serial['peak']:.3f}", f"{1 / r['t']:.3f}"] for r in rows[1:]]
    shape = ", ".join(f"{key}={value}" for key, value in config.items())
    return ["## Building the model: memory per rank", "",
            f"`ParallelGPT(GPTConfig({shape}), mesh)` at each t, against `GPT(config)`: the parameter bytes a "
            "rank keeps, and its peak allocation while building (tracemalloc; numpy reports its arrays to it), "
            "the largest over the ranks. Each rank draws only its shards, so both fall as about 1/t; what stays "
            "is replicated (the position table, LayerNorms, row-parallel biases) plus the temporaries of drawing "
            "one block (its 64-bit hashes and the Box–Muller terms).", "",
            harness.table(["build", "parameters B", "peak B", "parameters / serial", "peak / serial", "1/t"],
                          table, "lrrrrr"), ""]


def main():
    harness.main_for_exact_counts(__file__, __doc__.split("\n")[0], worker, render, "memory.md")


if __name__ == "__main__":
    main()
