"""What does an embedding lookup save, and how does its scatter-add backward reach the table's rows?"""
from minitp import backend
from minitp.autograd import Function
from minitp.functional.checks import check_indices, check_integer
from minitp.functional.operands import raw_array


class Embedding(Function):
    """out[..., :] = weight[ids[...], :]: (*ids.shape,) ids and a (vocab, h) table give (*ids.shape, h).

    Backward: row v of dweight is the sum of the output gradients at every position whose id is v (a
    scatter-add, since an id may repeat). Saves only the ids.
    """

    def forward(self, weight, ids):
        xp = backend.array_module(weight)
        self.save_for_backward(ids)
        self.weight_shape = weight.shape
        return xp.take(weight, ids, axis=0)

    def backward(self, grad):
        (ids,) = self.saved
        xp = backend.array_module(grad)
        hidden = self.weight_shape[-1]
        grad_weight = xp.zeros(self.weight_shape, dtype=grad.dtype)
        add_rows(grad_weight, ids.reshape(-1), grad.reshape(-1, hidden), xp)
        return grad_weight


def add_rows(table, rows, values, xp):
    """``table[rows[i]] += values[i]`` for every i, a repeated row receiving the sum: ``table`` (v, h)
    contiguous, ``rows`` (n,) integers, ``values`` (n, h). The scatter-add of embedding backwards.

    One ``add.at`` over flat element indices, not over rows: numpy's ``add.at`` is fast for 1-D operands
    only (512 rows of 256 into a (4096, 256) table: 3.0 ms by rows, 0.6 ms flat). It makes the same
    additions in the same order, so the same values.
    """
    hidden = table.shape[-1]
    flat = (rows.reshape(-1, 1) * hidden + xp.arange(hidden)).reshape(-1)  # row r, column j: r * h + j
    xp.add.at(table.reshape(-1), flat, values.reshape(-1))


def embedding(ids, weight):
    """Look up rows of ``weight`` (vocab, h) for integer ``ids`` of any shape: (*ids.shape, h)."""
    ids = backend.array_module(weight.data).asarray(raw_array(ids))
    check_integer(ids, "embedding ids")
    check_indices(ids, weight.shape[0], "embedding ids", "vocabulary size")
    return Embedding.apply(weight, ids=ids)
