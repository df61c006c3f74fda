"""What is LayerNorm's closed-form backward, and why does it keep only x_hat and 1/std?"""
from minitp import backend
from minitp.autograd import Function


class LayerNorm(Function):
    """y = x_hat * weight + bias, x_hat = (x - mean) / sqrt(var + eps), over the last axis (hidden).

    One fused op with a closed-form backward rather than a chain of small ops, which would save
    several input-sized intermediates. It saves x_hat (input-sized: the paper's 2sbh per LayerNorm) and
    the per-row 1/std (and the weight, a parameter), nothing else.

    Backward, per row of h entries, with d = g * weight (the gradient reaching x_hat):
        dx = (1/std) * (d - mean(d) - x_hat * mean(d * x_hat))
    (mean(d) comes through the mean, mean(d * x_hat) through the variance), and
        dweight = sum over rows of g * x_hat,    dbias = sum over rows of g.
    Rows are independent (each token normalises alone), which is why sequence parallelism can shard
    LayerNorm along s with no communication in forward; only dweight and dbias need summing over ranks.
    """

    def forward(self, x, weight, bias, eps=1e-5):
        xp = backend.array_module(x)
        mean_ = x.mean(axis=-1, keepdims=True)
        centred = x - mean_
        rstd = 1 / xp.sqrt((centred * centred).mean(axis=-1, keepdims=True) + eps)  # (..., 1)
        x_hat = centred
        x_hat *= rstd  # in place: centred is not needed again
        self.save_for_backward(x_hat, rstd, weight)
        return x_hat * weight + bias

    def backward(self, grad):
        x_hat, rstd, weight = self.saved
        hidden = x_hat.shape[-1]
        grad_x = grad_weight = grad_bias = None
        if self.needs_input_grad[0]:
            d = grad * weight
            grad_x = rstd * (d - d.mean(axis=-1, keepdims=True)
                             - x_hat * (d * x_hat).mean(axis=-1, keepdims=True))
        rows = grad.reshape(-1, hidden)
        if self.needs_input_grad[1]:
            grad_weight = (rows * x_hat.reshape(-1, hidden)).sum(axis=0)
        if self.needs_input_grad[2]:
            grad_bias = rows.sum(axis=0)
        return grad_x, grad_weight, grad_bias


def layer_norm(x, weight, bias, eps=1e-5):
    """LayerNorm over the last axis; ``weight`` and ``bias`` have shape (h,)."""
    return LayerNorm.apply(x, weight, bias, eps=eps)
