"""Which layers does each pipeline stage hold? The GPT cut into p·v chunks of consecutive blocks.

With p stages and v chunks per rank (v = 1 unless the schedule interleaves), the L blocks form p·v
model chunks of L/(p·v) blocks each; model chunk c lives on stage c mod p, as its chunk c // p:

    v = 1, p = 4, L = 8:   stage 0: blocks 0-1 + embeddings   stage 1: 2-3   stage 2: 4-5
                           stage 3: blocks 6-7 + ln_f, head, loss
    v = 2, p = 2, L = 8:   stage 0: chunks 0 (blocks 0-1 + embeddings) and 2 (blocks 4-5)
                           stage 1: chunks 1 (blocks 2-3) and 3 (blocks 6-7 + ln_f, head, loss)

Each chunk is ``ParallelGPT(config, mesh, blocks=...)``: the GPT's one constructor, holding only its
blocks (and the ends that come with the first and the last block), tensor-parallel within the stage and,
with ``context_parallel``, its sequence split over ``mesh.cp`` as a ``ParallelGPT``'s is.
Nothing else is built on a stage, and what is built has the serial names and the serial initial values
(a pure function of seed, name and index): no stage ever holds the whole model, and no loading step is
needed. A split that does not divide (L not a multiple of p·v) is refused on every rank.

**Tied embeddings** (Megatron's embedding group). The first stage looks tokens up in wte; the last
stage multiplies by wteᵀ for the logits. Each holds its own copy of the table (the last stage's is
marked ``tied_copy``) and, after the step's last backward, the two all-reduce its gradient -- the sum
of the lookup's and the head's parts, which is the serial gradient -- so both take the same step and
stay equal. A copy on one stage (p = 1) is the same Parameter, and nothing is sent.

**Context parallelism inside a stage** (``context_parallel`` "ring", "zigzag" or "ulysses"). Every
chunk splits the sequence over ``mesh.cp`` exactly as a whole ``ParallelGPT`` does: the first chunk
embeds this cp rank's s/cp tokens of the ids (zigzag: its two chunks, in the layout's order), every
block's attention crosses the cp ranks, the last chunk's loss is the mean over those same tokens of the
targets. What crosses a stage boundary is therefore this rank's (s/cp, b/m, h) block of the activation
-- (s/(cp·t), b/m, h) under sequence parallelism -- sent to the rank with the same dp, cp and tp
coordinates on the next stage, which holds the same tokens (``engine.activation_shape``). The parameters
are replicated over dp × cp, so their gradients are averaged over ``mesh.dp_cp``
(``data_parallel.replicas``), and the tied table's group joins the two ends with the same dp, cp and tp
coordinates: each end's gradient is its own tokens' part, their sum this cp rank's whole gradient.
"""
from mpi4py import MPI

from minitp import comm
from minitp.nn.module import Module
from minitp.parallel.gpt import ParallelGPT

_embedding_groups = {}  # id(mesh) -> (mesh, Group or None): one communicator per mesh, split once


def chunk_blocks(layers, stages, chunks, chunk):
    """The blocks of model chunk ``chunk`` (0 .. stages·chunks - 1): a range of layers/(stages·chunks)."""
    per_chunk = comm.divide(layers, stages * chunks,
                            f"the layers (split into pp × virtual stages = {stages} × {chunks} chunks)")
    return range(chunk * per_chunk, (chunk + 1) * per_chunk)


def embedding_group(mesh):
    """The first and the last stage of this rank's pipeline (same dp, cp and tp coordinates), or None on
    a stage that is neither. Collective over the world on first use (every rank splits)."""
    if id(mesh) not in _embedding_groups:
        ends = mesh.pp_rank in (0, mesh.pp_size - 1)
        colour = mesh.rank_of(pp=0) if ends else MPI.UNDEFINED
        communicator = mesh.world.comm.Split(color=colour, key=mesh.pp_rank)
        _embedding_groups[id(mesh)] = (mesh, comm.Group(communicator, "embedding") if ends else None)
    return _embedding_groups[id(mesh)][1]


class PipelineGPT(Module):
    """This rank's stage of a GPT on ``mesh``: its v model chunks (``chunks``, each a ``ParallelGPT``
    part), tensor-parallel over ``mesh.tp`` (with ``sequence_parallel`` or not), the batch split over
    ``mesh.dp``, and with ``context_parallel`` ("ring", "zigzag" or "ulysses") the sequence split over
    ``mesh.cp``. A mesh with cp > 1 and no kind, an unknown kind, or heads that tp × cp does not divide
    under Ulysses: ``ValueError`` on every rank before anything is built (as ``ParallelGPT``).

    ``named_parameters`` and ``named_modules`` are the chunks' own, with the serial names (no "chunks.0"
    prefix): checkpoints, optimizers and ``gather_serial_grads`` see a piece of the serial model. The
    schedules run the chunks (``engine.py``); there is no ``forward`` of the whole.
    """

    def __init__(self, config, mesh, sequence_parallel=False, virtual_stages=1, context_parallel=None,
                 overlap=False):
        super().__init__()
        p, rank = mesh.pp_size, mesh.pp_rank
        chunk_blocks(config.layers, p, virtual_stages, 0)  # refuse a split that does not divide, before building
        self.config, self.mesh, self.sequence_parallel = config, mesh, sequence_parallel
        self.virtual_stages, self.context_parallel = virtual_stages, context_parallel
        self.model_chunks = [k * p + rank for k in range(virtual_stages)]  # the model's chunk index of each
        self.chunks = [ParallelGPT(config, mesh, sequence_parallel, context_parallel,
                                   blocks=chunk_blocks(config.layers, p, virtual_stages, c), overlap=overlap)
                       for c in self.model_chunks]
        self.embedding_group = embedding_group(mesh) if config.tie_embeddings and p > 1 else None
        if self.embedding_group is not None:  # the gradient sync sums it over the two ends first (buckets.py)
            self.tied_embedding().tied_group = self.embedding_group

    @property
    def builders(self):
        """The layers every chunk is built from (the same ``TensorParallelLayers`` kind on each;
        ``ContextParallelLayers`` with ``context_parallel``)."""
        return self.chunks[0].builders

    def named_modules(self, prefix=""):
        yield prefix, self
        for chunk in self.chunks:
            yield from chunk.named_modules(prefix)

    def tied_embedding(self):
        """The wte Parameter this stage shares with the other end of the pipeline, or None."""
        if self.embedding_group is None:
            return None
        return next(chunk.wte.weight for chunk in self.chunks if chunk.wte is not None)

    def holds(self):
        """What this rank holds, in words: "blocks 2-3 (chunk 1); blocks 6-7 + ln_f, head (chunk 3)"."""
        parts = []
        for c, chunk in zip(self.model_chunks, self.chunks):
            blocks = chunk.block_range
            words = [f"blocks {blocks.start}-{blocks.stop - 1}" if len(blocks) > 1 else f"block {blocks.start}"]
            if chunk.first:
                words.insert(0, "wte, wpe")
            if chunk.last:
                words.append("ln_f, " + ("wte (tied copy)" if chunk.tie_embeddings and not chunk.first else
                                         "wte as head (tied)" if chunk.tie_embeddings else "lm_head") + ", loss")
            parts.append(" + ".join(words) + (f" (chunk {c})" if self.virtual_stages > 1 else ""))
        return "; ".join(parts)

    def generate(self, ids, steps, temperature=1.0, rng=None):
        """``ParallelGPT.generate`` when this stage holds the whole model (pp = 1, one chunk); sampling
        through the stages is not written, so ``ValueError`` otherwise."""
        if len(self.chunks) != 1 or not (self.chunks[0].first and self.chunks[0].last):
            raise ValueError("generate needs the whole model on one stage (pp = 1, one chunk)")
        return self.chunks[0].generate(ids, steps, temperature, rng)

    def extra_repr(self):
        context = f", cp={self.mesh.cp_size} ({self.context_parallel})" if self.context_parallel else ""
        return f"stage {self.mesh.pp_rank} of {self.mesh.pp_size}{context}: {self.holds()}"
