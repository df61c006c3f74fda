"""How does a stage run its plan? Receive, compute, send, free -- one action at a time.

For each action of this rank's plan (``schedules.py``), model chunk c = k·p + r being the rank's chunk k:

    F(i, k)  input   model chunk 0 reads microbatch i of the ids; any other receives chunk c-1's output
                     from stage (r-1) mod p: (s, b/m, h), or (s/t, b/m, h) under sequence parallelism --
                     a shape both sides compute from the batch's (s, b), which every rank is given
                     (s may be shorter than seq_len, as the serial GPT allows). It becomes a fresh leaf that
                     requires grad: the graph stops at the stage boundary, each stage's backward is its own.
             compute the chunk, inside ``microbatch(chunk, i, m)`` so that its dropouts draw block i of
                     the step's masks; the last model chunk adds the loss of microbatch i.
             output  sent to stage (r+1) mod p, then its data is freed (Megatron's
                     ``deallocate_output_tensor``): backward needs the graph that made the output, not
                     the output's values, so the Tensor keeps only its shape (a zero-stride view of one
                     number) and the s·b·h activation is gone as soon as the send completes.
    B(i, k)  input   the last model chunk starts from d(step loss)/d(loss_i) = 1/m (the step's loss is
                     the mean of the m microbatch means) -- S/m under loss scaling (``scale=S``: the seed
                     is the step loss · S's, so every gradient is S times larger, and the losses reported
                     stay unscaled); any other receives the gradient of its output from stage (r+1) mod p.
             compute backward through the chunk; parameter gradients add up in ``.grad`` over the m
                     microbatches.
             output  the gradient of the input, sent to stage (r-1) mod p.

Sends are non-blocking and receives wait (``minitp.comm.p2p``: why that cannot deadlock); each message's
tag names (kind, sending chunk, microbatch), so it meets exactly its receive.

**Activations held.** Each forward runs under ``track_saved``: the bytes its ops keep for backward
(the received input included: the first op keeps it) are held from that F until its B. ``StageRun``
reports the peak over the step, in bytes and in microbatch-chunks: m on every stage for AFAB,
min(p - r, m) on stage r for 1F1B (``schedules.expected_in_flight``).
"""
import math
import time
from dataclasses import dataclass, field

import numpy

from minitp import backend, comm, trace
from minitp.autograd import Tensor
from minitp.nn.microbatch import microbatch, microbatch_of, microbatch_size
from minitp.saved_bytes import track_saved


@dataclass
class StageRun:
    """What one rank's run of its plan did."""
    loss: float = None
    """the step's loss (the mean over the microbatches) on the last stage; None elsewhere"""
    rows: list = field(default_factory=list)
    """(start, end, Action) of each action's compute, in ``time.perf_counter`` seconds"""
    saved_bytes: list = field(default_factory=list)
    """the bytes each forward kept for backward, in plan order"""
    peak_bytes: int = 0
    """the most bytes kept for backward at once"""
    peak_held: int = 0
    """the most microbatch-chunks held at once (forward run, backward not yet)"""
    freed_bytes: int = 0
    """the bytes of sent outputs freed at once rather than held until their backward"""


def activation_shape(model, seq, microbatch_columns):
    """What crosses a stage boundary for a batch of ``seq`` tokens: this rank's tokens of the (s, b/m, h)
    activation -- (s, b/m, h); (s/t, b/m, h) under sequence parallelism; (s/cp, b/m, h) under context
    parallelism (zigzag: its two chunks, in the layout's order), (s/(cp·t), b/m, h) with SP as well: the
    chunks' layers say how many (``builders.tokens_here``). ``seq`` is the batch's own length, not
    ``config.seq_len``: like the serial GPT, a pipeline takes any s up to seq_len, and every rank is given
    the same (s, b) ids, so every stage derives the same shape from them. ``ValueError`` -- on every rank,
    since each checks the same numbers, and before any send -- for s > seq_len (stage 0's embedding would
    refuse it alone, after the others had posted their receives) or an s that the layout does not split:
    t under SP, cp blocks (2·cp chunks for zigzag) under context parallelism, and their s/cp tokens over
    t under both."""
    config = model.config
    if seq > config.seq_len:
        raise ValueError(f"a sequence of {seq} tokens is longer than the model's seq_len {config.seq_len}")
    return (model.builders.tokens_here(seq), microbatch_columns, config.hidden)


def _match(kind, chunk, index, microbatches):
    """The MPI tag of the message that ``kind`` ("F": an activation, "B": a gradient) of microbatch
    ``index`` sends from model chunk ``chunk``."""
    return 2 * (chunk * microbatches + index) + (kind == "B")


def _free(tensor):
    """Drop ``tensor``'s values, keep its shape and its place in the graph: a read-only zero-stride view
    of one number stands in for the array (the engine's backward only checks the gradient's shape)."""
    xp = backend.array_module(tensor.data)
    tensor.data = xp.broadcast_to(xp.zeros((), dtype=tensor.data.dtype), tensor.data.shape)


def check_scale(scale, microbatches, dtype):
    """``ValueError`` unless the last stage's backward seed S/m (``scale`` S, m ``microbatches``) is a
    positive NORMAL number of the model's ``dtype``: the seed is made in that dtype, and in fp16 (normal
    from 2^-14 ≈ 6.1e-5 to 65,504) an S/m beyond the largest would seed inf -- every gradient inf or NaN
    whatever the model, a step lost to the seed itself rather than to an overflow of the gradients --
    and one below the smallest normal would lose bits (or become 0). Within the normal range
    fl(S/m) = S · fl(1/m) exactly for a power-of-two S, so the scaled gradients are exactly S times the
    unscaled ones. Every rank checks the same numbers, so
    every rank raises, before anything is sent. ``scale=None``: nothing to check (the seed is 1/m)."""
    if scale is None:
        return
    info = numpy.finfo(numpy.dtype(dtype))
    if not (math.isfinite(scale) and float(info.tiny) <= scale / microbatches <= float(info.max)):
        raise ValueError(f"the loss scale {scale} over {microbatches} microbatches seeds the last stage's backward "
                         f"with {scale / microbatches:g}, which {numpy.dtype(dtype).name} cannot hold as a normal "
                         f"number ({float(info.tiny):g} to {float(info.max):g}): choose a scale between "
                         f"{float(info.tiny) * microbatches:g} and {float(info.max) * microbatches:g}")


def run(model, actions, ids, targets, microbatches, deallocate=True, scale=None):
    """Run this rank's ``actions`` on its ``PipelineGPT`` stage ``model`` for the (s, b) ``ids`` and
    ``targets`` of this data-parallel replica, cut into ``microbatches``; returns a ``StageRun``.
    ``scale``: a loss scaler's S -- the last stage's seed is S/m instead of 1/m (``check_scale`` first),
    every gradient S times larger; ``StageRun.loss`` is the unscaled loss all the same.
    Gradients accumulate into the parameters' ``.grad`` (zero them before). Every rank passes the same
    shapes: a batch that ``microbatches`` does not divide, or longer than seq_len, is refused on every
    rank before any send. Returns only when every send this rank posted has completed: a send's buffer
    must outlive MPI's reading of it, and above MPI's eager limit that reading ends only when the
    receiver has taken the data -- after this rank's last action."""
    check_scale(scale, microbatches, model.config.dtype)
    stage = _Stage(model, ids, targets, microbatches, deallocate, 1.0 if scale is None else scale)
    # in a trace: the whole schedule, sends' completion included, is one "pipeline" phase span; what
    # trace_report needs for the bubble formula and to find the rank's pipeline rides in its args
    pp = model.mesh.pp
    with trace.span("pipeline", "phase", stage=pp.rank, stages=pp.size, microbatches=microbatches,
                    chunks=len(model.chunks), ranks=list(pp.ranks)):
        for action in actions:  # each returns when its compute started: the rows time the compute, not the wait
            if action.kind == "F":
                started = stage.forward(action.microbatch, action.chunk)
            else:
                started = stage.backward(action.microbatch, action.chunk)
            stage.result.rows.append((started, time.perf_counter(), action))
            stage.forget_delivered()
        comm.wait_all(stage.pending)
    if stage.losses:
        stage.result.loss = sum(stage.losses) / microbatches
    return stage.result


class _Stage:
    """One rank's state during a step: what it holds for backward, its sends in flight, its losses."""

    def __init__(self, model, ids, targets, microbatches, deallocate, scale=1.0):
        self.model, self.ids, self.targets, self.m, self.deallocate = model, ids, targets, microbatches, deallocate
        self.scale = scale  # S of a loss scaler (1: none): the last chunk's seed is S/m
        columns = microbatch_size(ids.shape[1], microbatches, "the batch of a data-parallel replica")
        self.shape, self.dtype = activation_shape(model, ids.shape[0], columns), numpy.dtype(model.config.dtype)
        self.pp = model.mesh.pp
        self.last = self.pp.size * len(model.chunks) - 1  # the model's last chunk
        self.result, self.held, self.pending, self.losses, self.held_bytes = StageRun(), {}, [], [], 0

    def neighbour(self, step):
        """The stage ``step`` away along the pipeline (chunk c+1 of the model lives on stage r+1 mod p)."""
        return (self.pp.rank + step) % self.pp.size

    def forward(self, i, k):
        """F of microbatch ``i`` through the rank's chunk ``k``; returns when its compute started."""
        chunk, c, m = self.model.chunks[k], self.model.model_chunks[k], self.m
        if c == 0:
            x = microbatch_of(self.ids, i, m)
        else:
            x = Tensor(comm.recv(self.shape, self.dtype, self.pp, self.neighbour(-1), _match("F", c - 1, i, m),
                                 tag=f"pipeline: activation {i}, chunk {c - 1}->{c}"), requires_grad=True)
        started = time.perf_counter()
        # in a trace: "F i" (its chunk too when interleaved), the compute and the send's post, after the recv
        with trace.span(f"F {i}" + (f" (chunk {c})" if len(self.model.chunks) > 1 else ""), "microbatch",
                        microbatch=i, chunk=c):
            with track_saved() as saved, microbatch(chunk, i, m):
                y = chunk.loss(x, microbatch_of(self.targets, i, m)) if c == self.last else chunk(x)
            if c == self.last:
                self.losses.append(y.item())
            else:
                self.pending.append(comm.send(y.data, self.pp, self.neighbour(+1), _match("F", c, i, m),
                                              tag=f"pipeline: activation {i}, chunk {c}->{c + 1}"))
                if self.deallocate:
                    self.result.freed_bytes += y.data.nbytes
                    _free(y)
        self.held[i, k] = (x, y, saved.total)
        self.held_bytes += saved.total
        self.result.saved_bytes.append(saved.total)
        self.result.peak_bytes = max(self.result.peak_bytes, self.held_bytes)
        self.result.peak_held = max(self.result.peak_held, len(self.held))
        return started

    def backward(self, i, k):
        """B of microbatch ``i`` through the rank's chunk ``k``; returns when its compute started."""
        c, m = self.model.model_chunks[k], self.m
        x, y, nbytes = self.held.pop((i, k))
        if c == self.last:  # d(S · step loss)/d(loss_i): the step's loss is the mean of the m microbatch means
            grad = backend.array_module(y.data).full(y.shape, self.scale / m, dtype=y.dtype)
        else:
            grad = comm.recv(self.shape, self.dtype, self.pp, self.neighbour(+1), _match("B", c + 1, i, m),
                             tag=f"pipeline: gradient {i}, chunk {c + 1}->{c}")
        started = time.perf_counter()
        with trace.span(f"B {i}" + (f" (chunk {c})" if len(self.model.chunks) > 1 else ""), "microbatch",
                        microbatch=i, chunk=c):
            y.backward(grad)
            self.held_bytes -= nbytes
            if c > 0:
                self.pending.append(comm.send(x.grad, self.pp, self.neighbour(-1), _match("B", c, i, m),
                                              tag=f"pipeline: gradient {i}, chunk {c}->{c - 1}"))
        return started

    def forget_delivered(self):
        """Forget the sends already delivered (their buffers are released); the others stay pending."""
        self.pending = [send for send in self.pending if not send.done()]
