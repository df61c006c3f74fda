"""The GPT-2 of ``minitp.nn.gpt`` split over a (dp, tp) mesh: every layer tensor-parallel, optionally
sequence-parallel, the batch split over the data-parallel replicas.

    ids (s, b)  --wte: vocab-parallel, f̄ (or ḡ under SP)-->  (s, b, h)    or (s/t, b, h) under SP
                + wpe (replicated; under SP each rank adds its own tokens' positions)
                --drop--> blocks (TP, +SP) --ln_f-->
                --lm_head: column-parallel over the vocabulary, no gather (g first under SP)--> (s, b, V/t)
                --vocab_parallel_cross_entropy--> loss, the same on every rank of the tp group

The logits never exist whole on any rank: rank r holds the columns of its vocabulary range, which is
exactly what the vocab-parallel cross-entropy wants (three all-reduces of s×b numbers instead of an
all-gather of s×b×V). Under sequence parallelism the tokens are gathered (g) before the LM head, as in
Megatron: each rank then computes all s tokens × its V/t columns.

The parameters have the serial model's names and serial shapes cut along ``split_axis``, so
``load_serial_state`` / ``gather_serial_state`` move weights between this model and ``nn.GPT``, and a
checkpoint is the serial model's.

**Data parallelism.** ``forward`` takes this replica's share of the batch: ids (s, b) with b = B/dp,
the columns [dp_rank·b, (dp_rank+1)·b) of the global (s, B) batch (``data_parallel.split_batch``). The
math of a replica is the serial math on its columns; only the dropout masks need to know where those
columns sit in the global batch, so the model tells every dropout (``Dropout.batch_offset``) before
running: the replicas together then drop exactly the elements the serial model drops on the whole batch.
"""
import math

import numpy

from minitp import backend, dist
from minitp import functional as F
from minitp.autograd import Tensor
from minitp.nn.gpt import GPT, generate_tokens
from minitp.nn.init import derive_seed
from minitp.nn.layers import Dropout, Embedding, LayerNorm
from minitp.nn.module import Module, ModuleList
from minitp.parallel import mappings
from minitp.parallel.cross_entropy import vocab_parallel_cross_entropy
from minitp.parallel.embedding import VocabParallelEmbedding
from minitp.parallel.layers import ColumnParallelLinear
from minitp.parallel.sequence import SequenceParallelDropout, SequenceParallelLayerNorm
from minitp.parallel.shard import load_serial_state
from minitp.parallel.transformer import ParallelTransformerBlock


class ParallelGPT(Module):
    """``nn.GPT`` over the mesh's tensor-parallel group, with ``sequence_parallel`` or not.

    Sublayers (the serial names): ``wte`` a ``VocabParallelEmbedding`` (rows split, ``split_axis=0``),
    ``wpe`` the (seq_len, h) position table, replicated (it is small), ``drop``, ``blocks``
    (``ParallelTransformerBlock``s), ``ln_f`` (a ``SequenceParallelLayerNorm`` under SP), and ``lm_head``
    a ``ColumnParallelLinear`` h -> vocab without bias or gather (columns split, ``split_axis=1``). With
    ``tie_embeddings`` there is no ``lm_head``: rank r's block of wte, rows [r·V/t, (r+1)·V/t), transposed
    IS the column block of the head, so the logits of its vocabulary range are x @ wte_shardᵀ.

    The weights start as the serial model's: ``serial`` (an ``nn.GPT``) if given, else ``nn.GPT`` built
    with the same arguments and ``seed``; every rank builds it and cuts its shard (Megatron's
    master-weight initialisation), so tp = 1, 2, 4 start identical. Dropout seeds and counters are
    copied from it too. ``ValueError`` on every rank, before any communication, when tp does not divide
    the vocabulary, the heads or ffn_hidden; under SP, the sequence length (at ``forward``).
    """

    def __init__(self, vocab, seq_len, hidden, heads, layers, ffn_hidden=None, dropout=0.0, seed=0,
                 tie_embeddings=False, attention_dropout=None, dtype=numpy.float32, sequence_parallel=False,
                 mesh=None, serial=None):
        super().__init__()
        self.mesh = mesh if mesh is not None else dist.current_mesh()
        if self.mesh is None:
            raise RuntimeError("ParallelGPT needs a mesh: call minitp.dist.init(tp=..., dp=...) first, or pass mesh=")
        group = self.group = self.mesh.tp
        self.vocab, self.seq_len, self.hidden, self.heads, self.layers = vocab, seq_len, hidden, heads, layers
        self.sequence_parallel, self.tie_embeddings = sequence_parallel, tie_embeddings
        attention_dropout = dropout if attention_dropout is None else attention_dropout
        sp = sequence_parallel
        self.wte = VocabParallelEmbedding(vocab, hidden, group=group, sequence_parallel=sp, dtype=dtype, tag="wte")
        self.wpe = Embedding(seq_len, hidden, dtype=dtype)  # replicated: seq_len×h is small next to V×h
        self.drop = SequenceParallelDropout(dropout, 0, group) if sp else Dropout(dropout)
        self.blocks = ModuleList(
            ParallelTransformerBlock(hidden, heads, ffn_hidden, causal=True, dropout=dropout,
                                     attention_dropout=attention_dropout, seed=derive_seed(seed, f"blocks.{i}"),
                                     dtype=dtype, sequence_parallel=sp, group=group)
            for i in range(layers))
        self.ln_f = SequenceParallelLayerNorm(hidden, group=group, dtype=dtype, tag="ln_f") if sp \
            else LayerNorm(hidden, dtype=dtype)
        self.lm_head = None if tie_embeddings else ColumnParallelLinear(
            hidden, vocab, bias=False, gather_output=False, sequence_parallel=sp, group=group, dtype=dtype,
            tag="lm_head")
        if serial is None:
            serial = GPT(vocab, seq_len, hidden, heads, layers, ffn_hidden=ffn_hidden, dropout=dropout, seed=seed,
                         tie_embeddings=tie_embeddings, attention_dropout=attention_dropout, dtype=dtype)
        self.load_serial(serial)

    @classmethod
    def from_serial(cls, gpt, sequence_parallel=False, mesh=None):
        """The sharded copy of the serial ``gpt`` (its weights, dropout seeds and counters) on ``mesh``."""
        first = gpt.blocks[0] if gpt.layers else None
        return cls(gpt.vocab, gpt.seq_len, gpt.hidden, gpt.heads, gpt.layers,
                   ffn_hidden=first.mlp.ffn_hidden if first else None, dropout=gpt.drop.p,
                   tie_embeddings=gpt.tie_embeddings,
                   attention_dropout=first.attention.attention_dropout.p if first else None,
                   dtype=gpt.wte.weight.dtype, sequence_parallel=sequence_parallel, mesh=mesh, serial=gpt)

    def load_serial(self, gpt):
        """Take this rank's shard of the serial ``gpt``'s weights, and its dropouts' seeds and counters
        (module by module, by name: the serial and the parallel model have the same dropouts)."""
        load_serial_state(self, gpt.state_dict(), self.group)
        serial_dropouts = dict(dropouts(gpt))
        for name, dropout in dropouts(self):
            dropout.seed, dropout.counter = serial_dropouts[name].seed, serial_dropouts[name].counter

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, ids):
        """ids (s, b): this replica's share of the batch, the same on every rank of the tp group ->
        this rank's vocabulary columns of the logits, (s, b, V/t)."""
        ids = ids.data if isinstance(ids, Tensor) else ids
        seq, batch = ids.shape
        if seq > self.seq_len:
            raise ValueError(f"a sequence of {seq} tokens is longer than the model's seq_len {self.seq_len}")
        self._place_batch(batch)
        x = self.wte(ids)  # (s, b, h) replicated, or (s/t, b, h): rank r's tokens [r·s/t, (r+1)·s/t)
        x = x + self._positions(seq)  # + (s, 1, h) or (s/t, 1, h): the positions of the same tokens
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        return self._logits(x)

    def loss(self, ids, targets):
        """Mean cross-entropy of this replica's next-token predictions, from the vocab-sharded logits;
        the same on every rank of the tp group. ``targets`` (s, b): the ids to predict."""
        return vocab_parallel_cross_entropy(self(ids), targets, group=self.group, tag="loss")

    def _place_batch(self, batch):
        """Tell every dropout where this replica's b columns sit in the global batch of dp·b."""
        dp = self.mesh.dp
        for _, dropout in dropouts(self):
            dropout.batch_offset, dropout.batch_total = dp.rank * batch, dp.size * batch

    def _positions(self, seq):
        """The position vectors of this rank's tokens, (s, 1, h); under SP (s/t, 1, h) for positions
        [r·s/t, (r+1)·s/t).

        Under SP the table is still replicated but each rank reads only its rows, so its gradient is a
        partial sum over s/t tokens: like the sequence-parallel LayerNorm's weight, wpe enters through f
        (identity forward, all-reduce backward), and every rank steps it with the full gradient."""
        xp = backend.array_module(self.wpe.weight.data)
        if not self.sequence_parallel:
            return self.wpe(xp.arange(seq)[:, None])
        tokens = dist.divide(seq, self.group.size, "the sequence length (split over tp by sequence parallelism)")
        start = self.group.rank * tokens
        table = mappings.copy_to_tensor_parallel_region(self.wpe.weight, self.group, "wpe")
        return F.embedding(xp.arange(start, start + tokens)[:, None], table)

    def _logits(self, x):
        """(s, b, h) replicated or (s/t, b, h) under SP -> (s, b, V/t), this rank's vocabulary columns."""
        if self.lm_head is not None:
            # column-parallel: f (or g under SP) on x, then (s, b, h) @ (h, V/t)
            return self.lm_head(x)
        # Tied: the same entrance as the column-parallel layer -- f, or g gathering all s tokens -- since
        # each rank's dx is only its vocabulary block's part of the sum over the vocabulary.
        if self.sequence_parallel:
            x = mappings.gather_from_sequence_parallel_region(x, self.group, "lm_head (tied)")
        else:
            x = mappings.copy_to_tensor_parallel_region(x, self.group, "lm_head (tied)")
        return F.matmul(x, F.transpose(self.wte.weight))  # (s, b, h) @ (h, V/t): wte's rows as columns

    # -- sampling --------------------------------------------------------------------------------
    def generate(self, ids, steps, temperature=1.0, rng=None):
        """Extend ``ids`` (s, b) by ``steps`` tokens -> (s + steps, b), as ``nn.GPT.generate`` does (greedy,
        or sampled with ``rng``), on every rank of the tp group together (a collective: each step
        all-gathers the last position's (b, V/t) logits into (b, V); every rank then draws the same
        token, from the same logits with the same ``rng`` state).

        Under SP the context must split over t: it is padded on the right to a multiple of t. The causal
        mask keeps the padding invisible to the real tokens, so the last real position's logits are
        unchanged. The context is the last ``seq_len`` tokens (under SP, the last multiple of t of them).
        """
        return generate_tokens(self, ids, steps, temperature, rng)

    def _next_logits(self, tokens):
        """The logits of the token after ``tokens`` (s, b), host ids: (b, V) gathered from every rank's
        V/t columns, float64 on the host."""
        t = self.group.size if self.sequence_parallel else 1
        context = tokens[-(self.seq_len // t * t):]  # the last seq_len tokens; under SP, a multiple of t of them
        real = len(context)
        # under SP, padded on the right to a multiple of t: the causal mask hides the padding from the real tokens
        padding = numpy.zeros((math.ceil(real / t) * t - real,) + context.shape[1:], dtype=context.dtype)
        context = numpy.concatenate([context, padding])
        shard = self(backend.from_host(context)).data[real - 1]  # (b, V/t), the last real position
        logits = dist.all_gather(shard, self.group, axis=-1, tag="generate: logits")  # (b, V)
        return backend.to_host(logits).astype(numpy.float64)

    def extra_repr(self):
        return (f"vocab={self.vocab}, seq_len={self.seq_len}, hidden={self.hidden}, heads={self.heads}, "
                f"layers={self.layers}, tp={self.group.size}, dp={self.mesh.dp.size}, "
                f"sequence_parallel={self.sequence_parallel}, tie_embeddings={self.tie_embeddings}")


def dropouts(model):
    """(name, Dropout) for every dropout of ``model``: the same names in ``nn.GPT`` and ``ParallelGPT``
    (``drop``, ``blocks.0.attention.attention_dropout``, ...)."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, Dropout)]
