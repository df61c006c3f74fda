"""How many bytes do the ops in a block keep for backward?

Those are the activations whose memory Korthikanti et al. set out to reduce; the memory benchmark, the
tutorials and the tests read them with ``track_saved``. The engine (``minitp.autograd``) calls ``record``
for every op it puts in the graph while a ``track_saved`` block is open, and does nothing else here.
"""
import contextlib

from minitp import backend

# The SavedBytes of every open track_saved() block. The engine reads it on every op (empty: nothing to
# count), so it is one list, changed in place and never rebound.
open_trackers = []


class SavedBytes:
    """What the ops recorded inside ``track_saved()`` keep for backward.

    Arrays are counted once however many ops save them (two views of one buffer with the same start and
    size are one array), and parameters are left out: they are weights, not activations.
    ``by_op`` splits the total by the op that first saved each array, e.g. ``{"LayerNorm": 4096, ...}``.
    """

    def __init__(self):
        self._arrays = {}  # (address, nbytes) -> (op name, the array, kept alive so the address stays unique)
        self.by_op = {}

    @property
    def total(self):
        return sum(self.by_op.values())

    def add(self, op_name, array):
        key = (backend.data_ptr(array), array.nbytes)
        if key in self._arrays:
            return
        self._arrays[key] = (op_name, array)
        self.by_op[op_name] = self.by_op.get(op_name, 0) + array.nbytes


@contextlib.contextmanager
def track_saved():
    """Count the bytes kept for backward by the ops run inside this block::

        with track_saved() as saved:
            loss = block(x).sum()
        print(saved.total, saved.by_op)
    """
    tracker = SavedBytes()
    open_trackers.append(tracker)
    try:
        yield tracker
    finally:
        open_trackers.remove(tracker)


def record(fn, inputs):
    """Count what ``fn`` (a Function just put in the graph, run on the Tensors ``inputs``) saved, in every
    open block: each array in ``fn.saved`` that is not one of its parameter inputs."""
    parameters = [t.data for t in inputs if t.is_parameter]
    name = getattr(fn, "name", type(fn).__name__)
    for array in fn.saved:
        if array is None or not hasattr(array, "nbytes") or any(array is p for p in parameters):
            continue
        for tracker in open_trackers:
            tracker.add(name, array)
