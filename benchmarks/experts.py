"""Expert parallelism, counted: the all-to-all bytes of a mixture-of-experts layer per step against the
formula, the load per expert over a short training run with and without Switch's aux loss, and the share
of dropped (token, choice) pairs against the capacity factor.

**The bytes** (per MoE layer and step; h hidden, e bytes per element). Let C[i, j] be the rows (kept
(token, choice) pairs) ep rank i sends ep rank j. Dispatch sends each rank's rows for other ranks, combine
sends them back, and backward runs both again with the counts swapped (the adjoint of a permutation is
its inverse), so summed over the ranks

    all_to_all_v bytes = 4 · h · e · Σ_{i ≠ j} C[i, j]            (exact, from the routing's counts)
                       ≈ 4 · (ep − 1)/ep · T·k · h · e           (kept pairs spread evenly: T·k of them)

the issue's "tokens × k × hidden × dtype × 2 directions × 2 for backward", each rank keeping its own
1/ep. Beside it, the counts: one all-to-all of E integers per rank ((ep − 1)/ep · E · 8 B) before the
dispatch, and one all-gather of the k·E choice counts over dp ((dp − 1) · k·E · 8 B per rank), for the
capacity's first-come order and the aux loss's f_e -- both independent of h.

Run: ``python benchmarks/experts.py`` (launches ``mpiexec -n 4`` itself; ``--quick`` for a smoke run).
Writes ``benchmarks/results/experts.md`` and ``experts.png``.
"""
import argparse
import sys
from pathlib import Path

import numpy

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
E_BYTES = 4  # float32
BYTES_SHAPE = dict(s=64, b=4, h=128, ffn=256, experts=8)  # b is per replica
FACTORS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
COEFFICIENTS = (0.0, 0.01, 0.1)
BATCHES = 8  # held-out batches per capacity factor  # none, Switch's α, ten times it


# -- the worker -------------------------------------------------------------------------------------

def worker(args):
    from mpi4py import MPI

    from minitp import comm

    comm.install_abort_handler()
    n = MPI.COMM_WORLD.size
    data = {"ranks": n, "bytes": [], "training": {}, "drops": []}
    for ep in [e for e in (2, 4) if e <= n]:
        for k, c in ((1, None), (2, None), (2, 1.0)):
            data["bytes"].append(traffic(comm.init(dp=n, ep=ep), k, c, args.quick))
    data["training"], models = training(comm.init(dp=n, ep=n), args)
    data["drops"] = drops(models, comm.init(dp=n, ep=n), args)
    if MPI.COMM_WORLD.rank == 0:
        harness.report(data)


def traffic(mesh, k, capacity_factor, quick):
    """One MoE layer's forward and backward on this mesh: the collective log's bytes against the formula."""
    from minitp import Tensor, comm
    from minitp import functional as F
    from minitp.nn.moe import MoE
    from minitp.parallel.expert.layers import ExpertParallelLayers

    shape = dict(BYTES_SHAPE, s=8, h=16, ffn=16) if quick else BYTES_SHAPE
    s, b, h = shape["s"], shape["b"], shape["h"]
    moe = MoE(h, shape["experts"], top_k=k, ffn_hidden=shape["ffn"], capacity_factor=capacity_factor,
              dtype=numpy.float32, seed=1, init_std=0.5, layers=ExpertParallelLayers(mesh))
    x = Tensor(numpy.random.default_rng([2, mesh.dp_rank]).standard_normal((s, b, h)).astype(numpy.float32),
               requires_grad=True)
    with comm.log_collectives() as log:
        y = moe(x)
        (F.sum(y * y) + moe.aux_loss).backward()
    sent = sum(r.ring_bytes for r in log.records if r.op == "all_to_all_v")
    counts = sum(r.ring_bytes for r in log.records if r.op == "all_to_all")
    gathered = sum(r.ring_bytes for r in log.records if r.op == "all_gather")
    # C[i, j] from every rank's kept choices: the experts of rank j are [j·E/ep, (j+1)·E/ep)
    per = shape["experts"] // mesh.ep_size
    kept = moe.routing.choices[moe.routing.kept]
    row = numpy.bincount(kept // per, minlength=mesh.ep_size)  # this rank's row C[i, :]
    world = mesh.world.comm
    T = s * b * mesh.dp_size
    away = world.allreduce(int(row.sum() - row[mesh.ep_rank]))  # Σ_(i≠j) C[i, j] over every ep group
    return dict(ep=mesh.ep_size, dp=mesh.dp_size, k=k, c=capacity_factor, h=h, E=shape["experts"], T=T,
                measured=world.allreduce(sent), exact=4 * h * E_BYTES * away,
                kept_pairs=world.allreduce(int(moe.routing.kept.sum())),
                counts=world.allreduce(counts), gathered=world.allreduce(gathered), ranks=world.size)


def training(mesh, args):
    """A small MoE GPT trained on the corpus with each aux_loss_coef (top-1, 4 experts, no drops):
    the tokens per expert of layer 0 at every step."""
    sys.path.insert(0, str(REPO / "tutorials"))
    from train_gpt import Characters, batch_at, read_corpus

    from minitp.nn import AdamW, GPTConfig
    from minitp.parallel import AllReduceGradients, ParallelGPT
    from minitp.training import train_step

    text = read_corpus(mesh.world.comm)
    chars = Characters(text)
    data = chars.encode(text)
    steps = 6 if args.quick else args.steps
    found, models = {}, {}
    for coef in COEFFICIENTS:
        config = GPTConfig(vocab=chars.vocab, seq_len=32, hidden=32, heads=4, layers=2, experts=4, top_k=1,
                           aux_loss_coef=coef, seed=0)
        model = ParallelGPT(config, mesh)
        optimizer = AdamW(model.named_parameters(), lr=1e-2, weight_decay=0.01)
        sync = AllReduceGradients(model, mesh)
        loads, losses = [], []
        for step in range(steps):
            ids, targets = batch_at(data, step, 16, 32)
            loss, _ = train_step(model, optimizer, ids, targets, mesh, max_norm=1.0, gradients=sync)
            loads.append(model.blocks[0].mlp.routing.load.tolist())
            losses.append(loss)
        found[str(coef)] = dict(loads=loads, losses=losses)
        models[coef] = (model, data)
    return found, models


def drops(models, mesh, args):
    """The dropped share of (token, choice) pairs against the capacity factor, on the trained models' layer 0
    (one forward each, no gradient), with and without the aux loss."""
    from minitp.autograd import no_grad
    from train_gpt import batch_at

    rows = []
    for coef, (model, data) in models.items():
        moe = model.blocks[0].mlp
        for c in FACTORS:
            moe.capacity_factor = c
            dropped, pairs, load = 0, 0, 0
            for held_out in range(BATCHES):  # batches the training never drew
                ids, _ = batch_at(data, 10_000 + held_out, 16, 32)
                with no_grad():
                    model.eval()(ids[:, mesh.dp_rank * 16 // mesh.dp_size:(mesh.dp_rank + 1) * 16 // mesh.dp_size])
                dropped += mesh.world.comm.allreduce(moe.routing.dropped)
                pairs += moe.routing.tokens * moe.top_k
                load = load + moe.routing.load
            rows.append(dict(coef=coef, c=c, dropped=dropped, pairs=pairs, capacity=moe.routing.capacity,
                             load=load.tolist()))
        moe.capacity_factor = None
    return rows


# -- the report -------------------------------------------------------------------------------------

def render(data, directory=None):
    rows = []
    for r in data["bytes"]:
        balanced = 4 * (r["ep"] - 1) / r["ep"] * r["kept_pairs"] * r["h"] * E_BYTES
        rows.append([r["ep"], r["dp"], r["k"], "none" if r["c"] is None else r["c"], r["T"], r["kept_pairs"],
                     f"{r['measured']:,.0f}", f"{r['exact']:,.0f}", f"{balanced:,.0f}",
                     f"{r['measured'] / balanced:.3f}", f"{r['measured'] - r['exact']:,.0f}",
                     f"{r['counts']:,.0f}", f"{r['gathered']:,.0f}"])
    shape = data["bytes"][0]
    lines = [f"# Expert parallelism: bytes, load balance, drops ({data['ranks']} ranks)", "",
             harness.machine(timings=False), "",
             "## All-to-all bytes of one MoE layer, forward + backward, summed over the ranks", "",
             f"h = {shape['h']}, E = {shape['E']}, float32, T = global tokens; exact = 4·h·e·Σ_(i≠j) C[i, j] "
             "over every ep group (C from the routing's counts), balanced = 4·(ep−1)/ep·(kept pairs)·h·e.", "",
             harness.table(["ep", "dp", "k", "c", "T", "kept pairs", "measured B", "exact formula B", "balanced B",
                            "measured / balanced", "unexplained B", "counts all-to-all B", "counts all-gather B"],
                           rows), ""]
    training = data["training"]
    lines += ["## Tokens per expert (layer 0), with and without Switch's aux loss", "",
              "4 experts, top-1, no drops, a 2-layer GPT (h = 32) on the corpus, batch 16 × 32 tokens "
              f"(512 per step), AdamW lr 1e-2, ep = dp = {data['ranks']}.", ""]
    table = []
    for coef, run in training.items():
        loads = numpy.array(run["loads"])
        tail = loads[-max(1, len(loads) // 5):]
        last = tail.mean(axis=0)
        per_step = tail.max(axis=1) / tail.mean(axis=1)  # each step's busiest expert against that step's mean
        table.append([coef, " / ".join(f"{v:.0f}" for v in loads[0]), " / ".join(f"{v:.0f}" for v in loads[-1]),
                      " / ".join(f"{v:.0f}" for v in last), f"{per_step.mean():.2f}", f"{last.max() / last.mean():.2f}",
                      f"{run['losses'][-1]:.4f}"])
    lines += ["Busiest / mean per step is what capacity sees (each step's own batch); the last fifth's mean load can "
              "look balanced while the router swings from step to step.", "",
              harness.table(["aux_loss_coef", "load at step 1", "load at the last step", "mean load, last fifth",
                             "busiest / mean per step (last fifth)", "busiest / mean of the mean load", "last loss"],
                            table), ""]
    lines += [f"## Dropped share against the capacity factor (layer 0 of the trained models, {BATCHES} held-out batches)", "",
              "At perfect balance an expert gets T·k/E pairs and nothing drops for c ≥ 1; the share dropped "
              "measures the imbalance.", ""]
    drop_rows = [[r["coef"], r["c"], r["capacity"], f"{r['dropped']:,}", f"{r['pairs']:,}",
                  f"{100 * r['dropped'] / r['pairs']:.1f}%", " / ".join(map(str, r["load"]))] for r in data["drops"]]
    lines += [harness.table(["aux_loss_coef", "c", "slots per expert", "dropped", "pairs", "share", "load"],
                            drop_rows), ""]
    plt = harness.pyplot()
    if plt is not None and directory is not None:
        figure, axes = plt.subplots(1, len(training), figsize=(12, 3.5), sharey=True)
        for axis, (coef, run) in zip(axes, training.items()):
            loads = numpy.array(run["loads"])
            for e in range(loads.shape[1]):
                axis.plot(range(1, len(loads) + 1), loads[:, e], label=f"expert {e}")
            axis.set_title(f"aux_loss_coef = {coef}")
            axis.set_xlabel("step")
        axes[0].set_ylabel("tokens routed (layer 0)")
        axes[0].legend()
        figure.tight_layout()
        figure.savefig(Path(directory) / "experts.png", dpi=100)
        lines += ["![expert load over steps](experts.png)", ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 ranks, 6 steps: a smoke test")
    parser.add_argument("--steps", type=int, default=150, help="training steps per run")
    parser.add_argument("--out", help="directory for experts.md (default benchmarks/results)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    extra = (["--quick"] if args.quick else []) + ["--steps", args.steps]
    data = harness.launch(Path(__file__), 2 if args.quick else 4, extra, env=harness.ONE_THREAD)
    harness.publish(args.out, "experts.md", lambda directory: render(data, directory))


if __name__ == "__main__":
    main()
