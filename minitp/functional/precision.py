"""How is a matrix product of 2-byte floats (float16, bfloat16) computed, and how accurate is it?

**The rule.** A product whose operands are both float16 or both bfloat16, on numpy, is computed as

    (a.astype(float32) @ b.astype(float32)).astype(a.dtype)

-- what a GPU's tensor cores do: the inputs are exactly the rounded low-precision numbers (widening is
exact: every fp16 and bf16 is an fp32), the products and their sums are accumulated in fp32, and each
output element is rounded to the low precision ONCE, at the end. That is the definition the tests check
bit for bit. numpy alone would do otherwise: fp16 @ fp16 runs without BLAS (~100x slower than fp32: 70 ms
against a few for 64x4096 @ 4096x64 here; it sums in float, in its own order, so 0.4% of its elements
differ from the once-rounded fp32 sum in the last bit); ml_dtypes' bfloat16 @ bfloat16 returns float32,
and the model would silently leave bf16 after its first layer.

**Error bound.** For C = A B with inner dimension k, each element satisfies

    |C_computed - C| <= u·|C| + k·2^-24·(|A||B|)  (to first order), so at most ~ (u + k·2^-24)·(|A||B|)

with u the unit roundoff of the output: 2^-8 for bfloat16 (8 significant bits), 2^-11 for float16 (11),
and k·2^-24 fp32's worst-case accumulation error (far smaller than u for any k below ~2^16 / 2^13). One
rounding per output element is the best a 2-byte result can be; accumulating in the low dtype instead
(rounding after every addition) would give up to k·u.

**Where.** Every matrix product of the framework goes through ``product`` -- ``MatMul``/``Linear``
(forward and both gradients), the attention core, the online softmax of blockwise and ring attention, the
tensor-parallel linears -- so a 2-byte model keeps its dtype, and float32/float64 products run exactly as
before (one test of the item size, then ``a @ b``: no copy). On CuPy, float16 runs natively (cuBLAS
accumulates fp16 GEMMs in fp32 on tensor cores); CuPy has no bfloat16, which ``backend.check_dtype``
refuses when a model's parameters are made.

**Sums.** ``total`` and ``average`` are the same rule for a reduction (softmax's and LayerNorm's sums,
the loss's mean, a bias gradient): accumulated in fp32, rounded once -- as GPU kernels (and PyTorch's
reductions of bf16) do.

**Elementwise math.** The same rule, for the ops between the products: GeLU (forward and backward),
softmax and log-softmax, LayerNorm (forward and backward), dropout, on 2-byte floats on numpy, widen
their inputs to fp32 once (a block at a time where the op walks blocks, ``minitp.blocks``, so the extra
memory stays a block), compute in fp32, and round each output (and each array they save) to the dtype
ONCE. Their backward is likewise the fp32 formula on the widened saved arrays and gradient, rounded once.
That is what a GPU does (fp16 math in fp32 registers), one rounding instead of one per operation, and
the definition the tests check bit for bit. It is also the fast way on a CPU: numpy computes float16
ufuncs one element at a time through conversions (3.7 ns per multiplication against 0.07 in fp32), and
ml_dtypes' bfloat16 likewise (1.2 ns), while a cast costs 1.2-1.7 ns (fp16) and 0.3-0.9 ns (bf16) -- GeLU's
backward is a dozen passes. ``compute_dtype`` is the rule's one test: float32 for a 2-byte float on
numpy, the array's own dtype otherwise -- float32, float64 and CuPy run their code as before, no copy.
``Linear`` follows it too: its bias is added to the fp32 product before the product's one rounding
(addmm's epilogue). What stays in the dtype are the single ops, where the rule gives the same bits and
a widening costs more than it saves: +, -, * of two arrays (one rounding either way), the causal mask,
gradient accumulation. A GPT step of benchmarks/precision.py's small model (h=256, 4 layers, s=128, one
thread) went from 5.3x float32's time to ~2.5x in fp16 and from 2.2x to ~1.4x in bf16; the rest is
mostly numpy's float16 casts themselves (no SIMD here), in the products as in the ops.

``finfo`` answers numpy.finfo's question for every float dtype, bfloat16 included (ml_dtypes').
"""
import ml_dtypes
import numpy

BFLOAT16 = numpy.dtype(ml_dtypes.bfloat16)
FLOAT32 = numpy.dtype(numpy.float32)
HALF_DTYPES = (numpy.dtype(numpy.float16), BFLOAT16)
"""The 2-byte floats: a product of two of one of them accumulates in fp32 and is rounded once."""

UNIT_ROUNDOFF = {numpy.dtype(numpy.float16): 2.0 ** -11, BFLOAT16: 2.0 ** -8,
                 numpy.dtype(numpy.float32): 2.0 ** -24, numpy.dtype(numpy.float64): 2.0 ** -53}
"""u: half the distance from 1.0 to the next number, the largest relative error of one rounding."""


def product(a, b):
    """``a @ b`` under the rule above: 2-byte float operands on numpy multiply in fp32 (BLAS), rounded
    once to their dtype; anything else (float32, float64, CuPy's float16) is ``a @ b`` as it is."""
    wide = compute_dtype(a)
    if wide == a.dtype or a.dtype != b.dtype:
        return a @ b
    return numpy.matmul(a.astype(wide), b.astype(wide)).astype(a.dtype)


def total(x, axis=None, keepdims=False):
    """``x.sum(axis)`` under the same rule: 2-byte floats on numpy are summed in fp32 and rounded once.
    numpy adds bfloat16 one element after another in bfloat16 (a custom dtype gets no pairwise sum): once
    the running total is 2^8 times an addend, the addend vanishes -- a softmax over 50k logits, a loss
    averaged over thousands of tokens, a bias gradient summed over every position would stall. float16
    sums along a leading axis (numpy adds row by row) round at every step too: 4096 ones sum to 2048.
    float32/float64: ``x.sum`` as it is."""
    wide = compute_dtype(x)
    if wide == x.dtype:
        return x.sum(axis=axis, keepdims=keepdims)
    return x.sum(axis=axis, dtype=wide, keepdims=keepdims).astype(x.dtype)


def average(x, axis=None, keepdims=False):
    """``x.mean(axis)`` under the rule of ``total``: 2-byte floats on numpy accumulate in fp32, rounded once."""
    wide = compute_dtype(x)
    if wide == x.dtype:
        return x.mean(axis=axis, keepdims=keepdims)
    return x.mean(axis=axis, dtype=wide, keepdims=keepdims).astype(x.dtype)


def compute_dtype(x):
    """The dtype an elementwise op computes ``x``'s math in, under the rule above: float32 for a 2-byte
    float on numpy (the op widens its inputs once, computes, rounds its outputs once to ``x.dtype``);
    ``x.dtype`` itself for anything else (float32, float64, CuPy's float16: the op runs as it is)."""
    if x.dtype.itemsize != 2 or type(x) is not numpy.ndarray or x.dtype not in HALF_DTYPES:
        return x.dtype  # float32/float64, CuPy: the common case, tested first
    return FLOAT32


def finfo(dtype):
    """``numpy.finfo`` of ``dtype``, bfloat16 included (``ml_dtypes.finfo``, which numpy's may not know)."""
    dtype = numpy.dtype(dtype)
    return ml_dtypes.finfo(dtype) if dtype == BFLOAT16 else numpy.finfo(dtype)
