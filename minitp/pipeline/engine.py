"""How does a stage run its plan? Receive, compute, send, free -- one action at a time.

For each action of this rank's plan (``schedules.py``), model chunk c = k·p + r being the rank's chunk k:

    F(i, k)  input   model chunk 0 reads microbatch i of the ids; any other receives chunk c-1's output
                     from stage (r-1) mod p: (s, b/m, h), or (s/t, b/m, h) under sequence parallelism --
                     a shape both sides compute from the configuration. It becomes a fresh leaf that
                     requires grad: the graph stops at the stage boundary, each stage's backward is its own.
             compute the chunk, inside ``microbatch(chunk, i, m)`` so that its dropouts draw block i of
                     the step's masks; the last model chunk adds the loss of microbatch i.
             output  sent to stage (r+1) mod p, then its data is freed (Megatron's
                     ``deallocate_output_tensor``): backward needs the graph that made the output, not
                     the output's values, so the Tensor keeps only its shape (a zero-stride view of one
                     number) and the s·b·h activation is gone as soon as the send completes.
    B(i, k)  input   the last model chunk starts from d(step loss)/d(loss_i) = 1/m (the step's loss is
                     the mean of the m microbatch means); any other receives the gradient of its output
                     from stage (r+1) mod p.
             compute backward through the chunk; parameter gradients add up in ``.grad`` over the m
                     microbatches.
             output  the gradient of the input, sent to stage (r-1) mod p.

Sends are non-blocking and receives wait (``minitp.dist.p2p``: why that cannot deadlock); each message's
tag names (kind, sending chunk, microbatch), so it meets exactly its receive.

**Activations held.** Each forward runs under ``track_saved``: the bytes its ops keep for backward
(the received input included: the first op keeps it) are held from that F until its B. ``StageRun``
reports the peak over the step, in bytes and in microbatch-chunks: m on every stage for AFAB,
min(p - r, m) on stage r for 1F1B (``schedules.expected_in_flight``).
"""
import time
from dataclasses import dataclass, field

import numpy

from minitp import backend, dist
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


def activation_shape(model, microbatch_columns):
    """What crosses a stage boundary: (s, b/m, h), or (s/t, b/m, h) under sequence parallelism."""
    config, mesh = model.config, model.mesh
    seq = config.seq_len
    if model.sequence_parallel:
        seq = dist.divide(seq, mesh.tp_size, "the sequence length (split over tp by sequence parallelism)")
    return (seq, microbatch_columns, config.hidden)


def _match(kind, chunk, index, microbatches):
    """The MPI tag of the message that ``kind`` ("F": an activation, "B": a gradient) of microbatch
    ``index`` sends from model chunk ``chunk``."""
    return 2 * (chunk * microbatches + index) + (kind == "B")


def _free(tensor):
    """Drop ``tensor``'s values, keep its shape and its place in the graph: a read-only zero-stride view
    of one number stands in for the array (the engine's backward only checks the gradient's shape)."""
    xp = backend.array_module(tensor.data)
    tensor.data = xp.broadcast_to(xp.zeros((), dtype=tensor.data.dtype), tensor.data.shape)


def run(model, actions, ids, targets, microbatches, deallocate=True):
    """Run this rank's ``actions`` on its ``PipelineGPT`` stage ``model`` for the (s, b) ``ids`` and
    ``targets`` of this data-parallel replica, cut into ``microbatches``; returns a ``StageRun``.
    Gradients accumulate into the parameters' ``.grad`` (zero them before). Every rank passes the same
    shapes: a batch that ``microbatches`` does not divide is refused on every rank before any send."""
    m = microbatches
    columns = microbatch_size(ids.shape[1], m, "the batch of a data-parallel replica")
    shape, dtype = activation_shape(model, columns), numpy.dtype(model.config.dtype)
    pp, v = model.mesh.pp, len(model.chunks)
    p, rank, last = pp.size, pp.rank, pp.size * v - 1
    result, held, pending, losses, in_bytes = StageRun(), {}, [], [], 0

    for action in actions:
        i, k = action.microbatch, action.chunk
        chunk, c = model.chunks[k], model.model_chunks[k]
        if action.kind == "F":
            if c == 0:
                x = microbatch_of(ids, i, m)
            else:
                x = Tensor(dist.recv(shape, dtype, pp, (rank - 1) % p, _match("F", c - 1, i, m),
                                     tag=f"pipeline: activation {i}, chunk {c - 1}->{c}"), requires_grad=True)
            started = time.perf_counter()
            with track_saved() as saved, microbatch(chunk, i, m):
                y = chunk.loss(x, microbatch_of(targets, i, m)) if c == last else chunk(x)
            result.rows.append((started, time.perf_counter(), action))
            if c == last:
                losses.append(y.item())
            else:
                pending.append(dist.send(y.data, pp, (rank + 1) % p, _match("F", c, i, m),
                                         tag=f"pipeline: activation {i}, chunk {c}->{c + 1}"))
                if deallocate:
                    result.freed_bytes += y.data.nbytes
                    _free(y)
            held[(i, k)] = (x, y, saved.total)
            result.saved_bytes.append(saved.total)
            in_bytes += saved.total
            result.peak_bytes, result.peak_held = max(result.peak_bytes, in_bytes), max(result.peak_held, len(held))
        else:
            x, y, nbytes = held.pop((i, k))
            if c == last:
                grad = backend.array_module(y.data).full(y.shape, 1.0 / m, dtype=y.dtype)
            else:
                grad = dist.recv(shape, dtype, pp, (rank + 1) % p, _match("B", c + 1, i, m),
                                 tag=f"pipeline: gradient {i}, chunk {c + 1}->{c}")
            started = time.perf_counter()
            y.backward(grad)
            result.rows.append((started, time.perf_counter(), action))
            in_bytes -= nbytes
            if c > 0:
                pending.append(dist.send(x.grad, pp, (rank - 1) % p, _match("B", c, i, m),
                                         tag=f"pipeline: gradient {i}, chunk {c}->{c - 1}"))
        pending = [send for send in pending if not send.done()]  # release buffers already delivered
    dist.wait_all(pending)
    if losses:
        result.loss = sum(losses) / m
    return result
