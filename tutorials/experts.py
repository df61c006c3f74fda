"""Expert parallelism: a mixture of experts' E expert MLPs spread over the ranks, each token carried to its
experts and back by two all-to-alls -- proven equal to the serial mixture of experts.

    mpirun -n 4 python tutorials/experts.py        (1 or 2 ranks work too)

A mixture-of-experts MLP (Switch, Fedus et al. 2021; GShard, Lepikhin et al. 2020; Mixtral 2024) replaces
a block's one MLP by E of them and lets a router send each token to k. Parameters grow by E, the work per
token does not. Spread the experts over ep ranks and each rank holds E/ep of them; the price is that a
token must travel to where its experts live. This file shows, on ep = 4 ranks, each rank its own tokens
(ep is carved out of data parallelism: the ranks are replicas that hold different experts):

    1. the router's choice: a small routing table per rank (token, experts, gates, kept or dropped)
    2. the counts each rank exchanges first, then the dispatch (rows to the experts' ranks), the experts,
       and the combine (rows back): what crosses the wire, against the formula
    3. why the aux loss is needed: a few training steps with and without it, and the load per expert
and ends with the check: the expert-parallel layer equals the serial layer -- output, aux loss, the
dropped tokens, every gradient -- and so does a GPT with MoE blocks trained for a few steps.
"""
import numpy
from mpi4py import MPI

from minitp import Tensor, comm
from minitp import functional as F
from minitp.nn import GPT, AdamW, GPTConfig
from minitp.nn.moe import MoE
from minitp.parallel import AllReduceGradients, ParallelGPT
from minitp.parallel.data.data_parallel import split_batch
from minitp.parallel.expert.layers import ExpertParallelLayers
from minitp.parallel.tensor.shard import gather_serial_grads, gather_serial_state
from minitp.report import banner, each_rank, indent, ranks, say, verdict
from minitp.testing import max_error
from minitp.training import train_step

world = MPI.COMM_WORLD.Get_size()
E, k, hidden, ffn, seq, batch = 4, 2, 8, 16, 3, 4  # 4 experts, top-2; 3 tokens × 4 sequences
try:
    mesh = comm.init(dp=world, ep=world)  # every rank a replica holding E/ep experts
    comm.divide(E, world, "the experts (E/ep per rank)")
    comm.divide(batch, world, "the batch (split over the replicas)")
except ValueError as error:  # every rank computes the same numbers, so every rank stops here, together
    say(f"{error}.\nThis tutorial runs on 1, 2 or 4 ranks: mpirun -n 4 python tutorials/experts.py")
    raise SystemExit(1)
ep, rank = mesh.ep.size, mesh.ep.rank
banner(f"expert parallelism on {ranks(world)}")
say(f"{mesh}\nE = {E} experts, top-{k} (Mixtral's gates: a softmax over the chosen logits), h = {hidden}, "
    f"{seq} tokens × {batch} sequences = {seq * batch} tokens, {batch // world} sequence(s) per rank; "
    f"capacity factor 0.75: ⌈0.75·{seq * batch}·{k}/{E}⌉ = {-(-3 * seq * batch * k // (4 * E))} slots per expert; "
    "float64")


def layer(layers=None, capacity_factor=0.75, aux=0.1):
    extra = {} if layers is None else {"layers": layers}
    return MoE(hidden, E, top_k=k, ffn_hidden=ffn, capacity_factor=capacity_factor, aux_loss_coef=aux,
               dtype=numpy.float64, seed=3, init_std=0.5, **extra)


x = numpy.random.default_rng(0).standard_normal((seq, batch, hidden))  # (s, b, h): the same on every rank
upstream = numpy.random.default_rng(1).standard_normal((seq, batch, hidden))
serial = layer()
moe = layer(ExpertParallelLayers(mesh))
say(f"\nRank r holds experts {[list(range(r * E // ep, (r + 1) * E // ep)) for r in range(ep)]} "
    f"(names as serially: experts.{rank * E // ep}.fc1.weight ... on rank {rank}); the router (h × E) on every rank")

# -- 1. the routing table ---------------------------------------------------------------------------
mine = Tensor(split_batch(x, mesh).copy(), requires_grad=True)
with comm.log_collectives() as forward:
    y = moe(mine)
routing = moe.routing
say("\n1. Each rank routes its own tokens (batch-major: token = sequence·s + position); "
    "'x' = dropped by the capacity (first come first served: first choices before second, tokens in order)")
first = mesh.dp_rank * (batch // world) * seq
gates = F.softmax(F.getitem(moe.router(F.reshape(F.transpose(mine, (1, 0, 2)), (-1, hidden))),
                            (numpy.arange(len(routing.choices))[:, None], routing.choices)), axis=-1).data
table = [f"token {first + t:2d} -> " + ", ".join(f"e{e} ({g:.2f}){'' if kept else ' x'}"
                                                  for e, g, kept in zip(routing.choices[t], gates[t], routing.kept[t]))
         for t in range(len(routing.choices))]
each_rank("\n" + "\n".join("      " + line for line in table))
say(f"   load (pairs per expert, all ranks, before drops): {routing.load.tolist()}; slots per expert "
    f"{routing.capacity}; dropped here: each rank says")
each_rank(f"{routing.dropped} of its {routing.kept.size} (token, choice) pairs dropped")

# -- 2. counts, dispatch, combine -------------------------------------------------------------------
say("\n2. What crossed the wire in the forward (collective log): the choice counts all-gathered over dp "
    "(for the capacity's order and the aux loss), the counts per expert exchanged, then the rows")
kept = routing.choices[routing.kept]
rows_to = numpy.bincount(kept // (E // ep), minlength=ep)
each_rank(f"sends {rows_to.tolist()} rows to ranks 0..{ep - 1} (its own stay): "
          + ", ".join(f"{r.op} {r.ring_bytes:,.0f} B ({r.tag})" for r in forward.records))
(F.sum(y * Tensor(split_batch(upstream, mesh).copy())) + moe.aux_loss * (1 / world)).backward()
sent = MPI.COMM_WORLD.allreduce(int(rows_to.sum() - rows_to[rank]))
say(f"   dispatch and combine forward, and both again backward (each the other's adjoint: the same exchange with "
    f"the counts swapped): 4 · h · 8 B · Σ rows sent away = 4·{hidden}·8·{sent} = {4 * hidden * 8 * sent:,} B "
    "over all ranks")

# -- 3. why the aux loss -----------------------------------------------------------------------------
say("\n3. Training a 1-layer MoE GPT (4 experts, top-1, no capacity) on a fixed text: the load per expert "
    "(tokens routed, layer 0) with and without Switch's aux loss α·E·Σ f_e·P_e")
text = numpy.frombuffer(b"the quick brown fox jumps over the lazy dog " * 40, dtype=numpy.uint8) % 32
loads, STEPS = {}, 30
for coef in (0.0, 0.1):
    config = GPTConfig(vocab=32, seq_len=16, hidden=16, heads=2, layers=1, experts=4, top_k=1, aux_loss_coef=coef,
                       seed=0, dtype="float64")
    model = ParallelGPT(config, mesh)
    optimizer = AdamW(model.named_parameters(), lr=3e-2)
    sync = AllReduceGradients(model, mesh)
    history = []
    for step in range(STEPS):
        starts = numpy.random.default_rng(step).integers(0, len(text) - 17, 8)
        windows = numpy.stack([text[s:s + 17] for s in starts], axis=1).astype(numpy.int64)
        train_step(model, optimizer, windows[:-1], windows[1:], mesh, max_norm=1.0, gradients=sync)
        history.append(model.blocks[0].mlp.routing.load)
    loads[coef] = history
    say(f"   α = {coef}: steps 1, 10, 20, 30 -> " + "   ".join(str(history[s].tolist()) for s in (0, 9, 19, 29))
        + f";  busiest / mean over the last 10 steps {numpy.mean([h.max() / h.mean() for h in history[-10:]]):.2f}")
say("   Without it nothing pulls the router back once one expert gets ahead: it gets more tokens, learns faster, "
    "gets more (a rich-get-richer loop); with it the router pays for the product of share and probability.")

# -- the check ---------------------------------------------------------------------------------------
errors = {}  # the serial layer drew the same initial weights (a function of seed, name and index)
sx = Tensor(x.copy(), requires_grad=True)
sy = serial(sx)
(F.sum(sy * Tensor(upstream)) + serial.aux_loss).backward()
errors["output"] = max_error(y, split_batch(sy.data, mesh))
errors["input grad"] = max_error(mine.grad, split_batch(sx.grad, mesh))
errors["aux loss"] = abs(MPI.COMM_WORLD.allreduce(moe.aux_loss.item()) / world - serial.aux_loss.item())
T = seq * batch // world
same_drops = numpy.array_equal(routing.kept, serial.routing.kept[mesh.dp_rank * T:(mesh.dp_rank + 1) * T])
grads = gather_serial_grads(moe, mesh.tp)
router = comm.all_reduce(grads.pop("router.weight"), mesh.dp)
errors["router grad"] = max_error(router, serial.router.weight.grad)
experts = {}
for part in mesh.ep.comm.allgather({n: comm.all_reduce(g, mesh.expert_dp) for n, g in grads.items()}):
    experts.update(part)
serial_grads = dict(serial.named_parameters())
errors["expert grads"] = max(max_error(g, serial_grads[n].grad) for n, g in experts.items())
complete = len(experts) == 4 * E

# and a GPT with MoE blocks, 3 AdamW steps, against the serial GPT's
config = GPTConfig(vocab=16, seq_len=4, hidden=8, heads=2, layers=2, ffn_hidden=8, dropout=0.1, experts=E, top_k=k,
                   capacity_factor=1.0, aux_loss_coef=0.05, seed=1, dtype="float64")
models = {"serial": (GPT(config), None), "parallel": (ParallelGPT(config, mesh), mesh)}
losses = {}
for name, (model, on) in models.items():
    optimizer = AdamW(model.named_parameters(), lr=1e-2)
    for step in range(3):
        ids = numpy.random.default_rng([7, step]).integers(0, 16, (5, batch))
        losses.setdefault(name, []).append(train_step(model, optimizer, ids[:-1], ids[1:], on, max_norm=1.0)[0])
state = gather_serial_state(models["parallel"][0], mesh.tp)
for part in mesh.ep.comm.allgather({n: v for n, v in state.items() if ".experts." in n}):
    state.update(part)
errors["GPT, 3 steps"] = max([abs(a - b) for a, b in zip(losses["parallel"], losses["serial"])]
                             + [max_error(state[n], p.data) for n, p in models["serial"][0].named_parameters()])

worst = {name: MPI.COMM_WORLD.allreduce(error, op=MPI.MAX) for name, error in errors.items()}
say("\nThe check, max |error| against serial:")
say(indent("\n".join(f"{name:14}{error:9.1e}" for name, error in worst.items())))
top = max(worst.values())
all_drops = MPI.COMM_WORLD.allreduce(bool(same_drops), op=MPI.LAND)
verdict(top <= 1e-12 and all_drops and complete,
        f"the expert-parallel MoE == serial MoE (output, aux loss, dropped tokens, every gradient) and the MoE GPT "
        f"== serial GPT over 3 AdamW steps (max error {top:.1e}) on {ranks(world)}",
        failure=f"max error {top:.1e} (must be <= 1e-12); same drops: {all_drops}; every expert: {complete}")
