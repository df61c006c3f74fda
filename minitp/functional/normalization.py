"""What is LayerNorm's closed-form backward, and why does it keep only x_hat and 1/std?"""
from minitp import backend, kernels
from minitp.autograd import Function
from minitp.functional.precision import average, compute_dtype, total


class LayerNorm(Function):
    """y = x_hat * weight + bias, x_hat = (x - mean) / sqrt(var + eps), over the last axis (hidden).

    One fused op with a closed-form backward rather than a chain of small ops, which would save
    several input-sized intermediates. It saves x_hat (input-sized: the paper's 2sbh per LayerNorm) and
    the per-row 1/std (and the weight, a parameter), nothing else.

    Backward, per row of h entries, with d = g * weight (the gradient reaching x_hat):
        dx = (1/std) * (d - mean(d) - x_hat * mean(d * x_hat))
    (mean(d) comes through the mean, mean(d * x_hat) through the variance), and
        dweight = sum over rows of g * x_hat,    dbias = sum over rows of g.
    Each direction writes into its fresh outputs in place (one scratch array in backward), with the
    operations of the formulas in their order.
    Rows are independent (each token normalises alone), which is why sequence parallelism can shard
    LayerNorm along s with no communication in forward; only dweight and dbias need summing over ranks.

    A 2-byte float on numpy is computed in fp32 (``precision.compute_dtype``): x, weight and bias (in
    backward the gradient, x_hat, 1/std and the weight) widened once, the formulas in fp32, each output
    and each saved array rounded once to the dtype (so the saved bytes stay 2sbh).
    """

    def forward(self, x, weight, bias, eps=1e-5):
        xp = backend.array_module(x)
        if kernels.enabled(x):  # on a GPU: the formulas below, one pass per row (minitp.kernels)
            from minitp.kernels.rows import layer_norm_forward
            y, x_hat, rstd = layer_norm_forward(x, weight, bias, eps)
            self.save_for_backward(x_hat, rstd, weight)
            return y
        dtype, wide, saved_weight = x.dtype, compute_dtype(x), weight
        if wide != dtype:  # 2-byte floats on numpy: computed in fp32, rounded once below
            x, weight, bias = x.astype(wide), weight.astype(wide), bias.astype(wide)
        x_hat = x - average(x, axis=-1, keepdims=True)  # centred, normalised in place below
        y = x_hat * x_hat  # the squares, in the array that becomes the output
        rstd = 1 / xp.sqrt(average(y, axis=-1, keepdims=True) + eps)  # (..., 1)
        x_hat *= rstd
        xp.multiply(x_hat, weight, out=y)
        y += bias
        if wide != dtype:
            y, x_hat, rstd = y.astype(dtype), x_hat.astype(dtype), rstd.astype(dtype)
        self.save_for_backward(x_hat, rstd, saved_weight)
        return y

    def backward(self, grad):
        x_hat, rstd, weight = self.saved
        xp = backend.array_module(x_hat)
        hidden = x_hat.shape[-1]
        grad_x = grad_weight = grad_bias = None
        dtype, weight_dtype, wide = grad.dtype, weight.dtype, compute_dtype(grad)
        if wide != dtype:  # 2-byte floats on numpy: computed in fp32, each gradient rounded once below
            grad, x_hat, rstd, weight = (a.astype(wide) for a in (grad, x_hat, rstd, weight))
        product = grad * x_hat  # scratch for the two products with x_hat below
        rows, product_rows = grad.reshape(-1, hidden), product.reshape(-1, hidden)
        if self.needs_input_grad[2]:
            grad_bias = total(rows, axis=0)
        if self.needs_input_grad[1]:
            grad_weight = total(product_rows, axis=0)
        if self.needs_input_grad[0] and kernels.enabled(grad):
            from minitp.kernels.rows import layer_norm_backward
            grad_x = layer_norm_backward(grad, x_hat, rstd, weight)
        elif self.needs_input_grad[0]:
            grad_x = grad * weight  # d, the gradient reaching x_hat; grad_x in place from here
            xp.multiply(grad_x, x_hat, out=product)
            mean_d_x_hat = average(product, axis=-1, keepdims=True)
            grad_x -= average(grad_x, axis=-1, keepdims=True)
            xp.multiply(x_hat, mean_d_x_hat, out=product)
            grad_x -= product
            grad_x *= rstd
        if wide != dtype:
            grad_x, grad_weight, grad_bias = (None if g is None else g.astype(d) for g, d in
                                              ((grad_x, dtype), (grad_weight, weight_dtype), (grad_bias, weight_dtype)))
        return grad_x, grad_weight, grad_bias


def layer_norm(x, weight, bias, eps=1e-5):
    """LayerNorm over the last axis; ``weight`` and ``bias`` have shape (h,)."""
    return LayerNorm.apply(x, weight, bias, eps=eps)
