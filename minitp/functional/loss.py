"""What is softmax cross-entropy's loss and gradient, and how are per-token losses reduced ("mean",
"sum", "none")? ``reduce_loss`` and its backward are shared with the vocabulary-parallel loss."""
from minitp import backend, kernels
from minitp.autograd import Function
from minitp.functional.checks import check_indices, check_integer
from minitp.functional.operands import raw_array
from minitp.functional.precision import average, total


class CrossEntropy(Function):
    """loss = -log softmax(logits)[target] = logsumexp(logits) - logits[target], per position.

    logits (..., v) and integer targets (...); reduced by "mean" (over positions), "sum" or "none".
    logsumexp is computed as m + log sum exp(logits - m), m the row max, so nothing overflows.

    Backward: d loss / d logits = softmax(logits) - onehot(target), times the incoming gradient (and
    1/N for the mean). Saves the softmax (logits-sized) and the targets.
    """

    def forward(self, logits, targets, reduction="mean"):
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', not {reduction!r}")
        if targets.shape != logits.shape[:-1]:
            raise ValueError(f"targets of shape {targets.shape} for logits of shape {logits.shape}")
        xp = backend.array_module(logits)
        self.reduction = reduction
        if kernels.enabled(logits):  # on a GPU: the formulas below, one pass per row (minitp.kernels)
            from minitp.kernels.rows import cross_entropy_forward
            losses, probs = cross_entropy_forward(logits, targets)
            if self.needs_input_grad[0]:
                self.save_for_backward(probs, targets)
            return reduce_loss(losses, reduction)
        shifted = logits - logits.max(axis=-1, keepdims=True)
        target_logit = xp.take_along_axis(shifted, targets[..., None], axis=-1)
        exps = xp.exp(shifted, out=shifted)  # in place: the (s, b, v) logits are a GPT step's largest array
        sum_exps = total(exps, axis=-1, keepdims=True)
        losses = (xp.log(sum_exps) - target_logit)[..., 0]
        if self.needs_input_grad[0]:
            exps /= sum_exps  # now the softmax
            self.save_for_backward(exps, targets)
        return reduce_loss(losses, reduction)

    def backward(self, grad):
        probs, targets = self.saved
        xp = backend.array_module(probs)
        vocab = probs.shape[-1]
        # softmax - onehot, written into the saved softmax: the graph is walked once and the engine
        # drops saved arrays after backward, so this saves a logits-sized allocation.
        grad_logits = probs.reshape(-1, vocab)
        grad_logits[xp.arange(grad_logits.shape[0]), targets.reshape(-1)] -= 1
        return reduce_loss_backward(grad_logits.reshape(probs.shape), grad, self.reduction)


def reduce_loss(losses, reduction):
    """Per-token ``losses`` (...) -> their "mean", their "sum", or themselves ("none")."""
    if reduction == "none":
        return losses
    return total(losses) if reduction == "sum" else average(losses)


def reduce_loss_backward(grad_logits, grad, reduction):
    """The backward of ``reduce_loss`` applied to per-token logit gradients (..., v): each token's row
    times its own upstream gradient ("none"), the one upstream gradient ("sum"), or that over the
    number of tokens ("mean"). Scaled in place: both callers pass the saved softmax they have already
    turned into ``grad_logits`` (the engine drops it after backward), a logits-sized array fewer."""
    if reduction == "none":
        grad_logits *= grad[..., None]
    else:
        tokens = grad_logits.size // grad_logits.shape[-1]
        grad_logits *= grad / tokens if reduction == "mean" else grad
    return grad_logits


def cross_entropy(logits, targets, reduction="mean"):
    """Softmax cross-entropy of ``logits`` (..., v) against integer ``targets`` (...)."""
    targets = backend.array_module(logits.data).asarray(raw_array(targets))
    check_integer(targets, "cross_entropy targets")
    check_indices(targets, logits.shape[-1], "cross_entropy targets", "classes in the logits:")
    return CrossEntropy.apply(logits, targets=targets, reduction=reduction)
