"""The fused GPU kernels (minitp.kernels) against their numpy definitions, in float32 and float64.

The kernels need a real GPU: without one these comparisons skip, and what runs is the selection -- the
ops choose a kernel only for arrays whose CuPy compiles kernels (on the tests' stand-in, numpy arrays
and with MINITP_KERNELS=0 they run the definitions)."""
import numpy
import pytest

from minitp import backend, kernels, rng
from minitp.autograd import Tensor
from minitp import functional as F
from minitp.nn import AdamW, Parameter

TOLERANCE = {numpy.float32: 2e-5, numpy.float64: 1e-12}  # relative to the largest value compared


def real_gpu():
    reason = backend.gpu_unavailable_reason()
    if reason:
        pytest.skip(reason)
    import cupy
    if not hasattr(cupy, "RawKernel"):
        pytest.skip("the CuPy stand-in: no kernels to compare (the selection is tested below)")
    return cupy


def close(got, expected, dtype):
    got, expected = backend.to_host(got), backend.to_host(expected)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    scale = max(1.0, float(numpy.abs(expected).max()))
    assert float(numpy.abs(got - expected).max()) <= TOLERANCE[dtype] * scale


def both(function, monkeypatch):
    """``function()`` with the kernels, then with the definitions (MINITP_KERNELS=0), on the GPU."""
    monkeypatch.setenv("MINITP_KERNELS", "1")
    fused = function()
    monkeypatch.setenv("MINITP_KERNELS", "0")
    return fused, function()


def data(cupy, shape, dtype, seed, scale=1.0):
    return cupy.asarray((scale * numpy.random.default_rng(seed).standard_normal(shape)).astype(dtype))


DTYPES = [numpy.float32, numpy.float64]


@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_forward_and_backward(dtype, monkeypatch):
    cupy = real_gpu()
    x, g = data(cupy, (7, 3, 130), dtype, 0, 4.0), data(cupy, (7, 3, 130), dtype, 1)

    def run():
        t = Tensor(x, requires_grad=True)
        y = F.gelu(t)
        y.backward(g)
        return y.data, t.grad
    for fused, definition in zip(*both(run, monkeypatch)):
        close(fused, definition, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_gelu_equals_gelu_of_the_sum(dtype):
    cupy = real_gpu()
    from minitp.kernels.elementwise import bias_gelu_backward, bias_gelu_forward
    x, b, g = data(cupy, (5, 64), dtype, 2, 3.0), data(cupy, (64,), dtype, 3), data(cupy, (5, 64), dtype, 4)
    close(bias_gelu_forward(x, b), bias_gelu_forward(x + b), dtype)
    close(bias_gelu_backward(x, g, b), bias_gelu_backward(x + b, g), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [24, 700])  # fewer features than threads, and more
def test_layer_norm_forward_and_backward(dtype, hidden, monkeypatch):
    cupy = real_gpu()
    x, g = data(cupy, (6, 2, hidden), dtype, 5, 3.0), data(cupy, (6, 2, hidden), dtype, 6)
    w, b = data(cupy, (hidden,), dtype, 7), data(cupy, (hidden,), dtype, 8)

    def run():
        leaves = [Tensor(a, requires_grad=True) for a in (x, w, b)]
        y = F.layer_norm(*leaves)
        y.backward(g)
        return [y.data] + [leaf.grad for leaf in leaves]
    for fused, definition in zip(*both(run, monkeypatch)):
        close(fused, definition, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("keys", [5, 600])
def test_softmax_forward_and_backward(dtype, keys, monkeypatch):
    cupy = real_gpu()
    x, g = data(cupy, (3, 4, keys), dtype, 9, 5.0), data(cupy, (3, 4, keys), dtype, 10)

    def run():
        t = Tensor(x, requires_grad=True)
        y = F.softmax(t, axis=-1)
        y.backward(g)
        return y.data, t.grad
    for fused, definition in zip(*both(run, monkeypatch)):
        close(fused, definition, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_scaled_causal_softmax_is_the_dense_cores(dtype, monkeypatch):
    """softmax(scale · scores) with the future keys at 0, and its backward, against the definition's
    chain: mul, causal_mask, softmax."""
    cupy = real_gpu()
    from minitp.kernels.rows import softmax_backward, softmax_forward
    scores, g, scale = data(cupy, (2, 3, 9, 9), dtype, 11, 3.0), data(cupy, (2, 3, 9, 9), dtype, 12), 0.125
    monkeypatch.setenv("MINITP_KERNELS", "0")
    t = Tensor(scores, requires_grad=True)
    y = F.softmax(F.causal_mask(F.mul(t, scale)), axis=-1)
    y.backward(g)
    fused = softmax_forward(scores, scale, causal=True)
    close(fused, y.data, dtype)
    close(softmax_backward(fused, g, scale), t.grad, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy(dtype, monkeypatch):
    cupy = real_gpu()
    logits = data(cupy, (5, 3, 1000), dtype, 13, 4.0)
    targets = cupy.asarray(numpy.random.default_rng(14).integers(0, 1000, (5, 3)))

    def run():
        t = Tensor(logits, requires_grad=True)
        loss = F.cross_entropy(t, targets)
        loss.backward()
        return loss.data, t.grad
    for fused, definition in zip(*both(run, monkeypatch)):
        close(fused, definition, dtype)


def test_dropout_mask_is_the_hashs(monkeypatch):
    """The same bits: the mask is a pure function of (seed, counter, global index), exactly."""
    cupy = real_gpu()
    fused, definition = both(lambda: rng.keep_mask((4, 33, 65), 0.3, 7, 2, (8, 33, 65), (4, 0, 0), cupy), monkeypatch)
    assert bool((fused == definition).all()) and 0.2 < float(fused.mean()) < 0.8


@pytest.mark.parametrize("dtype", DTYPES)
def test_adamw_step(dtype, monkeypatch):
    cupy = real_gpu()

    def run():
        param = Parameter(data(cupy, (40, 30), dtype, 15))
        optimizer = AdamW([param], lr=1e-2, weight_decay=0.1)
        for step in range(3):
            param.grad = data(cupy, (40, 30), dtype, 16 + step)
            optimizer.step()
        (state,) = optimizer.state.values()
        return param.data, state["exp_avg"], state["exp_avg_sq"]
    for fused, definition in zip(*both(run, monkeypatch)):
        close(fused, definition, dtype)


# -- the selection, on every machine ---------------------------------------------------------------------

def test_numpy_arrays_run_the_definitions():
    assert not kernels.enabled(numpy.zeros(3))


def test_the_standin_runs_the_definitions(device, monkeypatch):
    """On the CuPy stand-in (no compiler) every op takes its numpy definition, whatever MINITP_KERNELS says;
    on a real GPU MINITP_KERNELS=0 turns the kernels off."""
    x = backend.xp.zeros(3)
    monkeypatch.setenv("MINITP_KERNELS", "0")
    assert not kernels.enabled(x)
    monkeypatch.setenv("MINITP_KERNELS", "1")
    import cupy
    real = device == "gpu" and hasattr(cupy, "RawKernel")
    assert kernels.enabled(x) == real


def test_kernels_take_float32_and_float64_only():
    assert kernels.ctype(numpy.float32) == "float" and kernels.ctype(numpy.float64) == "double"
    with pytest.raises(TypeError, match="float32 or float64"):
        kernels.ctype(numpy.float16)
