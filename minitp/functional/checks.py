"""Is this integer argument usable as ids, targets or indices?

The checks numpy does not make, with messages that name the op and the argument. The serial ops here
and the sharded ones in ``minitp.parallel`` raise the same errors for the same mistakes by calling these.
"""


def check_integer(array, what):
    """``TypeError`` unless ``array`` holds integers (signed or unsigned): ``what`` names it in the
    message, e.g. "embedding ids must be integers, got float32"."""
    if array.dtype.kind not in "iu":
        raise TypeError(f"{what} must be integers, got {array.dtype}")


def check_indices(indices, count, what, size_name):
    """``ValueError`` unless every entry of ``indices`` is in [0, count).

    Checked here because numpy will not: a negative index counts from the end (id -1 silently reads
    the last row), and an index past the end raises an IndexError that names neither the op nor the
    vocabulary. On a GPU, min and max cost one small device-to-host copy each."""
    if indices.size == 0:
        return
    low, high = int(indices.min()), int(indices.max())
    if low < 0 or high >= count:
        raise ValueError(f"{what} range over [{low}, {high}], not within [0, {count - 1}] ({size_name} {count})")
