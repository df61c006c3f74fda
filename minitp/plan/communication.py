"""What does one rank send per step, on each axis of the mesh? Every collective of a training step, itemised.

**Ring bytes** (what one rank sends in a ring algorithm over n ranks, S the full buffer; the collective log
of ``minitp.comm.log`` records the same): all-reduce 2(n−1)/n·S, all-gather and reduce-scatter (n−1)/n·S,
all-to-all (n−1)/n·S, a point-to-point send S (its receive 0), a ring sendrecv S.

**tp** (Shoeybi et al. 2019 §3; Korthikanti et al. 2022 §4.2.2): per layer 2 all-reduces of S = sbh·e forward
(f̄ after attention and the MLP) and 2 backward (f); under SP each becomes a reduce-scatter plus an all-gather,
the same 4(t−1)/t·S each way. minitp departs, as Megatron-LM does: under SP backward also re-gathers the qkv
and fc1 inputs for dA = Xᵀ dY (+2 all-gathers of S per layer) and all-reduces the gradients of the
replicated LayerNorm weights and biases and row-parallel biases (6 vectors of h per layer, 2 for ln_f, and
the position table (seq_len, h) whose rows each rank read only for its tokens); the vocab-parallel loss
all-reduces 3 vectors of s·b numbers (max, target logit, sum of exponentials); the embedding's f̄ (ḡ)
and the LM head's f (g) add one S-sized collective each way at the ends; the gradient norm one float64.
Full recomputation re-runs the forward's collectives in backward (Korthikanti §5).

**dp** (plain data parallelism): one all-reduce of each gradient bucket (2(d−1)/d·Ψe); ZeRO-1 and ZeRO-2
(Rajbhandari et al. 2020 §7): a reduce-scatter of each bucket padded to d·⌈n/d⌉ and an all-gather of the
parameters: one all-reduce's bytes, 2(d−1)/d·Σ_b d⌈n_b/d⌉e; ZeRO-3 (``parallel.data.zero3``) all-gathers
each unit (padded to d⌈n_u/d⌉) before its forward and again before its backward, per microbatch, and
reduce-scatters its gradient once: 3(d−1)/d·Σ_u d⌈n_u/d⌉e, 1.5× -- with tied embeddings the head's
region gathers the embeddings unit E a second time each way, 3Ψ + 2E (minitp's units, not FSDP's root unit);
under SP 3Ψ + E: the replicated LayerNorm weights' gradients pass an all-reduce over tp (f) that runs at the
end of the backward, so no unit is freed inside backward and the embedding's backward finds E gathered.
Measured byte for byte at pp = 1; ZeRO-3 with pp > 1, which minitp refuses, is formula only.

Mixed precision (bf16/fp16): the gradients cross in the model's 2 bytes per element, or in 4 with
``grad_reduce="fp32"`` (minitp's ``reduce_dtype``); ZeRO's parameter all-gathers always in the model's dtype;
measured byte for byte (tests/test_plan.py). fp16's loss scaler adds one all-reduce of one flag over the
world, a pickled ``allreduce`` outside minitp's collective log, not itemised (a few bytes).

**pp** (Narayanan et al. 2021 §2.2): each microbatch's activation (s·b·h·e, /t under SP) to the next stage
and its gradient back, per model-chunk boundary; tied embeddings all-reduce the table's gradient between
the first and the last stage.

**cp** (measured): ring attention (Liu et al. 2023; contiguous or zigzag, the same bytes) passes K and V
around the ring, c−1 sendrecvs of 2·(s/c)·b·h/t·e forward; backward K, V first, then K, V with the
travelling dK, dV (4 blocks, c−2 times), and the accumulator home (2 blocks): 4(c−1) blocks in c sendrecvs.
Ulysses (Jacobs et al. 2023) all-to-alls q, k, v stacked (3 blocks) and the output (1), forward, and their
gradients backward, (c−1)/c of each. Selective and full recomputation re-run the core's forward exchanges.

**ep** (Lepikhin et al. 2020, GShard): per MoE layer a dispatch and a combine ``all_to_all_v`` of the rank's
rows, each way, plus the count exchanges (E int64 over ep, k·E over dp) and the experts' own gradient
buckets over ``expert_dp``. What minitp sends follows where the router sent each token: given the routing
counts a run observed (``Choices.routing``) the bytes are exact (``plan.experts``; measured by
tests/test_plan_experts.py); without them the *evenly spread* figure, (ep−1)/ep of the s·b·k rows
leaving the rank, marked formula only (``benchmarks/experts.py`` found the real bytes 1.01-1.04× it).
"""
from dataclasses import dataclass
from fractions import Fraction

from minitp.plan.shapes import ITEMSIZE

FLOAT64 = 8  # the norms and the loss travel as float64


@dataclass(frozen=True)
class Message:
    """``count`` collectives ``op`` over ``group`` (``size`` ranks), each on a full buffer of ``elements``."""
    group: str
    size: int
    op: str
    elements: int
    itemsize: int
    count: int
    why: str
    measured: bool = True  # False: formula only, not yet measured against minitp
    leaving: int = None  # all_to_all_v: the elements that leave this rank (uneven: not (n−1)/n of them)

    @property
    def payload(self):
        return self.count * self.elements * self.itemsize

    @property
    def ring(self):
        """Bytes this rank sends for these collectives (exact: a Fraction)."""
        n, S = self.size, self.elements * self.itemsize
        if self.op == "all_to_all_v":
            return self.count * Fraction(self.leaving) * self.itemsize
        share = {"all_reduce": Fraction(2 * (n - 1), n), "all_gather": Fraction(n - 1, n),
                 "reduce_scatter": Fraction(n - 1, n), "all_to_all": Fraction(n - 1, n), "broadcast": Fraction(n - 1, n),
                 "send": Fraction(1), "sendrecv": Fraction(1), "recv": Fraction(0)}[self.op]
        return self.count * share * S


def by_group_op(messages):
    """{(group, op): (collectives, payload bytes, ring bytes)} over the messages on groups of more than one
    rank -- the form the tests compare with the collective log."""
    table = {}
    for message in messages:
        if message.size < 2 or message.count == 0:
            continue
        n, payload, ring = table.get((message.group, message.op), (0, 0, Fraction(0)))
        table[message.group, message.op] = (n + message.count, payload + message.payload, ring + message.ring)
    return table


def logged_by_group_op(log):
    """``by_group_op``'s form of what ran: a ``comm.log_collectives()`` log (read, not imported: any records
    with ``group``, ``op``, ``group_size``, ``payload_bytes`` and ``ring_bytes``)."""
    table = {}
    for record in log:
        if record.group_size < 2:  # a collective over one rank sends nothing
            continue
        n, payload, ring = table.get((record.group, record.op), (0, 0, Fraction(0)))
        table[record.group, record.op] = (n + 1, payload + record.payload_bytes, ring + Fraction(record.ring_bytes))
    return table


def per_axis(messages):
    """{axis: ring bytes sent per step} (exact)."""
    axes = {}
    for message in messages:
        axes[message.group] = axes.get(message.group, 0) + message.ring
    return axes


def tensor_parallel(model, mesh, choices, blocks, first, last, m):
    """The tp collectives of m microbatches through ``blocks`` layers (plus the ends this rank holds)."""
    t, e = mesh.tp, ITEMSIZE[choices.precision]
    s = choices.seq or model.seq_len
    S, b, h = s // mesh.cp, choices.micro_batch, model.hidden
    act = S * b * h
    sp, full = choices.sequence_parallel, choices.recompute == "full"
    found = []

    def add(op, elements, count, why, itemsize=e):
        found.append(Message("tp", t, op, elements, itemsize, count, why))

    # a MoE in place of the MLP (``plan.experts``): under SP its input is gathered (g) but its backward only
    # splits, its output split and gathered backward, nothing re-gathered; without SP the dense MLP's f and f̄
    # become each local expert's, on its own rows (``experts.messages``)
    mlp = 0 if model.experts else 1
    if sp:
        per_layer_fwd = [("all_gather", 2, "g before qkv and fc1 (MoE: its tokens) (gather s)"),
                         ("reduce_scatter", 1 + mlp, "ḡ after proj and fc2 (scatter s)")]
        per_layer_bwd = [("reduce_scatter", 1 + mlp, "g backward (qkv, fc1)"),
                         ("all_gather", 2, "ḡ backward (proj, fc2 or the MoE's output)"),
                         ("all_gather", 1 + mlp, "re-gather the qkv and fc1 inputs for dA (SP keeps the s/t shard)")]
    else:
        per_layer_fwd = [("all_reduce", 1 + mlp, "f̄ after proj and fc2")]
        per_layer_bwd = [("all_reduce", 1 + mlp, "f backward, before qkv and fc1")]
    for op, n, why in per_layer_fwd:
        add(op, act, n * blocks * m * (2 if full else 1), why + (" (again in backward: full recomputation)" if full else ""))
    for op, n, why in per_layer_bwd:
        add(op, act, n * blocks * m, why)
    if sp:
        add("all_reduce", h, (5 + mlp) * blocks * m, "replicated LayerNorm weights and biases, row-parallel biases "
            "(6h per layer, 5h with a MoE: the experts' fc2 biases are not in the SP region; each microbatch's backward)")
    if first:
        if sp:
            add("reduce_scatter", act, m, "wte: ḡ forward")
            add("all_gather", act, m, "wte: ḡ backward")
            add("all_reduce", model.seq_len * h, m, "wpe: f backward (each rank read only its tokens' rows)")
        else:
            add("all_reduce", act, m, "wte: f̄ forward")
    if last:
        add("all_reduce", S * b, 3 * m, "vocab-parallel loss: max, target logit, sum of exponentials (s·b each)")
        if sp:
            add("all_gather", act, m, "LM head: g forward")
            add("reduce_scatter", act, m, "LM head: g backward")
            if not model.tie_embeddings:
                add("all_gather", act, m, "LM head: re-gather its input for dA")
            add("all_reduce", h, 2 * m, "ln_f weight and bias")
        else:
            add("all_reduce", act, m, "LM head: f backward")
    return found


def context_parallel(model, mesh, choices, blocks, m):
    """Ring attention's K/V passes (contiguous or zigzag: the same) or Ulysses' all-to-alls, as minitp sends
    them (``parallel.context.ring``, ``ulysses``): measured byte for byte by ``tests/test_plan.py``."""
    c, t, e = mesh.cp, mesh.tp, ITEMSIZE[choices.precision]
    if c == 1:
        return []
    s = choices.seq or model.seq_len
    block = (s // c) * choices.micro_batch * model.hidden // t  # one of q, k, v on this rank
    again = 2 if choices.recompute else 1  # selective and full recomputation re-run the core's forward in backward
    if choices.cp_kind == "ulysses":
        return [Message("cp", c, "all_to_all", 3 * block, e, (again + 1) * blocks * m,
                        "Ulysses: q, k, v stacked to a/c heads × s, forward; their gradients back"),
                Message("cp", c, "all_to_all", block, e, (again + 1) * blocks * m,
                        "Ulysses: the output back to s/c tokens, forward; its gradient, backward")]
    found = [Message("cp", c, "sendrecv", 2 * block, e, again * (c - 1) * blocks * m,
                     "ring: K and V, c−1 steps forward (again in backward under recomputation)"),
             Message("cp", c, "sendrecv", 2 * block, e, 2 * blocks * m,
                     "ring backward: K, V at the first step, the dK, dV accumulator home after the last")]
    if c > 2:
        found.append(Message("cp", c, "sendrecv", 4 * block, e, (c - 2) * blocks * m,
                             "ring backward: K, V with the travelling dK, dV, steps 2 .. c−1"))
    return found


def pipeline(model, mesh, choices, stage, m):
    """The point-to-point sends and receives of stage ``stage``: an activation per microbatch per chunk
    boundary forward, a gradient back; the tied table's all-reduce between the ends."""
    p, v, e = mesh.pp, mesh.virtual_stages, ITEMSIZE[choices.precision]
    if p == 1:
        return []
    s = choices.seq or model.seq_len
    S = s // mesh.cp
    act = (S // mesh.tp if choices.sequence_parallel else S) * choices.micro_batch * model.hidden
    chunks = [k * p + stage for k in range(v)]
    last_chunk = p * v - 1
    sends = sum(1 for c in chunks if c != last_chunk) + sum(1 for c in chunks if c != 0)
    found = [Message("pp", p, "send", act, e, sends * m, "activations forward, their gradients back (Narayanan §2.2)"),
             Message("pp", p, "recv", act, e, sends * m, "the other side of the sends"),
             Message("pp", p, "broadcast", 1, FLOAT64, 1, "the step's loss from the last stage"),
             Message("pp", p, "all_reduce", 1, FLOAT64, 1, "gradient norm: the stages' squares")]
    if model.tie_embeddings and stage in (0, p - 1):
        found.append(Message("embedding", 2, "all_reduce", model.vocab // mesh.tp * model.hidden, e, 1,
                             "tied embedding: the table's gradient summed over the first and last stage"))
    return found


def data_parallel(mesh, choices, groups, m=1, gathers=None, experts=False):
    """Gradient reduction over the replicas (dp, or dp × cp), the ZeRO step's gathers, the loss and the norm.
    ``groups``: the element count of each gradient bucket (stages 0-2) or ZeRO-3 unit; ``gathers``: ZeRO-3's
    all-gathers of each unit per microbatch (2: forward and backward; for the embeddings unit with a tied
    head 4, or 3 under SP). ``experts``: the model has a mixture's experts -- at ZeRO 0 the tp norm all-reduce
    carries their split squares apart, 2 numbers (``data_parallel.grad_norm``; ZeRO's ``clip_grad_norm`` 1)."""
    d = mesh.dp * mesh.cp
    group = "dp" if mesh.cp == 1 else "dp_cp"
    e, g = ITEMSIZE[choices.precision], choices.grad_itemsize  # the parameters' bytes, the gradients' on the wire
    found = []
    if choices.zero == 0:
        found += [Message(group, d, "all_reduce", n, g, 1, "gradients, one all-reduce per bucket") for n in groups]
    elif choices.zero in (1, 2):
        for n in groups:
            padded = -(-n // d) * d
            found += [Message(group, d, "reduce_scatter", padded, g, 1,
                              f"ZeRO-{choices.zero}: gradients reduce-scattered (bucket padded to d·⌈n/d⌉)"),
                      Message(group, d, "all_gather", padded, e, 1, f"ZeRO-{choices.zero}: parameters all-gathered")]
    else:
        measured = mesh.pp == 1  # minitp refuses ZeRO-3 on pipeline stages
        note = "" if measured else " (formula only: minitp refuses ZeRO-3 with pp > 1)"
        for n, times in zip(groups, gathers or [2] * len(groups)):
            padded = -(-n // d) * d
            why = ("ZeRO-3: a unit gathered before its forward and again before its backward" if times == 2 else
                   "ZeRO-3: the embeddings unit, gathered for its own forward and backward and the tied head's "
                   "(under SP still gathered when the embedding's backward comes)")
            found += [Message(group, d, "all_gather", padded, e, times * m, why + note, measured),
                      Message(group, d, "reduce_scatter", padded, g, 1, "ZeRO-3: a unit's gradients" + note,
                              measured)]
    if choices.zero:
        found.append(Message(group, d, "all_reduce", 2, FLOAT64, 1, "gradient norm of the ZeRO slices"))
    found.append(Message(group, d, "all_reduce", 1, FLOAT64, 1, "the step's loss, averaged"))
    if mesh.tp > 1:
        found.append(Message("tp", mesh.tp, "all_reduce", 2 if experts and not choices.zero else 1, FLOAT64, 1,
                             "gradient norm: split parameters' squares (and the experts' apart)"))
    return found
