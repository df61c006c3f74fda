"""The attention core, softmax(q kᵀ/√d) v, on per-head tensors: the part of attention that holds no
weights, and so the part that the parallelisms replace -- a tensor-parallel rank runs it on its heads as
it is, ring attention and Ulysses (``minitp.parallel.context``) run it across the sequence's ranks.

Shapes: b batch, a heads, s sequence, d = h / a the head size.
"""
from minitp.functional.activations import softmax
from minitp.functional.elementwise import mul
from minitp.functional.masks import causal_mask
from minitp.functional.matrix_product import matmul
from minitp.functional.shape import transpose


def attention_core(q, k, v, causal, dropout):
    """softmax(q k^T / sqrt(d)) v for q, k, v of shape (b, a, s, d) -> (b, a, s, d).

    ``dropout`` (a ``Dropout`` module, or None) drops attention probabilities; on a head-parallel rank
    its ``splits`` place the rank's a heads among all the model's, so it draws exactly its slice of the
    serial model's (b, heads, s, s) mask.
    """
    head_dim = q.shape[-1]
    # scale q (s*d numbers) rather than the scores (s*s per head): the same product, less work
    # (b, a, s, d) @ (b, a, d, s) = (b, a, s, s): row i holds query i's score against every key
    scores = matmul(mul(q, head_dim ** -0.5), transpose(k, (0, 1, 3, 2)))
    if causal:
        scores = causal_mask(scores)  # query i may not attend to keys j > i: their scores become -inf
    probs = softmax(scores, axis=-1)  # over the keys
    if dropout is not None:
        probs = dropout(probs)
    return matmul(probs, v)  # (b, a, s, s) @ (b, a, s, d) = (b, a, s, d)
