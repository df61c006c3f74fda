"""Ring attention (Liu, Zaharia and Abbeel 2023): causal self-attention over a sequence split across the
cp ranks of a context-parallel group, each rank keeping its queries while the keys and values travel.

Shapes: q, k, v are (b, a, L, d) on every rank, L = s/cp of the s tokens -- a contiguous block, or two
zigzag chunks (``minitp.nn.placement``). The output is the rank's (b, a, L, d) rows of the serial
softmax(q kᵀ/√d) v.

**Forward.** Softmax needs every key of a query's row, but it need not see them at once. Attention over
a block B of keys gives a normalised partial output O_B and the row's log-sum-exp over that block,
lse_B = log Σ_{j∈B} exp(s_ij). Two blocks merge exactly, since exp(lse) is the softmax's denominator:

    lse = log(exp(lse_1) + exp(lse_2))        O = exp(lse_1 - lse) O_1 + exp(lse_2 - lse) O_2

(``online_softmax.merge``: computed with the larger lse subtracted first, so nothing overflows). A block
here and a block of blockwise attention on one rank (``minitp.functional.blockwise_attention``) are the
same step: both are loops over ``online_softmax``'s ``attend``, ``merge`` and ``attend_backward``.

So cp steps: at step t rank r attends its queries to the block of rank (r - t) mod cp, merges, and passes the block on to
rank r + 1 while receiving the next from rank r - 1 (one ``sendrecv`` of K and V stacked): cp - 1
exchanges of 2·L·b·a·d numbers -- 2(cp - 1)·(s/cp)·b·h·e bytes sent per rank per layer, h = a·d the
hidden size of the rank's heads. Under the causal mask a (query run, key run) pair wholly in the future
is skipped, a pair that straddles the diagonal is masked, a pair in the past needs no mask.

**Backward, by hand.** Only q, k, v, the output O and the lse (b·a·L numbers) are kept: no (s, s)
score or probability block ever is. Each block's probabilities are recomputed as P = exp(q kᵀ/√d - lse)
-- exact, since lse is the whole row's -- and with dP = dO vᵀ and Δ_i = Σ_j P_ij dP_ij = dO_i·O_i:

    dS = P ∘ (dP - Δ)        dQ += dS K/√d        dK_block += dSᵀ Q/√d        dV_block += Pᵀ dO

dQ stays here. dK and dV of a block belong to its owner: they travel the ring with the block and go
home after the last step. K and V again make cp - 1 hops, the block's gradient accumulator cp - 1
(starting from the owner's successor; the owner adds its own share at the end): 4(cp - 1)·(s/cp)·b·h·e
bytes per rank per layer backward, twice the forward.

**Attention dropout** drops exactly the serial (b, a, s, s) mask's elements: the mask is a function of
the element's global index, and a block's (query, key) positions are known, so each block draws its
piece (``nn.Dropout.block_drawer``: ``rng.keep_mask`` at those positions, microbatches placed as
``Dropout.forward`` places them), in forward and again in backward. Dropout applies to the
normalised probabilities; the lse stays the undropped one, as in FlashAttention.

**In a trace** (``minitp.trace``) each ring step's attention over the block it holds is a "compute"
span, "ring step t" (forward) or "ring step t backward", inside the op's own span, with the rank whose
block it is and the number of (query run, key run) pairs computed; each exchange is a "sendrecv" span
("comm", tagged "ring K,V forward (step t)" ...): cp - 1 of them forward, cp backward (cp - 1 with the
K, V, the last one taking the dK, dV home), per attention layer.
"""
from collections import namedtuple

import numpy

from minitp import backend, comm, trace
from minitp.autograd import Function
from minitp.functional.online_softmax import attend, attend_backward, future_bias, merge
from minitp.nn import placement
from minitp.parallel.tensor import mappings

Block = namedtuple("Block", "q k q_run k_run masked")
"""One (query run, key run) pair of a ring step: ``q``, ``k`` the local slices of the rank's queries and
of the travelling block's keys, ``q_run``, ``k_run`` their global positions [start, stop), ``masked``
whether the causal mask cuts through it (else every pair in it is attended)."""


def ring_schedule(rank, cp, seq, layout=placement.CONTIGUOUS, causal=True):
    """What rank ``rank`` computes: for each ring step, (the rank whose keys it holds, [Block, ...]).

    The forward and backward follow it, and the work measure counts it (``attended_pairs``).
    ``ValueError`` when ``seq`` does not split into the layout's cp blocks (2·cp chunks for zigzag)."""
    mine = placement.runs(rank, cp, seq, layout)
    steps = []
    for step in range(cp):
        source = (rank - step) % cp
        steps.append((source, _blocks(mine, placement.runs(source, cp, seq, layout), causal)))
    return steps


def _blocks(q_runs, k_runs, causal):
    blocks, q_local = [], 0
    for q0, q1 in q_runs:
        k_local = 0
        for k0, k1 in k_runs:
            # runs are equal aligned chunks: either the same run (the diagonal) or disjoint, wholly
            # before or wholly after -- so no query of a computed pair is left without a key
            if not causal or k0 < q1:  # else every key comes after every query: skipped
                blocks.append(Block(slice(q_local, q_local + q1 - q0), slice(k_local, k_local + k1 - k0),
                                    (q0, q1), (k0, k1), causal and k1 - 1 > q0))
            k_local += k1 - k0
        q_local += q1 - q0
    return blocks


def attended_pairs(rank, cp, seq, layout=placement.CONTIGUOUS, causal=True):
    """The (query, key) pairs rank ``rank`` attends, per (batch entry, head): its work."""
    total = 0
    for _, blocks in ring_schedule(rank, cp, seq, layout, causal):
        for block in blocks:
            queries, keys = numpy.arange(*block.q_run)[:, None], numpy.arange(*block.k_run)[None, :]
            total += int((keys <= queries).sum()) if block.masked else queries.size * keys.size
    return total


class RingAttention(Function):
    """softmax(q kᵀ/√d) v for this rank's queries against every rank's keys, k and v travelling the ring
    of ``group`` (``mesh.cp``); see the module docstring. q, k, v and the output are (b, a, L, d), this
    rank's L tokens in ``layout``. Saves q, k, v, the output and the lse: (4·L·d + L)·b·a numbers."""

    def forward(self, q, k, v, group, layout, causal, dropout, tag):
        xp = backend.array_module(q)
        batch, heads, length, head_dim = q.shape
        self.group, self.tag, self.scale, self.dtype = group, tag, head_dim ** -0.5, q.dtype
        self.steps = ring_schedule(group.rank, group.size, length * group.size, layout, causal)
        self.keep = _mask_drawer(dropout, q.shape, group.size, q.dtype, xp)
        scaled = q * self.scale  # scale q (L·d numbers), not every block's scores
        out = xp.zeros_like(q)
        lse = xp.full(q.shape[:-1], -numpy.inf, dtype=q.dtype)
        kv = xp.stack([k, v])  # (2, b, a, L, d): one buffer crosses the wire per step
        for step, (source, blocks) in enumerate(self.steps):
            with trace.span(f"ring step {step}", "compute", holding=source, blocks=len(blocks)):
                for block in blocks:
                    keys = kv[:, ..., block.k, :]
                    block_out, block_lse = attend(scaled[..., block.q, :], keys[0], keys[1], *self._masks(block, xp))
                    merge(out[..., block.q, :], lse[..., block.q], block_out, block_lse)
            if step < group.size - 1:
                kv = self._pass_on(kv, f"ring K,V forward (step {step + 1})")
        self.save_for_backward(q, k, v, out, lse)
        return out

    def _masks(self, block, xp):
        """(the causal mask's 0/-inf bias where the block straddles the diagonal, the dropout's keep mask):
        each None where there is none."""
        future = future_bias(block.q_run, block.k_run, xp, self.dtype) if block.masked else None
        return future, (None if self.keep is None else self.keep(block.q_run, block.k_run))

    def backward(self, grad):
        q, k, v, out, lse = self.saved
        xp = backend.array_module(q)
        cp = self.group.size
        scaled = q * self.scale
        delta = (grad * out).sum(axis=-1)  # Δ_i = dO_i·O_i = Σ_j P_ij dP_ij (dropout included)
        grad_q = xp.zeros_like(q)
        kv, own, travelling = xp.stack([k, v]), None, None
        for step, (source, blocks) in enumerate(self.steps):
            with trace.span(f"ring step {step} backward", "compute", holding=source, blocks=len(blocks)):
                grad_kv = xp.zeros_like(kv)  # this rank's share of the held block's dK, dV
                for block in blocks:
                    keys = kv[:, ..., block.k, :]
                    dq, dk, dv = attend_backward(scaled[..., block.q, :], keys[0], keys[1], grad[..., block.q, :],
                                                 lse[..., block.q], delta[..., block.q], self.scale,
                                                 *self._masks(block, xp))
                    grad_q[..., block.q, :] += dq
                    grad_kv[0][..., block.k, :] += dk
                    grad_kv[1][..., block.k, :] += dv
            if step == 0:
                own = grad_kv  # the owner's share stays home
            else:
                travelling = grad_kv if travelling is None else travelling + grad_kv
            if step < cp - 1:
                # K, V move on; from step 1 on, the accumulated dK, dV of the block travel with them
                payload = kv if travelling is None else xp.concatenate([kv, travelling])
                what = "K,V" if travelling is None else "K,V + dK,dV"
                payload = self._pass_on(payload, f"ring {what} backward (step {step + 1})")
                kv, travelling = payload[:2], (payload[2:] if step > 0 else None)
            elif cp > 1:
                # after the last step this rank holds block rank+1's accumulator: send it home
                travelling = self._pass_on(travelling, "ring dK,dV home")
        grad_kv = own if travelling is None else own + travelling
        return grad_q, grad_kv[0], grad_kv[1]

    def _pass_on(self, payload, what):
        """One ring step: send to rank + 1, receive from rank - 1."""
        rank, cp = self.group.rank, self.group.size
        return comm.sendrecv(payload, self.group, (rank + 1) % cp, (rank - 1) % cp, tag=mappings.tag(self.tag, what))


def _mask_drawer(dropout, shape, cp, dtype, xp):
    """None without attention dropout; else (q_run, k_run) -> keep mask / (1 - p), the serial (b, a, s, s)
    mask's piece at the block's (query, key) positions (``nn.Dropout.block_drawer``, which moves the
    module's counter on as its forward does)."""
    if dropout is None:
        return None
    batch, heads, length, _ = shape
    return dropout.block_drawer((batch, heads, length * cp, length * cp), dtype, xp)


def ring_attention(q, k, v, group, layout=placement.CONTIGUOUS, causal=True, dropout=None, tag="attention"):
    """Causal self-attention of this rank's (b, a, L, d) queries against the keys and values of every rank
    of ``group``, which travel the ring; returns this rank's (b, a, L, d) rows of the serial output.

    ``layout``: which tokens the rank holds (``"contiguous"`` or ``"zigzag"``). ``dropout``: the
    attention ``Dropout`` module (its ``splits`` place the batch and heads). ``ValueError`` on every
    rank, before any communication, when the s = L·cp tokens do not split into the layout's blocks or
    q, k and v differ in shape. See ``RingAttention``.
    """
    if not q.shape == k.shape == v.shape or q.ndim != 4:
        raise ValueError(f"ring attention takes q, k, v of one shape (b, a, L, d): {q.shape}, {k.shape}, {v.shape}")
    placement.runs(group.rank, group.size, q.shape[2] * group.size, layout)  # the sequence must split
    return RingAttention.apply(q, k, v, group=group, layout=layout, causal=causal, dropout=dropout, tag=tag)
