"""The GPT-2 of ``minitp.nn.gpt`` built over a (dp, tp) mesh: every layer tensor-parallel, optionally
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

``ParallelGPT`` is ``nn.GPT`` built with ``TensorParallelLayers`` (``minitp.parallel.tensor.builders``): the
constructor and the forward are the serial model's, and every rank draws only its own shards of the
serial model's initial weights, so ``ParallelGPT(config, mesh)`` starts exactly where ``GPT(config)`` does
-- with no serial model built anywhere, and no loading step. The parameters have the serial names and
serial shapes cut along ``split_axis``, so a checkpoint is the serial model's.

**Data parallelism.** ``forward`` takes this replica's share of the batch: ids (s, b) with b = B/dp,
the columns [dp_rank·b, (dp_rank+1)·b) of the global (s, B) batch (``data_parallel.split_batch``). The
math of a replica is the serial math on its columns; only the dropout masks need to know where those
columns sit in the global batch, and the dropouts were built knowing it (their ``splits``).
"""
import math

import numpy

from minitp import backend, comm
from minitp.nn.gpt import GPT, generate_tokens
from minitp.nn.layers import Dropout
from minitp.parallel.context.layers import context_layers
from minitp.parallel.expert.layers import ExpertParallelLayers
from minitp.parallel.tensor.shard import load_serial_state


class ParallelGPT(GPT):
    """``nn.GPT`` over ``mesh``: tensor-parallel over ``mesh.tp`` (with ``sequence_parallel`` or not), the
    batch split over ``mesh.dp``, and with ``context_parallel`` ("ring", "zigzag" or "ulysses",
    ``minitp.parallel.context.layers``) the sequence split over ``mesh.cp``: ``forward`` takes the whole (s, b)
    ids and returns the logits of this rank's s/cp tokens, ``loss`` their mean loss (the mean over the dp ×
    cp ranks, ``data_parallel.average_over_data_parallel``, is the global batch's).

    Sublayers (the serial names): ``wte`` a ``VocabParallelEmbedding`` (rows split, ``split_axis=0``),
    ``wpe`` the (seq_len, h) position table, replicated (it is small), ``drop``, ``blocks`` (built from
    column/row-parallel layers), ``ln_f`` (a ``SequenceParallelLayerNorm`` under SP), and ``lm_head`` a
    ``ColumnParallelLinear`` h -> vocab without bias or gather (columns split, ``split_axis=1``). With
    ``tie_embeddings`` there is no ``lm_head``: rank r's block of wte, rows [r·V/t, (r+1)·V/t), transposed
    IS the column block of the head, so the logits of its vocabulary range are x @ wte_shardᵀ.

    ``ValueError`` on every rank, before any communication, when tp does not divide the vocabulary, the
    heads or ffn_hidden; under SP, the sequence length (at ``forward``).

    ``blocks``: a pipeline stage's part of the model (``nn.GPT``), built alone; default the whole.
    ``overlap=True``: every column-parallel GEMM's backward reduces dX while it computes dA (Megatron's
    asynchronous linear backward, ``minitp.parallel.tensor.async_linear``); the same numbers.
    """

    def __init__(self, config, mesh, sequence_parallel=False, context_parallel=None, blocks=None, overlap=False):
        # the mesh's shape is checked here, before any layer is built: every rank raises the same error
        comm.divide(config.vocab, mesh.tp.size, "the vocabulary size (rows split over tp)")
        # seq_len: under SP a layer fed more than seq_len/t tokens (the full sequence) refuses it, always
        if config.experts:  # the experts spread over mesh.ep (refused with pp or cp, before any layer)
            layers = ExpertParallelLayers(mesh, sequence_parallel, overlap, config.seq_len)
        else:
            layers = context_layers(mesh, context_parallel, sequence_parallel, config.heads, overlap, config.seq_len)
        super().__init__(config, layers=layers, blocks=blocks)
        self.mesh, self.group, self.sequence_parallel = mesh, mesh.tp, sequence_parallel
        self.context_parallel = context_parallel

    @classmethod
    def from_serial(cls, gpt, mesh, sequence_parallel=False, context_parallel=None):
        """The sharded copy of the serial ``gpt`` -- its current weights (e.g. trained) and its dropouts'
        counters -- on ``mesh``."""
        model = cls(gpt.config, mesh, sequence_parallel=sequence_parallel, context_parallel=context_parallel)
        model.load_serial(gpt)
        return model

    def load_serial(self, gpt):
        """Take this rank's shard of the serial ``gpt``'s weights, and its dropouts' counters (module by
        module, by name: the serial and the parallel model have the same dropouts)."""
        load_serial_state(self, gpt.state_dict(), self.group)
        serial_dropouts = dict(dropouts(gpt))
        for name, dropout in dropouts(self):
            dropout.counter = serial_dropouts[name].counter

    # -- sampling --------------------------------------------------------------------------------
    def generate(self, ids, steps, temperature=1.0, rng=None):
        """Extend ``ids`` (s, b) by ``steps`` tokens -> (s + steps, b), as ``nn.GPT.generate`` does (greedy,
        or sampled with ``rng``), on every rank of the tp group together (a collective: each step
        all-gathers the last position's (b, V/t) logits into (b, V); every rank then draws the same
        token, from the same logits with the same ``rng`` state).

        Under SP the context must split over t (under context parallelism over cp, 2·cp for zigzag): it is
        padded on the right to a multiple of that. The causal mask keeps the padding invisible to the real
        tokens, so the last real position's logits are unchanged. The context is the last ``seq_len``
        tokens (under SP, the last multiple of t of them).
        """
        return generate_tokens(self, ids, steps, temperature, rng)

    def _next_logits(self, tokens):
        """The logits of the token after ``tokens`` (s, b), host ids: (b, V) gathered from every rank's
        V/t columns, float64 on the host."""
        t = self.builders.sequence_multiple()  # t under SP (and cp, 2·cp for zigzag, under context parallelism)
        context = tokens[-(self.seq_len // t * t):]  # the last seq_len tokens; under SP, a multiple of t of them
        real = len(context)
        # under SP, padded on the right to a multiple of t: the causal mask hides the padding from the real tokens
        padding = numpy.zeros((math.ceil(real / t) * t - real,) + context.shape[1:], dtype=context.dtype)
        context = numpy.concatenate([context, padding])
        shard = self.builders.logits_at(self(backend.from_host(context)).data, real - 1)  # (b, V/t), the last real one
        logits = comm.all_gather(shard, self.group, axis=-1, tag="generate: logits")  # (b, V)
        return backend.to_host(logits).astype(numpy.float64)

    def extra_repr(self):
        context = f", cp={self.mesh.cp_size} ({self.context_parallel})" if self.context_parallel else ""
        return (f"{super().extra_repr()}, tp={self.group.size}, dp={self.mesh.dp.size}{context}, "
                f"sequence_parallel={self.sequence_parallel}")


def dropouts(model):
    """(name, Dropout) for every dropout of ``model``: the same names in ``nn.GPT`` and ``ParallelGPT``
    (``drop``, ``blocks.0.attention.attention_dropout``, ...)."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, Dropout)]
