"""The tensor-parallel answer to "which layers is a model built from?" (see ``minitp.nn.builders``).

``MLP``, ``MultiHeadAttention``, ``TransformerBlock`` and ``GPT`` built with ``TensorParallelLayers`` are
Megatron's tensor-parallel model (Shoeybi et al. 2019), and with ``sequence_parallel=True``
Korthikanti et al.'s (2022):

    role               serial          tensor-parallel                      + sequence parallel
    column_linear      Linear          ColumnParallelLinear: f, X A_r       g (all-gather s), X A_r
    row_linear         Linear          RowParallelLinear: X_r B_r, f̄        X_r B_r, ḡ (reduce-scatter s)
    norm               LayerNorm       LayerNorm (replicated)               SequenceParallelLayerNorm
    dropout            Dropout         Dropout (replicated)                 rank's block of s
    attention_dropout  Dropout         rank's block of the heads            (the same)
    vocab_embedding    Embedding       VocabParallelEmbedding, f̄            ..., ḡ
    cross_entropy      cross_entropy   vocab_parallel_cross_entropy         (the same)

Every layer draws only its own block of the serial weights, and every dropout draws only its block of
the serial mask: the layers say where their block sits, and nothing else needs to know.

``data_parallel``: the group over which the batch is split (``mesh.dp``). The math of a replica is the
serial math on its columns of the batch; only the dropout masks need to know where those columns sit in
the global batch (a ``splits`` entry on the batch axis), so that the replicas together drop exactly the
elements the serial model drops on the whole batch.
"""
from minitp import backend, comm
from minitp import functional as F
from minitp.nn import placement
from minitp.nn.builders import SerialLayers
from minitp.nn.layers import Dropout
from minitp.parallel.tensor import mappings
from minitp.parallel.tensor.async_linear import LinearWithAsyncGradReduce
from minitp.parallel.tensor.cross_entropy import vocab_parallel_cross_entropy
from minitp.parallel.tensor.embedding import VocabParallelEmbedding
from minitp.parallel.tensor.layers import ColumnParallelLinear, RowParallelLinear
from minitp.parallel.tensor.sequence import SequenceParallelLayerNorm

SEQUENCE_AXIS, BATCH_AXIS = 0, 1  # activations are (s, b, h)


class TensorParallelLayers(SerialLayers):
    """Layers split over the tensor-parallel ``group`` (``mesh.tp``), optionally sequence-parallel, with
    the batch optionally split over ``data_parallel`` (``mesh.dp``). ``overlap``: the column-parallel
    layers (and the tied LM head) reduce dX while computing dA (``minitp.parallel.tensor.async_linear``).
    ``seq_len``: the longest sequence the model takes; under SP the layers where the sequence block
    enters (the LayerNorms, the tied head's g) then refuse an input of more than seq_len/t tokens
    (``mappings.check_sequence_block``: local, always on)."""

    seq_len = None  # subclasses that do not pass it check nothing

    def __init__(self, group, sequence_parallel=False, data_parallel=None, overlap=False, seq_len=None):
        self.group, self.sequence_parallel, self.data_parallel = group, sequence_parallel, data_parallel
        self.overlap, self.seq_len = overlap, seq_len

    def column_linear(self, in_features, out_features, *, dtype, seed, bias=True, std=None, tag=None):
        return ColumnParallelLinear(in_features, out_features, bias=bias, group=self.group,
                                    sequence_parallel=self.sequence_parallel, dtype=dtype, seed=seed, std=std, tag=tag,
                                    overlap=self.overlap)

    def row_linear(self, in_features, out_features, *, dtype, seed, bias=True, std=None, tag=None):
        return RowParallelLinear(in_features, out_features, bias=bias, group=self.group, input_is_parallel=True,
                                 sequence_parallel=self.sequence_parallel, dtype=dtype, seed=seed, std=std, tag=tag)

    def norm(self, hidden, *, dtype, tag=None):
        if self.sequence_parallel:
            return SequenceParallelLayerNorm(hidden, group=self.group, dtype=dtype, tag=tag or "layernorm",
                                             seq_len=self.seq_len)
        return super().norm(hidden, dtype=dtype)

    def _batch_split(self, axis):
        dp = self.data_parallel
        return ((axis, dp.rank, dp.size),) if dp is not None and dp.size > 1 else ()

    def sequence_splits(self):
        """Where this rank's tokens sit along the sequence (``minitp.nn.placement``): under SP block
        tp_rank of tp, else the whole sequence."""
        return ((SEQUENCE_AXIS, self.group.rank, self.group.size),) if self.sequence_parallel else ()

    def tokens_here(self, seq):
        """How many of the ``seq`` tokens this rank's activations hold: s/t under SP, else s."""
        if not self.sequence_parallel:
            return seq
        return comm.divide(seq, self.group.size, "the sequence length (split over tp by sequence parallelism)")

    def dropout(self, p, seed):
        """(s, b, h): this rank's tokens under SP (else all of them), this replica's batch columns."""
        return Dropout(p, seed, splits=self.sequence_splits() + self._batch_split(BATCH_AXIS), batch_axis=BATCH_AXIS)

    def attention_dropout(self, p, seed):
        """(b, a, s, s): this replica's batch rows, this rank's block of the heads."""
        heads = ((1, self.group.rank, self.group.size),) if self.group.size > 1 else ()
        return Dropout(p, seed, splits=self._batch_split(0) + heads, batch_axis=0)

    def local(self, total, what):
        """``total`` / t: the heads or ffn features of this rank (``ValueError`` naming ``what`` otherwise)."""
        return comm.divide(total, self.group.size, what)

    def vocab_embedding(self, vocab, hidden, *, dtype, seed, std=1.0, tag=None):
        return VocabParallelEmbedding(vocab, hidden, group=self.group, sequence_parallel=self.sequence_parallel,
                                      dtype=dtype, seed=seed, std=std, tag=tag or "embedding")

    def positions(self, wpe, seq):
        """The position vectors of this rank's tokens: (s, 1, h), or under SP (s/t, 1, h) for positions
        [r·s/t, (r+1)·s/t) -- wherever ``sequence_splits`` places them.

        Under SP the table is still replicated but each rank reads only its rows, so its gradient is a
        partial sum over s/t tokens: like the sequence-parallel LayerNorm's weight, wpe enters through f
        (identity forward, all-reduce backward), and every rank steps it with the full gradient."""
        splits = self.sequence_splits()
        if not splits:
            return super().positions(wpe, seq)
        _, where = placement.positions([split[1:] for split in splits], self.tokens_here(seq))
        table = wpe.weight
        if self.sequence_parallel:
            table = mappings.copy_to_tensor_parallel_region(table, self.group, "wpe")
        return F.embedding(backend.array_module(wpe.weight.data).asarray(where)[:, None], table)

    def sequence_multiple(self):
        """What every sequence length must be a multiple of (``generate`` pads to it): t under SP."""
        return self.group.size if self.sequence_parallel else 1

    def logits_at(self, logits, position):
        """The logits of global ``position``, (b, V/t), from this rank's (s, b, V/t) logits."""
        return logits[position]

    def tied_logits(self, x, table):
        """(s, b, h) replicated or (s/t, b, h) under SP -> (s, b, V/t): x @ (rank r's rows of wte)ᵀ.

        The same entrance as a column-parallel layer -- f, or g gathering all s tokens -- since each
        rank's dx is only its vocabulary block's part of the sum over the vocabulary."""
        if self.sequence_parallel:
            mappings.check_sequence_block(x, self.group, self.seq_len, "lm_head (tied): the sequence-parallel input")
        if self.overlap:  # under SP it keeps x's sequence block and gathers it again for d(table)
            return LinearWithAsyncGradReduce.apply(x, F.transpose(table), group=self.group, tag="lm_head (tied)",
                                                   sequence_parallel=self.sequence_parallel)
        if self.sequence_parallel:
            x = mappings.gather_from_sequence_parallel_region(x, self.group, "lm_head (tied)")
        else:
            x = mappings.copy_to_tensor_parallel_region(x, self.group, "lm_head (tied)")
        return F.matmul(x, F.transpose(table))  # (s, b, h) @ (h, V/t): wte's rows as columns

    def expert_range(self, experts):
        """Experts are placed by ``minitp.parallel.expert.ExpertParallelLayers`` (``ParallelGPT`` takes it for
        a config with experts): these layers know no ep axis, and would reduce nothing right."""
        raise ValueError("a mixture of experts runs on ParallelGPT over a (dp, ep, tp) mesh "
                         "(minitp.parallel.expert.ExpertParallelLayers): with pipeline stages or context "
                         "parallelism it is not built")

    def cross_entropy(self, logits, targets):
        """The mean loss from vocabulary-split logits: three all-reduces of s×b numbers, never the logits."""
        return vocab_parallel_cross_entropy(logits, targets, self.group, tag="loss")
