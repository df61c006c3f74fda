"""Do the ranks agree? Checks that turn a silent wrong answer into one clear error on every rank.

MPI trusts its callers: ranks that pass an all-gather arrays of different shapes read uninitialised
memory, ranks that pass a reduce-scatter different dtypes sum garbage into NaN, and tensor-parallel ranks
fed different token ids compute one loss that belongs to no serial run. Each check here gathers a small
description of what every rank passed (a few dozen bytes, with ``comm.allgather`` on Python objects: not in
the collective log, which records the algorithm's traffic) and, if the ranks disagree, raises the same
``ValueError`` on every rank, saying what each rank passed -- before the real collective runs.

- ``agree(group, what, value)``: the general form; every rank raises or none does.
- **Checked mode** (``set_checked(True)``, ``comm.init(checked=True)`` or ``MINITP_CHECKED=1``): every
  collective (blocking, non-blocking, ``all_to_all``) first checks that the ranks call the same
  collective with the same shape and dtype, and a sequence-parallel layer that every rank feeds the same
  array says so (``not_replicated``). It costs one small allgather per collective -- measured with
  MPICH on 2 ranks of a shared 2-core machine: 7-23 µs per call (quiet to loaded), against 4-11 µs for
  a whole 1 KiB all-gather, 12-51 µs for 64 KiB and 0.55-1.1 ms for 4 MiB: +190-210% at 1 KiB, +44-90%
  at 64 KiB, +2-8% at 4 MiB -- so it is off by default and on in the tests, the tutorials
  and ``train_gpt.py`` (unless ``--unchecked``). Those mistakes cannot be seen locally: a rank's shape
  is right or wrong only next to the other ranks'. What IS known locally is checked always (sizes that
  do not divide, an ``out`` of another shape, a sequence-parallel block longer than seq_len/t, ...).
- Token ids and targets are checked always (``checksum``): it costs one allgather of a few bytes per
  forward, and it catches the classic bug of a per-rank random seed.
"""
import os

import numpy

from minitp import backend

_checked = [os.environ.get("MINITP_CHECKED", "") not in ("", "0")]


def set_checked(enabled=True):
    """Turn checked mode on (or off) for this process."""
    _checked[0] = bool(enabled)


def checked():
    """Whether checked mode is on."""
    return _checked[0]


def agree(group, what, value, describe=repr):
    """``ValueError`` on every rank of ``group`` unless every rank passed an equal ``value`` (a small,
    picklable description: a shape, a dtype, a checksum). ``what`` names the call in the message."""
    if group.size == 1:
        return
    values = group.comm.allgather(value)
    if any(other != values[0] for other in values):
        passed = "; ".join(f"rank {rank} passed {describe(v)}" for rank, v in enumerate(values))
        raise ValueError(f"{what}: the ranks of {group.name} disagree ({passed})")


def agree_on_array(group, op, tag, array, axis=None, call=None):
    """Checked mode's test before a collective: every rank calls the same collective (``call``, default
    ``op``: a non-blocking one passes its own name, since MPI never matches it with its blocking twin)
    with an array of the same shape and dtype (with ``axis``, the same shape except along it, as an
    all-gather of uneven blocks would need)."""
    shape = tuple(array.shape)
    if axis is not None:
        shape = shape[:axis] + ("*",) + shape[axis + 1:]
    agree(group, f"{op}{f' ({tag})' if tag else ''}", (call or op, shape, numpy.dtype(array.dtype).name),
          describe=lambda v: f"{v[0]} of shape {v[1]} {v[2]}")


def checksum(ids):
    """A position-weighted sum of integer ``ids`` (int64 arithmetic, wrapping): equal arrays give equal
    sums, and swapped or changed ids almost surely do not. One pass over the ids, on their device."""
    xp = backend.array_module(ids)
    flat = ids.reshape(-1).astype(xp.int64)
    weights = (xp.arange(flat.size, dtype=xp.int64) * 2654435761) % 2147483647 + 1
    return int(backend.to_host((flat * weights).sum()))


def agree_on_ids(group, what, ids):
    """``ValueError`` on every rank unless every rank of ``group`` passed the same ``ids`` (shape and
    checksum): tensor-parallel ranks must see the same tokens, or their partial results add up to the
    loss of no batch at all."""
    if group.size == 1:
        return
    try:
        agree(group, what, (tuple(ids.shape), numpy.dtype(ids.dtype).name, checksum(ids)),
              describe=lambda v: f"{v[1]} ids of shape {v[0]} with checksum {v[2]}")
    except ValueError as error:
        raise ValueError(f"{error}. Every rank of a tensor-parallel group must be fed the same token ids "
                         "(a per-rank random seed for the data is the usual cause: seed the batches with "
                         "the same number on every rank, e.g. from the step)") from None


def not_replicated(group, what, array):
    """Checked mode's test that ``array`` is a block of a sharded tensor, not a copy of the whole: if every
    rank of ``group`` holds an identical array, raise on every rank. A sequence-parallel layer fed the full
    sequence would otherwise gather t copies of it and compute a result that is right on no rank but
    rank 0's rows. (Identical blocks of a sharded tensor are possible in principle -- constant data -- so
    this lives in checked mode, where tests use random data.)"""
    if group.size == 1 or not checked():
        return
    xp = backend.array_module(array)
    flat = array.reshape(-1).astype(xp.float64)
    signature = (tuple(array.shape), float(backend.to_host((flat * xp.arange(1, flat.size + 1)).sum())))
    signatures = group.comm.allgather(signature)
    if all(other == signatures[0] for other in signatures):
        raise ValueError(f"{what}: every rank of {group.name} passed the same array of shape {signature[0]}, "
                         "but it should be this rank's block of the sequence (s/t tokens): was the full "
                         "sequence fed to a sequence-parallel layer? Cut it first, e.g. with "
                         "scatter_to_sequence_parallel_region")
