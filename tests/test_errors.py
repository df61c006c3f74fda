"""Bad input fails at the op that received it, with a message that names the op, the shapes and dtypes
(or the bad ids): numpy's own errors name neither the op nor its inputs, and some bad inputs numpy does
not reject at all (float32 meeting float64 is promoted, id -1 reads the last row).

Serial tests, run once per backend through the ``device`` fixture. Errors already tested elsewhere are
not repeated here: backward from a non-scalar without a grad (test_autograd), float ids (test_functional).
"""
import re

import numpy
import pytest

from minitp import backend
from minitp import functional as F
from minitp.autograd import Tensor


def make(shape, dtype=numpy.float64):
    return Tensor(backend.xp.asarray(numpy.random.default_rng(0).standard_normal(shape).astype(dtype)),
                  requires_grad=True)


def ids(values):
    return backend.xp.asarray(numpy.array(values, dtype=numpy.int64))


def message(*parts):
    """A regex matching every part, in order, anywhere in the message."""
    return ".*".join(re.escape(part) for part in parts)


# -- shapes that do not fit: numpy's ValueError, named by the op ------------------------------------

@pytest.mark.parametrize("op, left, right", [
    ("MatMul", (2, 3), (4, 5)),  # inner dimensions 3 and 4
    ("Add", (3, 4), (5,)),       # 5 does not broadcast against 4
])
def test_incompatible_shapes_name_the_op_and_both_shapes(device, op, left, right):
    call = {"MatMul": F.matmul, "Add": F.add}[op]
    with pytest.raises(ValueError, match=message(op, str(left), str(right))) as error:
        call(make(left), make(right))
    assert isinstance(error.value.__cause__, ValueError)  # numpy's (or CuPy's) own words, chained


# -- mixed precisions: numpy would promote silently -------------------------------------------------

@pytest.mark.parametrize("op", ["Add", "MatMul", "LayerNorm"])
@pytest.mark.parametrize("first", [numpy.float32, numpy.float64])
def test_mixed_float_dtypes_raise(device, op, first):
    second = numpy.float64 if first is numpy.float32 else numpy.float32
    calls = {
        "Add": lambda: F.add(make((3, 4), first), make((4,), second)),
        "MatMul": lambda: F.matmul(make((3, 4), first), make((4, 5), second)),
        "LayerNorm": lambda: F.layer_norm(make((2, 3, 4), first), make((4,), second), make((4,), second)),
    }
    shapes = {"Add": ((3, 4), (4,)), "MatMul": ((3, 4), (4, 5)), "LayerNorm": ((2, 3, 4), (4,))}[op]
    names = numpy.dtype(first).name, numpy.dtype(second).name
    with pytest.raises(TypeError, match=message(op, f"{names[0]} {shapes[0]}", f"{names[1]} {shapes[1]}")):
        calls[op]()


def test_integer_and_bool_operands_are_not_precisions(device):
    x = make((3, 4), numpy.float32)
    keep = Tensor(backend.xp.asarray(numpy.arange(12).reshape(3, 4) % 3 != 0))  # a bool mask
    masked = x * keep
    assert masked.dtype == numpy.float32
    assert numpy.array_equal(backend.to_host(masked.data), backend.to_host(x.data) * backend.to_host(keep.data))


@pytest.mark.skipif(backend.gpu_unavailable_reason() is not None,
                    reason=f"mixing numpy with CuPy needs a GPU ({backend.gpu_unavailable_reason()})")
def test_numpy_and_cupy_operands_raise():
    previous = backend.device()
    backend.use("gpu")
    try:
        on_gpu = make((3, 4))
    finally:
        backend.use(previous)
    on_cpu = Tensor(numpy.ones((3, 4)))
    with pytest.raises(TypeError, match=message("Add", "cupy (3, 4)", "numpy (3, 4)")):
        on_gpu + on_cpu
    with pytest.raises(TypeError, match=message("MatMul", "numpy (3, 4)", "cupy (4, 3)")):
        on_cpu @ on_gpu.T


# -- ids and targets: numpy would wrap a negative index ---------------------------------------------

@pytest.mark.parametrize("bad, low, high", [
    ([[0, -1], [2, 5]], -1, 5),  # -1 would silently read the last row
    ([[0, 6], [2, 5]], 0, 6),    # the vocabulary size itself is one past the end
])
def test_embedding_ids_outside_the_vocabulary(device, bad, low, high):
    weight = make((6, 4))
    with pytest.raises(ValueError, match=message(f"[{low}, {high}]", "[0, 5]", "vocabulary size 6")):
        F.embedding(ids(bad), weight)


@pytest.mark.parametrize("bad, low, high", [([0, -1, 3], -1, 3), ([0, 5, 3], 0, 5)])
def test_cross_entropy_targets_outside_the_classes(device, bad, low, high):
    logits = make((3, 5))
    with pytest.raises(ValueError, match=message(f"[{low}, {high}]", "[0, 4]", "5")):
        F.cross_entropy(logits, ids(bad))


def test_cross_entropy_targets_must_be_integers(device):
    with pytest.raises(TypeError, match="float64"):
        F.cross_entropy(make((3, 5)), backend.xp.asarray([0.0, 1.0, 2.0]))
