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
        xp.add.at(grad_weight, ids.reshape(-1), grad.reshape(-1, hidden))
        return grad_weight


def embedding(ids, weight):
    """Look up rows of ``weight`` (vocab, h) for integer ``ids`` of any shape: (*ids.shape, h)."""
    ids = backend.array_module(weight.data).asarray(raw_array(ids))
    check_integer(ids, "embedding ids")
    check_indices(ids, weight.shape[0], "embedding ids", "vocabulary size")
    return Embedding.apply(weight, ids=ids)
