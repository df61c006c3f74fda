"""Every differentiable op, each a ``Function`` with its forward and backward side by side.

Ops take Tensors (Python numbers are accepted where a tensor operand makes sense) and return Tensors.
Inside ``forward``/``backward`` everything is a raw array and ``xp`` is the array's own module (numpy or
CuPy), so one code path serves both backends. Shapes in comments follow the paper: s sequence,
b batch, h hidden, a heads, d = h/a head size.

One file per family of ops; every name is used from here, ``from minitp import functional as F``:
    elementwise     add, sub, mul, div, neg, pow, exp, log, tanh
    matrix_product  matmul, linear (x @ W + b in one op)
    reductions      sum, mean, max
    shape           reshape, transpose, getitem, split, cat, stack
    activations     gelu, softmax, log_softmax
    normalization   layer_norm
    masks           dropout, causal_mask
    embeddings      embedding
    loss            cross_entropy, reduce_loss, reduce_loss_backward
    attention       attention_core: softmax(q kᵀ/√d) v, the attention that holds no weights (dense);
                    attention: it or blockwise_attention, whichever is faster here
    blockwise_attention   the same, block by block with the online softmax (``online_softmax``: one
                    block, the merge, a block's backward -- shared with ring attention)
and the helpers they share: operands (constants as tensors, ``unbroadcast``), checks (integer ids and
targets, index ranges). These files import autograd, backend and rng, and each other, never above.
"""
from minitp.functional.attention import attention, attention_core
from minitp.functional.blockwise_attention import BlockwiseAttention, blockwise_attention
from minitp.functional.activations import GeLU, LogSoftmax, Softmax, gelu, log_softmax, softmax
from minitp.functional.checks import check_indices, check_integer
from minitp.functional.elementwise import (Add, Div, Exp, Log, Mul, Neg, Pow, Sub, Tanh, add, div, exp, log, mul,
                                           neg, pow, sub, tanh)
from minitp.functional.embeddings import Embedding, embedding
from minitp.functional.loss import CrossEntropy, cross_entropy, reduce_loss, reduce_loss_backward
from minitp.functional.masks import CausalMask, Dropout, causal_mask, dropout
from minitp.functional.matrix_product import Linear, MatMul, linear, matmul
from minitp.functional.normalization import LayerNorm, layer_norm
from minitp.functional.operands import unbroadcast
from minitp.functional.reductions import Max, Mean, Sum, max, mean, sum
from minitp.functional.shape import (Cat, GetItem, Reshape, Stack, Transpose, cat, getitem, reshape, split, stack,
                                     transpose)

__all__ = [
    "Add", "BlockwiseAttention", "Cat", "CausalMask", "CrossEntropy", "Div", "Dropout", "Embedding", "Exp", "GeLU",
    "GetItem", "LayerNorm", "Linear", "Log", "LogSoftmax", "MatMul", "Max", "Mean", "Mul", "Neg", "Pow", "Reshape",
    "Softmax", "Stack", "Sub", "Sum", "Tanh", "Transpose",
    "add", "attention", "attention_core", "blockwise_attention", "cat", "causal_mask", "check_indices",
    "check_integer", "cross_entropy", "div", "dropout", "embedding", "exp", "gelu", "getitem", "layer_norm", "linear", "log",
    "log_softmax", "matmul", "max", "mean", "mul", "neg", "pow", "reduce_loss", "reduce_loss_backward", "reshape",
    "softmax", "split", "stack", "sub", "sum", "tanh", "transpose", "unbroadcast",
]
