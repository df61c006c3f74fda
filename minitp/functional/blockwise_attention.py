"""Blockwise attention (FlashAttention's algorithm: Dao et al. 2022, Dao 2023): softmax(q kᵀ/√d) v computed
one (query block, key block) pair at a time, never holding an (s, s) score matrix -- for backward it keeps
q, k, v, the output O and one log-sum-exp per query row, O(s·b·h) bytes instead of the dense core's
O(s²·b·a).

Shapes: q, k, v (b, a, s, d); blocks of ``block`` positions along s, the same cut for queries and keys.

    forward    for each query block, for each key block at or below the diagonal (causal: the blocks
               above it are wholly in the future, and skipped): the block's (O_B, lse_B), merged into
               the row's running (O, lse) -- ``online_softmax.attend`` and ``merge``
    backward   Δ = rowsum(dO ∘ O) once; for each computed pair, the probabilities recomputed from the
               row's lse, and the block's dq, dk, dv accumulated -- ``online_softmax.attend_backward``

These are exactly ring attention's steps (``minitp.parallel.context.ring``), whose blocks of keys sit on
other ranks: the same three functions serve both. The dense core (``attention.attention_core``) is the
readable definition; this computes the same numbers (to rounding: the sums are grouped by block).

Query and key blocks share one cut, so a block pair on the causal diagonal is a square whose every row
keeps its diagonal key: no row of a computed block is all -inf.

**Attention dropout** draws exactly the dense core's (b, a, s, s) mask, block by block: ``keep(q_run,
k_run)`` returns the mask's piece at those global positions (already scaled by 1/(1 - p)), a pure function
of (seed, counter, global index) (``minitp.rng``), so backward draws it again instead of keeping it.
``nn.Dropout.block_drawer`` makes ``keep`` from the attention dropout module.
"""
from minitp import backend
from minitp.autograd import Function
from minitp.functional.online_softmax import attend, attend_backward, future_bias, merge
from minitp.functional.precision import total

BLOCK = 128
"""Positions per block. Measured on the CPU (benchmarks/attention.py): 128 gives a (b, a, 128, 128) score
block that numpy works through at GEMM speed; smaller blocks pay Python's cost per pair."""


def block_pairs(seq, block, causal):
    """[(query run, [key runs])]: every (query block, key block) pair computed, runs as (start, stop).
    Causal: the key blocks up to and including the diagonal only."""
    runs = [(start, min(start + block, seq)) for start in range(0, seq, block)]
    return [(q_run, [k_run for k_run in runs if not causal or k_run[0] < q_run[1]]) for q_run in runs]


class BlockwiseAttention(Function):
    """softmax(q kᵀ/√d) v block by block; see the module docstring. Saves q, k, v, O and the lse:
    (4d + 1)·b·a·s numbers."""

    def forward(self, q, k, v, causal, keep, block):
        xp = backend.array_module(q)
        self.scale, self.keep = q.shape[-1] ** -0.5, keep
        self.pairs = block_pairs(q.shape[-2], block, causal)
        self.causal = causal
        scaled = q * self.scale  # scale q (s·d numbers), not every block's scores
        out = xp.empty(q.shape, dtype=q.dtype)
        lse = xp.empty(q.shape[:-1], dtype=q.dtype)
        for q_run, k_runs in self.pairs:
            rows = slice(*q_run)
            for i, k_run in enumerate(k_runs):
                keys = slice(*k_run)
                block_out, block_lse = attend(scaled[..., rows, :], k[..., keys, :], v[..., keys, :],
                                              self._future(q_run, k_run, xp, q.dtype), self._keep(q_run, k_run))
                if i == 0:  # the first block: the running (O, lse) are its own
                    out[..., rows, :], lse[..., rows] = block_out, block_lse
                else:
                    merge(out[..., rows, :], lse[..., rows], block_out, block_lse)
        self.save_for_backward(q, k, v, out, lse)
        return out

    def backward(self, grad):
        q, k, v, out, lse = self.saved
        xp = backend.array_module(q)
        scaled = q * self.scale
        delta = total(grad * out, axis=-1)  # Δ_i = dO_i·O_i = Σ_j P_ij dP_ij, dropout included
        grad_q, grad_k, grad_v = xp.zeros_like(scaled), xp.zeros_like(scaled), xp.zeros_like(scaled)
        for q_run, k_runs in self.pairs:
            rows = slice(*q_run)
            for k_run in k_runs:
                keys = slice(*k_run)
                dq, dk, dv = attend_backward(scaled[..., rows, :], k[..., keys, :], v[..., keys, :],
                                             grad[..., rows, :], lse[..., rows], delta[..., rows], self.scale,
                                             self._future(q_run, k_run, xp, q.dtype), self._keep(q_run, k_run))
                grad_q[..., rows, :] += dq
                grad_k[..., keys, :] += dk
                grad_v[..., keys, :] += dv
        return grad_q, grad_k, grad_v

    def _future(self, q_run, k_run, xp, dtype):
        """The causal mask's 0/-inf bias where the pair straddles the diagonal, else None."""
        return future_bias(q_run, k_run, xp, dtype) if self.causal and k_run[1] - 1 > q_run[0] else None

    def _keep(self, q_run, k_run):
        return None if self.keep is None else self.keep(q_run, k_run)


def blockwise_attention(q, k, v, causal=True, keep=None, block=BLOCK):
    """softmax(q kᵀ/√d) v for q, k, v of shape (b, a, s, d) -> (b, a, s, d), ``block`` positions at a time.

    ``keep``: None (no attention dropout), or ``keep(q_run, k_run)`` -> the (b, a, lq, lk) dropout mask,
    scaled by 1/(1 - p), at those global (query, key) runs (``nn.Dropout.block_drawer`` makes it)."""
    if not q.shape == k.shape == v.shape or q.ndim != 4:
        raise ValueError(f"blockwise attention takes q, k, v of one shape (b, a, s, d): "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if block < 1:
        raise ValueError(f"block must be a positive number of positions, not {block}")
    return BlockwiseAttention.apply(q, k, v, causal=causal, keep=keep, block=block)
