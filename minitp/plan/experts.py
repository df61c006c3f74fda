"""A mixture of experts' activations and all-to-alls: from the routing counts a run observed, or evenly spread.

What a MoE layer keeps for backward and sends over ep follows where its router sent each token, which no
plan made before a run can know. So there are two figures:

- **from the routing counts** (``Choices.routing``): per MoE layer, the (ep × E) matrix C of kept
  (token, choice) pairs each rank of one ep group routes to each expert, for one microbatch -- what
  ``kept_counts`` reads off each rank's ``MoE.routing`` after a forward, gathered over ``mesh.ep``. For ep
  rank r (``Choices.ep_rank``) that gives N = Σ_e C[r, e] rows sent, n_l = Σ_i C[i, l] rows arriving for
  each local expert l (M = Σ_l n_l) and N_self = Σ_(l here) C[r, l] rows staying here; the bytes are then
  exact (``tests/test_plan_experts.py`` measures them);
- **evenly spread** (GShard, Lepikhin et al. 2020; no routing given): N = M = T·k, N_self = T·k/ep,
  n_l = ep·T·k/E -- the planning-ahead figure, marked formula only.

**Kept for backward** (``minitp.nn.moe.MoE``; T the tokens this rank routes: s·b, under SP the sequence
gathered over tp first, e bytes per element): the router's input (T·h·e) and its softmax (T·E·e); for
k >= 2 the softmax of the k chosen logits (T·k·e; k = 1 keeps nothing: the gate is a view of the
probabilities); the load-balancing loss's f (E·e) and its coefficient (e) when ``aux_loss_coef`` > 0;
each local expert's MLP on its n_l rows: fc1's input (n_l·h·e), the GeLU's input and fc2's input
(2·n_l·f/t·e); the combine's gate weights (N·e) and the rows coming back (N·h·e). These replace the dense
MLP's fc1 input, GeLU input and fc2 input. The router z-loss (``z_loss_coef`` > 0) keeps its logsumexp's
softmax (T·E·e), the lse (T·e, kept by lse·lse) and its coefficient (e).

**Sent** (``minitp.parallel.expert``; ring bytes of this rank, per layer and microbatch): the counts, one
all-to-all of E int64 over ep ((ep−1)/ep·8E); dispatch's ``all_to_all_v`` of its N rows ((N − N_self)·h·e
leave), combine's of the M rows back ((M − N_self)·h·e), and backward the same two with the counts swapped
(combine's backward sends N rows, dispatch's M); the choice counts, one all-gather of k·E int64 over dp
((dp−1)·8kE: the capacity's first-come order and the aux loss's f_e, whatever the routing). After the step,
the experts' gradients are reduced over ``expert_dp`` (the dp/ep replicas holding the same experts, its own
buckets) and the experts' squares of the gradient norm summed over ep (one float64).

**tp** (``parallel.expert.layers``: each expert's MLP is the dense Megatron MLP, never sequence-parallel):
each local expert all-reduces its n_l rows over tp, f̄ after fc2 forward and f before fc1 backward (2·n_l·h·e
of payload; an expert with 0 rows still takes part, 0 bytes), in place of the dense MLP's two. Under SP the
MoE gathers the sequence (g) but its backward only splits (every tp rank routed every token), its output is
split (gathered backward) and nothing is re-gathered for dA: per layer one reduce-scatter forward, one
backward and one re-gather fewer than the dense MLP, and 5h of replicated biases and LayerNorm weights
all-reduced, not 6h (the experts' fc2 biases are not in the SP region). The gradient norm's tp all-reduce
carries 2 float64 (the experts' split squares apart). Exact from the routing counts (measured at tp 2).
"""
from fractions import Fraction

from minitp.plan.shapes import ITEMSIZE

INT64 = 8  # the counts travel as int64


def kept_counts(routing, experts):
    """[pairs kept for expert e, e = 0 .. E-1]: one rank's row of C from a ``minitp.nn.moe.Routing`` (any object
    with ``choices`` (T, k) and ``kept`` (T, k)); gather it over ``mesh.ep`` for ``Choices.routing``."""
    counts = [0] * experts
    for row, kept_row in zip(routing.choices.tolist(), routing.kept.tolist()):
        for expert, kept in zip(row, kept_row):
            counts[expert] += bool(kept)
    return counts


def check_routing(model, mesh, choices, m):
    """``ValueError`` unless ``choices.routing`` is one (ep × E) matrix of non-negative counts per layer."""
    routing = choices.routing
    if routing is None:
        return
    if not model.experts:
        raise ValueError("plan: routing counts are given for a model without experts")
    if not 0 <= choices.ep_rank < mesh.ep:
        raise ValueError(f"plan: ep_rank {choices.ep_rank} is not a rank of ep = {mesh.ep}")
    if m != 1:
        raise ValueError(f"plan: routing counts are one microbatch's; this step runs {m}")
    if len(routing) != model.layers or any(len(layer) != mesh.ep or any(len(row) != model.experts for row in layer)
                                           for layer in routing):
        raise ValueError(f"plan: routing must hold, per layer ({model.layers}), one row per ep rank ({mesh.ep}) of "
                         f"{model.experts} counts")
    if any(count < 0 for layer in routing for row in layer for count in row):
        raise ValueError("plan: routing counts must be >= 0")


def tokens(model, mesh, choices):
    """T: the tokens one rank routes per microbatch (under SP the sequence is gathered over tp first)."""
    s = choices.seq or model.seq_len
    return (s // mesh.cp) * choices.micro_batch


def rows(model, mesh, choices, layer):
    """(N sent, N_self kept here, [n_l arriving for each local expert]) for ``choices.ep_rank`` in ``layer``;
    evenly spread (Fractions) without routing counts."""
    ep, E = mesh.ep, model.experts
    here = range(choices.ep_rank * (E // ep), (choices.ep_rank + 1) * (E // ep))
    if choices.routing is None:
        pairs = tokens(model, mesh, choices) * model.top_k
        return pairs, Fraction(pairs, ep), [Fraction(pairs * ep, E)] * len(here)  # the local experts: pairs in all
    C = choices.routing[layer]
    mine = C[choices.ep_rank]
    return sum(mine), sum(mine[l] for l in here), [sum(row[l] for row in C) for l in here]


def measured(model, mesh, choices):
    """Whether the experts' figures are exact: routing counts given, and a mesh minitp runs experts on (no
    pipeline stages, no context parallelism: ``parallel.expert.layers`` refuses them) -- in float32, float64,
    bf16 and fp16 alike (every kept array and every row on the wire in the model's dtype: the router's
    softmax, the aux loss's f and the gates too; tests/test_plan_experts.py)."""
    return choices.routing is not None and mesh.pp == 1 and mesh.cp == 1


def activation_terms(model, mesh, choices, layer):
    """{what: bytes} one MoE layer keeps for backward in place of the dense MLP (module docstring)."""
    e, t = ITEMSIZE[choices.precision], mesh.tp
    h, f, E, k = model.hidden, model.ffn_hidden, model.experts, model.top_k
    T = tokens(model, mesh, choices)
    sent, _, arriving = rows(model, mesh, choices, layer)
    terms = {"router input and probabilities (T·h·e + T·E·e)": e * T * (h + E)}
    if k >= 2:
        terms["the gates: softmax of the k chosen logits (T·k·e)"] = e * T * k
    if model.aux_loss_coef:
        terms["load-balancing loss: f and its coefficient (E·e + e)"] = e * (E + 1)
    if model.z_loss_coef:
        terms["router z-loss: the logsumexp's softmax, the lse (kept by lse·lse) and β (T·E·e + T·e + e)"] = \
            e * (T * E + T + 1)
    M = int(sum(arriving))  # evenly spread too: the E/ep local experts get T·k rows in all
    terms["local experts: fc1 input, GeLU input, fc2 input on their rows (M·(h + 2f/t)·e)"] = e * M * (h + 2 * f // t)
    terms["combine: gate weights and returned rows (N·(1 + h)·e)"] = e * sent * (1 + h)
    return terms


def messages(model, mesh, choices, blocks, m):
    """The experts' collectives of ``blocks`` (model layer indices) for m microbatches, as ``Message``s."""
    from minitp.plan.communication import Message
    if not model.experts:
        return []
    ep, e, h = mesh.ep, ITEMSIZE[choices.precision], model.hidden
    exact = measured(model, mesh, choices)
    found = []
    replicas = mesh.dp * mesh.cp
    if replicas > 1:
        found.append(Message("dp", mesh.dp, "all_gather", mesh.dp * model.top_k * model.experts, INT64,
                             len(blocks) * m, "MoE: the (k, E) choice counts of every replica (capacity, aux loss)"))
    if mesh.tp > 1:  # each local expert's f̄ forward and f backward over tp, on its own n_l rows (0 rows too)
        why = "MoE: each local expert's f̄ after fc2 and f before fc1 on its n_l rows (n_l·h·e)" + \
            ("" if exact else " (GShard's even spread; formula only)")
        found += [Message("tp", mesh.tp, "all_reduce", n * h, e, 2 * m, why, exact)
                  for layer in blocks for n in rows(model, mesh, choices, layer)[2]]
    if ep == 1:
        return found
    found.append(Message("ep", ep, "all_to_all", model.experts, INT64, len(blocks) * m,
                         "MoE: rows per expert, before the dispatch"))
    for layer in blocks:
        sent, here, arriving = rows(model, mesh, choices, layer)
        M = int(sum(arriving))
        why = "MoE dispatch and combine, forward and backward (the routing counts)" if exact else \
            "MoE dispatch and combine, forward and backward (GShard's even spread; formula only)"
        # payload every row, ring bytes the rows that leave: N, then M, each once forward and once backward
        found += [Message("ep", ep, "all_to_all_v", n * h, e, 2 * m, why, exact, (n - here) * h) for n in (sent, M)]
    found.append(Message("ep", ep, "all_reduce", 1, 8, 1, "gradient norm: the experts' squares over ep"))
    return found
