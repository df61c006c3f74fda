"""Which collectives ran, and how many bytes did each move? The collective log.

Every collective run inside ``with log_collectives() as log:`` appends a ``CollectiveRecord``: the op,
the group, the shape and dtype of the full buffer S (the gathered result of an all-gather, the input of
a reduce-scatter), its payload bytes, the bytes each rank sends in a ring algorithm, and a tag naming
the operator that called it ("f backward"). Outside such a block the log costs one list test.

The open logs live here, in ``_active_logs``, and nowhere else; the collectives (``collectives.py``)
call ``_record`` when it is not empty.
"""
import contextlib
from dataclasses import dataclass

import numpy


@dataclass
class CollectiveRecord:
    """One collective call, as seen by this rank."""
    op: str
    """``"all_reduce"``, ``"all_gather"``, ``"reduce_scatter"``, ``"broadcast"``; ``"sendrecv"`` or
    ``"all_to_all"`` (context parallelism, ``exchange.py``); point-to-point ``"send"`` / ``"recv"``
    (pipelines, ``p2p.py``)"""
    group: str
    """the group's name: ``"world"``, ``"tp"``, ``"dp"``"""
    group_size: int
    shape: tuple
    """the shape of the full buffer S: the input of an all-reduce, reduce-scatter or broadcast; the
    gathered output of an all-gather"""
    dtype: str
    payload_bytes: int
    """S in bytes"""
    ring_bytes: float
    """bytes this rank sends in a ring algorithm: 2(n-1)/n·S for all-reduce, (n-1)/n·S for the others;
    exactly S for a sendrecv, (n-1)/n·S for an all-to-all, S for a send, 0 for a receive"""
    tag: str
    """which operator called it, e.g. ``"f backward"``"""
    blocking: bool = True
    """False for a non-blocking collective (``comm.iall_reduce``...), logged when it starts"""


class CollectiveLog:
    """The collectives recorded inside one ``log_collectives()`` block, in call order (list-like)."""

    def __init__(self):
        self.records = []

    def __len__(self):
        return len(self.records)

    def __iter__(self):
        return iter(self.records)

    def __getitem__(self, index):
        return self.records[index]

    def select(self, op=None, tag=None):
        """The records of collective ``op`` (any if ``None``) whose tag contains ``tag``."""
        return [r for r in self.records if (op is None or r.op == op) and (tag is None or tag in r.tag)]

    def count(self, op=None, tag=None):
        return len(self.select(op, tag))

    def total_payload_bytes(self, op=None, tag=None):
        return sum(r.payload_bytes for r in self.select(op, tag))

    def total_ring_bytes(self, op=None, tag=None):
        return sum(r.ring_bytes for r in self.select(op, tag))

    def table(self):
        """An aligned table, one collective per line, with the totals underneath."""
        header = ("#", "op", "group", "n", "shape", "dtype", "payload B", "ring B/rank", "tag")
        rows = [(str(i), r.op, r.group, str(r.group_size), "×".join(map(str, r.shape)) or "scalar", r.dtype,
                 f"{r.payload_bytes:,}", _bytes(r.ring_bytes), r.tag) for i, r in enumerate(self.records)]
        rows.append(("", "total", "", "", "", "", f"{self.total_payload_bytes():,}",
                     _bytes(self.total_ring_bytes()), f"{len(self.records)} collective{'' if len(self.records) == 1 else 's'}"))
        widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
        numeric = {0, 3, 6, 7}  # right-aligned columns

        def line(row):
            return "  ".join(cell.rjust(w) if i in numeric else cell.ljust(w)
                             for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
        return "\n".join([line(header)] + [line(row) for row in rows])

    def __str__(self):
        return self.table()


def _bytes(value):
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.1f}"


_active_logs = []


@contextlib.contextmanager
def log_collectives():
    """Record every collective run inside the block::

        with comm.log_collectives() as log:
            y = layer(x)
        assert log.count("all_reduce") == 1

    Blocks may nest: each log sees the collectives run while it is open.
    """
    log = CollectiveLog()
    _active_logs.append(log)
    try:
        yield log
    finally:
        _active_logs.remove(log)


def _record(op, group, shape, dtype, payload_bytes, ring_bytes, tag, blocking=True):
    record = CollectiveRecord(op, group.name, group.size, tuple(shape), str(numpy.dtype(dtype)),
                              int(payload_bytes), ring_bytes, tag, blocking)
    for log in _active_logs:
        log.records.append(record)
