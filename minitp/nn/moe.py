"""A mixture-of-experts MLP: each token goes to k of E expert MLPs, chosen by a router (Shazeer et al. 2017;
GShard, Lepikhin et al. 2020; Switch, Fedus et al. 2021; Mixtral, Jiang et al. 2024).

    tokens (T, h) --router: Linear h -> E, softmax--> probabilities p (T, E)
                  --top-k--> each token's k experts, and its k gates
                  --capacity--> (token, choice) pairs past an expert's slots are dropped
                  --dispatch--> each expert's tokens --expert MLP (fc1, GeLU, fc2)--> their outputs
                  --combine--> y_t = Σ_j gate_{t,j} · expert_{e(t,j)}(x_t)   (dropped pairs add nothing)

**Gates.** k = 1 (Switch): the gate is the raw probability p_{t,e}, so the router learns from how much the
output moved. k >= 2: the k gates are renormalised to sum to 1 -- a softmax over the k chosen *logits*,
which is p_{t,e} / Σ_chosen p (Mixtral's choice, followed here; GShard divides by the sum too). The
gradient reaches the router only through the gates (and the losses below): the choice itself is flat.

**Capacity** (``capacity_factor`` c; None: no limit, nothing dropped, as Mixtral). Expert e takes at most
⌈c · T · k / E⌉ (token, choice) pairs, T the tokens of the whole global batch; the rest are dropped: the
token gets nothing from that expert, and a token that loses every choice passes through the block's
residual alone (its MLP output is 0). Which ones drop is decided first come first served in one fixed
order (``routing.queue_positions``): all first choices before any second choice (GShard's priority), and
within a choice the tokens in batch-major order -- sequence 0's tokens, then sequence 1's. Switch,
GShard and Megatron count capacity per device's share of the batch instead; here it is the global
batch's, so the model does not depend on the mesh it runs on (the sharded layer exchanges its ranks'
counts, E·k numbers, and drops exactly the serial layer's tokens).

**Losses.** Switch's load-balancing loss (Fedus et al. 2021, eq. 4), ``aux_loss_coef`` α:

    α · E · Σ_e f_e · P_e,   f_e = (pairs routed to e) / (T·k),   P_e = mean over tokens of p_{t,e}

counted before capacity drops (Megatron-core's ``switch_load_balancing_loss_func``); at perfect balance
it is α. f is a count and carries no gradient; P does. Optionally the router z-loss (ST-MoE, Zoph et
al. 2022), ``z_loss_coef`` β: β · mean_t (log Σ_e exp logit_{t,e})², keeping the logits small. Their
sum is ``aux_loss`` after each forward; ``GPT.loss`` adds every layer's.

**Parallel.** The layer asks its builder (``minitp.nn.builders``) where its experts live and how tokens
reach them: serially every expert is here and dispatch is the identity; ``minitp.parallel.expert``
spreads them over the ep ranks (the all-to-alls), with each expert's MLP split over tp.
"""
import numpy

from minitp import backend
from minitp import functional as F
from minitp.functional import routing
from minitp.nn import init
from minitp.nn.builders import SERIAL
from minitp.nn.layers import Linear
from minitp.nn.mlp import MLP
from minitp.nn.module import Module, ModuleList


def check_moe(experts, top_k, capacity_factor=None, aux_loss_coef=0.0, z_loss_coef=0.0):
    """``ValueError`` for a configuration that means nothing: fewer than 1 expert, k outside [1, E], a
    capacity factor that is not a positive finite number (None: no limit), a negative coefficient."""
    if isinstance(experts, bool) or not isinstance(experts, (int, numpy.integer)) or experts < 1:
        raise ValueError(f"a mixture of experts needs a positive integer number of experts, not {experts!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, numpy.integer)) or not 1 <= top_k <= experts:
        raise ValueError(f"top_k must be an integer in [1, experts={experts}], not {top_k!r}: each token "
                         "chooses k different experts")
    if capacity_factor is not None and not (numpy.isfinite(capacity_factor) and capacity_factor > 0):
        raise ValueError(f"capacity_factor must be a positive number (None: no limit), not {capacity_factor!r}: "
                         "at c <= 0 an expert has no slot and every token is dropped")
    for name, value in (("aux_loss_coef", aux_loss_coef), ("z_loss_coef", z_loss_coef)):
        if not (numpy.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, not {value!r}")


class Routing:
    """What one forward decided, on the host (for the tutorial, the benchmark and the tests): ``choices``
    (T, k) expert of each token's j-th choice, ``kept`` (T, k) whether that pair fit, ``totals`` (k, E)
    pairs per choice and expert over the global batch (before drops), ``capacity`` (None: no limit),
    ``tokens`` T of the global batch."""

    def __init__(self, choices, kept, totals, capacity, tokens):
        self.choices, self.kept, self.totals, self.capacity, self.tokens = choices, kept, totals, capacity, tokens

    @property
    def load(self):
        """(E,) pairs routed to each expert over the global batch, before drops."""
        return self.totals.sum(axis=0)

    @property
    def dropped(self):
        """This rank's (token, choice) pairs dropped by the capacity."""
        return int((~self.kept).sum())


class MoE(Module):
    """(s, b, h) -> (s, b, h): ``router`` (h -> E, no bias), ``experts`` (E MLPs, ``experts.e.fc1`` ...),
    ``dropout`` (the block's residual dropout, once, on the combined output). ``aux_loss`` after forward.

    ``layers`` (``minitp.nn.builders``) says which experts this rank holds (``expert_range``: a
    ModuleList starting there, so the names are the serial ones), what builds their MLPs
    (``expert_layers``), and how the tokens travel (``moe_tokens``, ``token_counts``, ``dispatch``,
    ``combine``, ``moe_output``). ``ValueError`` from ``check_moe`` before anything is built.
    """

    def __init__(self, hidden, experts, top_k=1, ffn_hidden=None, capacity_factor=None, aux_loss_coef=0.01,
                 z_loss_coef=0.0, dropout=0.0, seed=0, dtype=numpy.float32, approximate="tanh", init_std=None,
                 output_std=None, layers=SERIAL):
        super().__init__()
        check_moe(experts, top_k, capacity_factor, aux_loss_coef, z_loss_coef)
        self.hidden, self.num_experts, self.top_k = hidden, experts, top_k
        self.capacity_factor, self.aux_loss_coef, self.z_loss_coef = capacity_factor, aux_loss_coef, z_loss_coef
        self.builders = layers
        here = layers.expert_range(experts)  # ValueError when ep does not divide E
        # replicated on every rank (E columns are few): each rank routes its own tokens
        self.router = Linear(hidden, experts, bias=False, dtype=dtype, seed=init.derive_seed(seed, "router"),
                             std=init_std)
        build = layers.expert_layers()
        self.experts = ModuleList((MLP(hidden, ffn_hidden, seed=init.derive_seed(seed, f"experts.{e}"), dtype=dtype,
                                       approximate=approximate, init_std=init_std, output_std=output_std, layers=build)
                                   for e in here), start=here.start)
        for p in self.experts.parameters():
            layers.mark_expert(p)
        self.dropout = layers.dropout(dropout, init.derive_seed(seed, "dropout"))
        self.aux_loss, self.routing = None, None

    def forward(self, x):
        x = self.builders.moe_tokens(x)  # under SP: every token of the sequence (g)
        s, b, h = x.shape
        # batch-major token order (sequence 0's tokens, then 1's): the capacity's first-come order, and
        # under dp each replica's columns are one contiguous run of it
        tokens = F.reshape(F.transpose(x, (1, 0, 2)), (b * s, h))
        logits = self.router(tokens)  # (T, E)
        probs = F.softmax(logits, axis=-1)
        choices = routing.top_k(probs.data, self.top_k)  # (T, k), host
        gates = self._gates(logits, probs, choices)  # (T, k)
        local = routing.counts(choices, self.num_experts)
        before, totals, replicas = self.builders.token_counts(local)  # over the tokens of every replica
        T_global = b * s * replicas
        slots = routing.capacity(self.capacity_factor, T_global, self.top_k, self.num_experts)
        kept = numpy.ones(choices.shape, dtype=bool) if slots is None else \
            routing.queue_positions(choices, self.num_experts, before, totals) < slots
        self.routing = Routing(choices, kept, totals, slots, T_global)
        self.aux_loss = self._aux_loss(logits, probs, totals, T_global)
        out = self._experts(tokens, gates, choices, kept)  # (T, h)
        out = F.transpose(F.reshape(out, (b, s, h)), (1, 0, 2))  # back to (s, b, h)
        return self.dropout(self.builders.moe_output(out))  # under SP: this rank's block of the sequence

    def _gates(self, logits, probs, choices):
        """(T, k): Switch's raw probability for k = 1, Mixtral's softmax over the k chosen logits for k >= 2."""
        rows = numpy.arange(choices.shape[0])[:, None]
        if self.top_k == 1:
            return F.getitem(probs, (rows, choices))
        return F.softmax(F.getitem(logits, (rows, choices)), axis=-1)

    def _aux_loss(self, logits, probs, totals, T_global):
        """α·E·Σ f_e·P_e (+ β·mean lse²), or None when both coefficients are 0. f from the global counts;
        P over this rank's tokens -- the mean over the replicas of this rank's loss is then the global one."""
        loss = None
        if self.aux_loss_coef:
            f = totals.sum(axis=0) / (T_global * self.top_k)  # (E,), the share of pairs, no gradient
            f = backend.array_module(probs.data).asarray(f, dtype=probs.dtype)
            P = F.mean(probs, axis=0)  # (E,)
            loss = F.sum(P * f) * (self.aux_loss_coef * self.num_experts)
        if self.z_loss_coef:
            lse = routing.logsumexp(logits, axis=-1)
            z = F.mean(lse * lse) * self.z_loss_coef
            loss = z if loss is None else loss + z
        return loss

    def _experts(self, tokens, gates, choices, kept):
        """Σ_j gate · expert(x) for every kept (token, choice), through dispatch and combine."""
        T, h = tokens.shape
        token, choice = numpy.nonzero(kept)  # the kept pairs, in (token, choice) order
        expert = choices[token, choice]
        # grouped by expert (each expert's pairs contiguous, as the all-to-all sends them), in queue order
        order = numpy.lexsort((token, choice, expert))
        token, choice, expert = token[order], choice[order], expert[order]
        counts = numpy.bincount(expert, minlength=self.num_experts).astype(numpy.int64)
        xp = backend.array_module(tokens.data)
        token_here = xp.asarray(token)  # on the tokens' device, once: three ops index by it
        send = F.getitem(tokens, token_here)  # (N, h): a token picked k times gets its k gradients summed
        received, arrived = self.builders.dispatch(send, counts)  # arrived (sources, E/ep): rows per source, expert
        outputs = self._local_experts(received, arrived)
        back = self.builders.combine(outputs, counts, arrived)  # (N, h), in the order sent
        weight = F.reshape(F.getitem(gates, (token_here, xp.asarray(choice))), (-1, 1))
        return routing.scatter_add_rows(back * weight, token_here, T)

    def _local_experts(self, received, arrived):
        """Run expert l on its rows of ``received`` (source-major: from each source, its rows for each local
        expert) and put the outputs back in that order. Every expert runs, on 0 rows too: its weights then
        get a zero gradient, as on the replicas where it did get tokens."""
        sources, local = arrived.shape
        # the local expert of each received row; a stable sort makes the rows expert-major, source-major within
        expert_of_row = numpy.repeat(numpy.tile(numpy.arange(local), sources), arrived.reshape(-1))
        order = numpy.argsort(expert_of_row, kind="stable")
        rows = numpy.split(order, numpy.cumsum(arrived.sum(axis=0))[:-1])  # expert l's rows of ``received``
        xp = backend.array_module(received.data)
        h = received.shape[-1]
        outputs = []
        for expert, picked in zip(self.experts, rows):
            x = F.reshape(F.getitem(received, xp.asarray(picked)), (len(picked), 1, h))  # (n_l, 1, h): an MLP's (s, b, h)
            outputs.append(F.reshape(expert(x), (len(picked), h)))
        return F.getitem(F.cat(outputs, axis=0), xp.asarray(numpy.argsort(order)))  # back to the order received

    def extra_repr(self):
        here = f" ({len(self.experts)} here)" if len(self.experts) != self.num_experts else ""
        return (f"{self.hidden}, experts={self.num_experts}{here}, top_k={self.top_k}, "
                f"capacity_factor={self.capacity_factor}, aux_loss_coef={self.aux_loss_coef}, "
                f"z_loss_coef={self.z_loss_coef}")
