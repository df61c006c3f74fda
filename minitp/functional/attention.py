"""The attention core, softmax(q kᵀ/√d) v, on per-head tensors: the part of attention that holds no
weights, and so the part that the parallelisms replace -- a tensor-parallel rank runs it on its heads as
it is, ring attention and Ulysses (``minitp.parallel.context``) run it across the sequence's ranks.

Two ways to compute it, the same numbers to rounding:

- ``attention_core`` (dense, the readable definition): the (b, a, s, s) scores, softmax, dropout and the
  product with v as ops of the engine, each keeping its (s, s) arrays for backward: O(s²·b·a) bytes;
- ``blockwise_attention`` (FlashAttention's algorithm): block by block with the online softmax, keeping
  q, k, v, the output and one log-sum-exp per row: O(s·b·h) bytes, the causal blocks above the diagonal
  skipped, the probabilities recomputed in backward.

``attention`` picks one: ``kind="dense"`` or ``"blockwise"``, or by default (``kind=None``) the faster
one measured here (``default_kind``). ``MINITP_ATTENTION=dense|blockwise`` overrides the default for a
whole run (the memory benchmark measures the paper's dense model that way).

Shapes: b batch, a heads, s sequence, d = h / a the head size.
"""
import os

from minitp import backend
from minitp.functional.activations import softmax
from minitp.functional.blockwise_attention import BLOCK, blockwise_attention
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


KINDS = ("dense", "blockwise")


def default_kind(seq, causal, xp):
    """The faster core for ``seq`` positions (benchmarks/attention.py, one CPU thread, float32, fwd + bwd):

    - numpy, causal, s > BLOCK (two blocks or more): blockwise. Skipping the blocks above the diagonal
      halves the score GEMMs and exps, which pays for recomputing the probabilities in backward: 0.84×
      the dense time at s = 256, 0.62× at 512, 0.56× at 2048 (b·a = 32 and 8, d = 64). At s ≤ BLOCK
      there is one block, nothing to skip: 1.06× at s = 128, 1.15× at 64 -- dense.
    - not causal: nothing to skip -- dense.
    - CuPy: dense until measured on a GPU (each block is a dozen kernel launches; benchmarks/gpu_check.sh
      times both).

    ``MINITP_ATTENTION`` (dense or blockwise), when set, wins."""
    forced = os.environ.get("MINITP_ATTENTION")
    if forced:
        if forced not in KINDS:
            raise ValueError(f"MINITP_ATTENTION must be one of {KINDS}, not {forced!r}")
        return forced
    return "blockwise" if causal and seq > BLOCK and xp.__name__ == "numpy" else "dense"


def attention(q, k, v, causal, dropout, kind=None):
    """softmax(q k^T / sqrt(d)) v for q, k, v of shape (b, a, s, d), by the dense core or blockwise
    (``kind``; None: ``default_kind``). ``dropout``: the attention ``Dropout`` module, or None."""
    kind = kind or default_kind(q.shape[-2], causal, backend.array_module(q.data))
    if kind == "dense":
        return attention_core(q, k, v, causal, dropout)
    if kind != "blockwise":
        raise ValueError(f"attention kind must be one of {KINDS}, not {kind!r}")
    batch, heads, seq, _ = q.shape
    keep = None if dropout is None else dropout.block_drawer((batch, heads, seq, seq), q.dtype,
                                                             backend.array_module(q.data))
    return blockwise_attention(q, k, v, causal, keep)
