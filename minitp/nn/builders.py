"""Which layers a model is built from: the one place where a serial and a tensor-parallel model differ.

``MLP``, ``MultiHeadAttention``, ``TransformerBlock`` and ``GPT`` have ONE constructor and ONE forward
each. They do not create their Linear, LayerNorm or Dropout layers directly: they ask a ``layers``
object for them, by the role the layer plays in the papers --

    column_linear   a GEMM whose output features may be split: qkv, fc1, the LM head (Megatron's A)
    row_linear      a GEMM whose input features may be split: proj, fc2 (Megatron's B)
    norm            LayerNorm
    dropout         the dropout on (s, b, h) activations (embedding and residual dropouts)
    attention_dropout   the dropout on attention's (b, a, s, s) probabilities
    attention_core  softmax(q kᵀ/√d) v on (b, a, s, d): plain here; ring or Ulysses under context parallelism
    tokens          which tokens of the (s, b) ids and targets this rank computes: all of them here
    local           how many of n heads (or ffn features) this rank computes
    vocab_embedding, positions, tied_logits, cross_entropy    the GPT's ends
    expert_range, expert_layers, mark_expert    which experts of a mixture this rank holds, and their MLPs
    moe_tokens, token_counts, dispatch, combine, moe_output    how a mixture's tokens reach its experts

``SerialLayers`` (here) answers with the plain layers. ``minitp.parallel.TensorParallelLayers``
answers with column- and row-parallel layers, sequence-parallel LayerNorm and dropout, vocabulary-
parallel embedding and loss: the same module, built with those, is the tensor-parallel model. That is
how the code shows that the parallel model *is* the serial model.
"""
import numpy

from minitp import backend
from minitp import functional as F
from minitp.nn.layers import Dropout, Embedding, LayerNorm, Linear


class SerialLayers:
    """The plain layers: every rank (the only rank) holds every tensor whole."""

    sequence_parallel = False

    def column_linear(self, in_features, out_features, *, dtype, seed, bias=True, std=None, tag=None):
        return Linear(in_features, out_features, bias=bias, dtype=dtype, seed=seed, std=std)

    def row_linear(self, in_features, out_features, *, dtype, seed, bias=True, std=None, tag=None):
        return Linear(in_features, out_features, bias=bias, dtype=dtype, seed=seed, std=std)

    def norm(self, hidden, *, dtype, tag=None):
        return LayerNorm(hidden, dtype=dtype)

    def dropout(self, p, seed):
        """Dropout of (s, b, h) activations."""
        return Dropout(p, seed, batch_axis=1)

    def attention_dropout(self, p, seed):
        """Dropout of (b, a, s, s) attention probabilities."""
        return Dropout(p, seed, batch_axis=0)

    def attention_core(self, q, k, v, causal, dropout):
        """softmax(q kᵀ/√d) v for q, k, v (b, a, s, d): every key of every query is on this rank. Dense
        or blockwise, whichever is faster at this length (``F.attention``); the same numbers."""
        return F.attention(q, k, v, causal, dropout)

    def tokens(self, ids):
        """This rank's tokens of the (s, b) ids or targets: all s of them."""
        return ids

    def local(self, total, what):
        """How many of ``total`` (heads, ffn features) this rank computes: all of them."""
        return total

    def vocab_embedding(self, vocab, hidden, *, dtype, seed, std=1.0, tag=None):
        return Embedding(vocab, hidden, dtype=dtype, seed=seed, std=std)

    def positions(self, wpe, seq):
        """The position vectors of this rank's tokens, (s, 1, h): positions 0 .. s-1."""
        return wpe(backend.array_module(wpe.weight.data).arange(seq)[:, None])

    def tied_logits(self, x, table):
        """Logits with the token embedding table as the head: (s, b, h) @ (h, V)."""
        return F.matmul(x, F.transpose(table))

    def cross_entropy(self, logits, targets):
        """The mean loss over the tokens."""
        return F.cross_entropy(logits, targets)


    # -- a mixture of experts (minitp.nn.moe): every expert here, nothing travels ------------------------
    def expert_range(self, experts):
        """Which of the ``experts`` this rank holds: all of them."""
        return range(experts)

    def expert_layers(self):
        """What an expert's MLP is built from: these same plain layers."""
        return self

    def mark_expert(self, parameter):
        """Nothing to mark: serially an expert's weight is like any other."""

    def moe_tokens(self, x):
        """The (s, b, h) tokens the router sees: all of them."""
        return x

    def moe_output(self, y):
        return y

    def token_counts(self, counts):
        """(before, totals, replicas) of the (k, E) choice ``counts``: no tokens before these, these are
        all of them, one replica."""
        return numpy.zeros_like(counts), counts, 1

    def dispatch(self, x, counts):
        """The rows ``x`` grouped by expert (``counts`` (E,) rows each) to where their experts are: here.
        Returns them and the rows per (source, local expert): one source."""
        return x, counts[None, :]

    def combine(self, y, counts, arrived):
        """The experts' outputs back to where their tokens are: here."""
        return y


SERIAL = SerialLayers()
"""The default ``layers`` of every module: plain, unsplit layers."""
