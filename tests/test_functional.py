"""Every op in minitp.functional: its gradient against finite differences (float64), its forward
against a plain numpy formula, and the same op in float32. Dropout's mask is checked to shard exactly.

Serial tests, run once per backend through the ``device`` fixture (the GPU run uses the CuPy stand-in
where there is no GPU).
"""
import math

import numpy
import pytest

from minitp import backend, rng
from minitp import functional as F
from minitp.autograd import Tensor
from minitp.testing import gradcheck, max_error

TOLERANCE = 1e-6  # gradcheck, float64
FLOAT32_TOLERANCE = 1e-4  # float32 against float64 on the same values


def host(tensor_or_array):
    """A numpy array of the values (a numpy array's own .data is a memoryview: test the type)."""
    if isinstance(tensor_or_array, Tensor):
        tensor_or_array = tensor_or_array.data
    return backend.to_host(tensor_or_array)


def make(shape, seed, dtype=numpy.float64, positive=False, requires_grad=True):
    """A Tensor of standard normal values (or values in [0.5, 1.5) for ops that need x > 0)."""
    generator = numpy.random.default_rng(seed)
    values = generator.random(shape) + 0.5 if positive else generator.standard_normal(shape)
    return Tensor(backend.xp.asarray(values.astype(dtype)), requires_grad=requires_grad)


def ids(values):
    return backend.xp.asarray(numpy.array(values))


# Each case: the function under test and its inputs, given as shapes ("+" in front: positive values).
# Shapes have odd sizes, size-1 dimensions and broadcasting.
CASES = {
    "add-broadcast": (F.add, [(3, 1, 5), (4, 1)]),
    "sub-number": (lambda x: F.sub(2.5, x), [(3, 2)]),
    "mul-broadcast": (F.mul, [(1, 3), (5, 1)]),
    "div-broadcast": (F.div, [(3, 5), "+(5,)"]),
    "neg": (F.neg, [(3, 1, 2)]),
    "pow-cube": (lambda x: F.pow(x, 3), [(5, 3)]),
    "pow-sqrt": (lambda x: F.pow(x, 0.5), ["+(3, 5)"]),
    "matmul-weight": (F.matmul, [(3, 2, 5), (5, 3)]),
    "matmul-batched": (F.matmul, [(2, 3, 4), (1, 4, 3)]),
    "linear": (F.linear, [(3, 2, 5), (5, 4), (4,)]),
    "sum-all": (F.sum, [(3, 1, 5)]),
    "sum-axes": (lambda x: F.sum(x, axis=(0, -1)), [(3, 1, 5)]),
    "sum-keepdims": (lambda x: F.sum(x, axis=1, keepdims=True), [(3, 4, 1)]),
    "mean-all": (F.mean, [(3, 5)]),
    "mean-axis": (lambda x: F.mean(x, axis=-2), [(2, 3, 5)]),
    "mean-keepdims": (lambda x: F.mean(x, axis=(0, 2), keepdims=True), [(3, 1, 5)]),
    "max-all": (F.max, [(3, 5)]),
    "max-axis": (lambda x: F.max(x, axis=1), [(3, 5, 2)]),
    "max-keepdims": (lambda x: F.max(x, axis=(0, 2), keepdims=True), [(3, 1, 5)]),
    "reshape": (lambda x: F.reshape(x, (5, -1)), [(3, 1, 5)]),
    "reshape-method": (lambda x: x.reshape(15, 1), [(3, 5)]),
    "transpose-reverse": (F.transpose, [(3, 1, 5)]),
    "transpose-perm": (lambda x: F.transpose(x, (1, 2, 0)), [(3, 2, 5)]),
    "getitem-slices": (lambda x: x[1:, None, ::-2], [(3, 5)]),
    "getitem-int-ellipsis": (lambda x: x[..., 1, :], [(2, 3, 5)]),
    "getitem-int-array": (lambda x: x[[2, 0, 2], 1:], [(3, 5)]),  # row 2 picked twice
    "getitem-tensor-index": (lambda x: x[:, Tensor(ids([[4, 4], [0, 1]]))], [(3, 5)]),
    "split-equal": (lambda x: F.mul(F.split(x, 3, axis=1)[1], 2.0), [(2, 3, 5)]),
    "split-sizes": (lambda x: F.split(x, [1, 0, 4], axis=-1)[2], [(3, 5)]),
    "cat": (lambda a, b, c: F.cat([a, b, c], axis=1), [(3, 1), (3, 2), (3, 4)]),
    "stack": (lambda a, b: F.stack([a, b], axis=-1), [(3, 1, 5), (3, 1, 5)]),
    "exp": (F.exp, [(3, 5)]),
    "log": (F.log, ["+(3, 5)"]),
    "tanh": (F.tanh, [(3, 1, 5)]),
    "gelu-tanh": (F.gelu, [(3, 7)]),
    "gelu-exact": (lambda x: F.gelu(x, approximate="none"), [(3, 7)]),
    "softmax": (F.softmax, [(3, 1, 5)]),
    "softmax-axis0": (lambda x: F.softmax(x, axis=0), [(3, 5)]),
    "log-softmax": (F.log_softmax, [(3, 5)]),
    "log-softmax-axis1": (lambda x: F.log_softmax(x, axis=1), [(2, 3, 1)]),
    "layer-norm": (F.layer_norm, [(3, 2, 5), (5,), (5,)]),
    "layer-norm-batch1": (lambda x, w, b: F.layer_norm(x, w, b, eps=1e-3), [(1, 1, 7), (7,), (7,)]),
    "dropout": (lambda x: F.dropout(x, 0.3, seed=11, counter=2), [(5, 1, 7)]),
    "dropout-shard": (lambda x: F.dropout(x, 0.5, seed=3, counter=0, global_shape=(7, 2, 5),
                                          offset=(2, 0, 1)), [(3, 2, 3)]),
    "causal-softmax": (lambda x: F.softmax(F.causal_mask(x)), [(2, 4, 4)]),
    "causal-softmax-rect": (lambda x: F.softmax(F.causal_mask(x)), [(1, 3, 5)]),
    "embedding": (lambda w: F.embedding(ids([[1, 1], [0, 4], [4, 4]]), w), [(5, 3)]),
    "cross-entropy-mean": (lambda x: F.cross_entropy(x, ids([[1, 0], [4, 4], [2, 2]])), [(3, 2, 5)]),
    "cross-entropy-sum": (lambda x: F.cross_entropy(x, ids([1, 0, 4]), reduction="sum"), [(3, 5)]),
    "cross-entropy-none": (lambda x: F.cross_entropy(x, ids([[3], [0]]), reduction="none"), [(2, 1, 5)]),
}


def inputs_for(specs, dtype=numpy.float64):
    tensors = []
    for seed, spec in enumerate(specs):
        positive = isinstance(spec, str)
        shape = eval(spec[1:]) if positive else spec
        tensors.append(make(shape, seed, dtype, positive))
    return tensors


@pytest.mark.parametrize("case", CASES)
def test_gradcheck(device, case):
    fn, specs = CASES[case]
    result = gradcheck(fn, inputs_for(specs))
    assert result.max_error <= TOLERANCE, str(result)


@pytest.mark.parametrize("case", CASES)
def test_float32_matches_float64(device, case):
    """Each op keeps float32 in float32 (forward and gradients) and agrees with float64."""
    fn, specs = CASES[case]
    runs = {}
    for dtype in (numpy.float32, numpy.float64):
        # the same float32-representable values in both runs
        inputs = [Tensor(t.data.astype(dtype), requires_grad=True) for t in inputs_for(specs, numpy.float32)]
        out = fn(*inputs)
        out.backward(backend.xp.ones(out.shape, dtype=dtype))
        runs[dtype] = out, inputs
    out32, inputs32 = runs[numpy.float32]
    out64, inputs64 = runs[numpy.float64]
    assert out32.dtype == numpy.float32
    assert max_error(out32, out64) <= FLOAT32_TOLERANCE
    for t32, t64 in zip(inputs32, inputs64):
        assert t32.grad.dtype == numpy.float32
        assert max_error(t32.grad, t64.grad) <= FLOAT32_TOLERANCE


# -- forward values against numpy -------------------------------------------------------------------

def test_softmax_forward(device):
    x = make((4, 3, 7), 0, requires_grad=False)
    x.data[0, 0, 0] = 1000.0  # would overflow exp without the max subtracted
    y = host(F.softmax(x))
    assert numpy.all(numpy.isfinite(y))
    assert numpy.abs(y.sum(axis=-1) - 1).max() <= 1e-12
    reference = host(x).copy()
    reference[0, 0, 0] = 0.0  # the row with 1000 is one-hot at it; check the other rows by formula
    expected = numpy.exp(reference) / numpy.exp(reference).sum(axis=-1, keepdims=True)
    assert max_error(y[1:], expected[1:]) <= 1e-12
    assert max_error(y[0, 0], numpy.eye(7)[0]) <= 1e-12


def test_log_softmax_forward(device):
    x = make((3, 1, 6), 1, requires_grad=False)
    values = host(x)
    expected = numpy.log(numpy.exp(values) / numpy.exp(values).sum(axis=1, keepdims=True))
    assert max_error(F.log_softmax(x, axis=1), expected) <= 1e-12
    assert max_error(F.exp(F.log_softmax(x)), F.softmax(x)) <= 1e-12


def test_layer_norm_forward(device):
    x = make((5, 2, 9), 0, requires_grad=False)
    x.data *= 3.0
    x.data += 4.0
    ones, zeros = Tensor(backend.xp.ones(9)), Tensor(backend.xp.zeros(9))
    normalised = host(F.layer_norm(x, ones, zeros, eps=0.0))
    assert numpy.abs(normalised.mean(axis=-1)).max() <= 1e-12
    assert numpy.abs(normalised.var(axis=-1) - 1).max() <= 1e-12

    weight, bias = make((9,), 1, requires_grad=False), make((9,), 2, requires_grad=False)
    values = host(x)
    expected = ((values - values.mean(axis=-1, keepdims=True)) / numpy.sqrt(values.var(axis=-1, keepdims=True) + 1e-5)
                * host(weight) + host(bias))
    assert max_error(F.layer_norm(x, weight, bias), expected) <= 1e-12


def test_gelu_forward(device):
    x = make((4, 5), 0, requires_grad=False)
    values = host(x)
    tanh_formula = 0.5 * values * (1 + numpy.tanh(math.sqrt(2 / math.pi) * (values + 0.044715 * values ** 3)))
    exact_formula = numpy.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in values.ravel()]).reshape(values.shape)
    assert max_error(F.gelu(x), tanh_formula) <= 1e-12
    assert max_error(F.gelu(x, approximate="none"), exact_formula) <= 1e-12
    assert max_error(F.gelu(x), exact_formula) <= 1e-3  # the approximation is close to the real thing
    with pytest.raises(ValueError):
        F.gelu(x, approximate="sigmoid")


@pytest.mark.parametrize("dtype", [numpy.float64, numpy.float32])
def test_gelu_through_the_sigmoid_is_the_tanh_formula_in_its_tails(device, dtype):
    """GeLU computes 0.5 x (1 + tanh u) as x / (1 + e^(-2u)): far left e^(-2u) overflows (a RuntimeWarning
    would be an error here) and y must reach its limit -0, its slope 0; far right y = x, slope 1. Values
    and slopes against the tanh formula and its derivative, over the whole range."""
    values = numpy.array([-1e4, -60.0, -30.0, -12.0, -9.5, -3.0, -0.5, 0.0, 0.7, 4.0, 30.0, 1e4]).astype(dtype)
    x = Tensor(backend.xp.asarray(values), requires_grad=True)
    y = F.gelu(x)
    y.backward(backend.xp.ones_like(x.data))
    v = values.astype(numpy.float64)
    u = math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3)
    t = numpy.tanh(u)
    expected = 0.5 * v * (1 + t)
    slope = 0.5 * (1 + t) + 0.5 * v * (1 - t * t) * math.sqrt(2 / math.pi) * (1 + 3 * 0.044715 * v ** 2)
    tolerance = 1e-12 if dtype == numpy.float64 else 1e-5
    assert numpy.isfinite(host(y)).all() and numpy.isfinite(host(x.grad)).all()
    assert numpy.abs(host(y) - expected).max() <= tolerance * numpy.abs(v).max()  # y = x on the right: relative
    assert numpy.abs(host(x.grad) - slope).max() <= tolerance
    assert host(y)[:3].tolist() == [0.0] * 3 and host(x.grad)[:3].tolist() == [0.0] * 3
    assert host(y)[-1] == values[-1] and host(x.grad)[-1] == 1.0


def test_cross_entropy_forward(device):
    logits = make((3, 2, 5), 0, requires_grad=False)
    targets = numpy.array([[1, 0], [4, 4], [2, 3]])
    values = host(logits)
    log_probs = numpy.log(numpy.exp(values) / numpy.exp(values).sum(axis=-1, keepdims=True))
    expected = -numpy.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    target_tensor = Tensor(ids(targets))  # targets may be a Tensor or an array
    assert max_error(F.cross_entropy(logits, target_tensor, reduction="none"), expected) <= 1e-12
    assert max_error(F.cross_entropy(logits, ids(targets), reduction="sum"), expected.sum()) <= 1e-12
    assert max_error(F.cross_entropy(logits, ids(targets)), expected.mean()) <= 1e-12
    huge = Tensor(logits.data * 1e4)  # log-sum-exp must not overflow
    assert numpy.isfinite(F.cross_entropy(huge, ids(targets)).item())
    with pytest.raises(ValueError):
        F.cross_entropy(logits, ids(targets), reduction="max")
    with pytest.raises(ValueError):
        F.cross_entropy(logits, ids(targets[:, :1]))


def test_causal_mask_forward(device):
    scores = make((2, 3, 4, 6), 0, requires_grad=True)
    masked = host(F.causal_mask(scores))
    query, key = numpy.indices((4, 6))
    future = key > query
    assert numpy.all(numpy.isneginf(masked[..., future]))
    assert numpy.array_equal(masked[..., ~future], host(scores)[..., ~future])
    probs = F.softmax(F.causal_mask(scores))
    assert numpy.all(host(probs)[..., future] == 0)
    probs.backward(backend.xp.ones(probs.shape))
    assert numpy.all(host(scores.grad)[..., future] == 0)


def test_embedding_forward(device):
    weight = make((6, 4), 0)
    token_ids = numpy.array([[5, 0, 5], [1, 1, 2]])  # (s, b)
    out = F.embedding(ids(token_ids), weight)
    assert out.shape == (2, 3, 4)
    assert max_error(out, host(weight)[token_ids]) == 0.0
    out.backward(backend.xp.ones(out.shape))
    counts = numpy.bincount(token_ids.ravel(), minlength=6)  # each use of a row adds its gradient
    assert max_error(weight.grad, numpy.repeat(counts[:, None], 4, axis=1)) == 0.0
    with pytest.raises(TypeError):
        F.embedding(backend.xp.zeros(3), weight)


def test_max_splits_ties_evenly(device):
    x = Tensor(backend.xp.asarray([[1.0, 3.0, 3.0, 3.0], [2.0, 0.0, 2.0, -1.0]]), requires_grad=True)
    y = F.max(x, axis=1)
    assert max_error(y, [3.0, 2.0]) == 0.0
    y.backward(backend.xp.asarray([6.0, 1.0]))
    assert max_error(x.grad, [[0, 2, 2, 2], [0.5, 0, 0.5, 0]]) == 0.0


def test_reductions_match_numpy(device):
    x = make((3, 1, 5), 0, requires_grad=False)
    values = host(x)
    for axis in (None, 0, -1, (0, 2)):
        for keepdims in (False, True):
            for op, reference in ((F.sum, numpy.sum), (F.mean, numpy.mean), (F.max, numpy.max)):
                out = op(x, axis=axis, keepdims=keepdims)
                assert max_error(out, reference(values, axis=axis, keepdims=keepdims)) <= 1e-12


def test_views_do_not_copy(device):
    xp = backend.xp
    x = make((4, 3, 5), 0)
    for view in (F.reshape(x, (12, 5)), F.transpose(x), x.T, x[1:3, ::2, None], x[..., 0], F.split(x, 2)[1]):
        assert xp.shares_memory(view.data, x.data)
    assert not xp.shares_memory(x[[0, 1]].data, x.data)  # integer arrays copy, as in numpy


def test_shape_ops_match_numpy(device):
    a, b = make((2, 3), 0, requires_grad=False), make((2, 3), 1, requires_grad=False)
    assert max_error(F.cat([a, b], axis=-1), numpy.concatenate([host(a), host(b)], axis=-1)) == 0.0
    assert max_error(F.stack([a, b], axis=1), numpy.stack([host(a), host(b)], axis=1)) == 0.0
    assert max_error(F.transpose(a), host(a).T) == 0.0
    pieces = F.split(make((7, 2), 2, requires_grad=False), [2, 5])
    assert [p.shape for p in pieces] == [(2, 2), (5, 2)]
    with pytest.raises(ValueError):
        F.split(a, 2, axis=1)  # 3 is not divisible by 2
    with pytest.raises(ValueError):
        F.split(a, [1, 1], axis=1)  # sizes do not add up to 3
    with pytest.raises(TypeError):
        F.pow(a, b)


def test_gradient_skipped_for_inputs_that_do_not_need_it(device):
    x, w, b = make((3, 4), 0), make((4,), 1, requires_grad=False), make((4,), 2, requires_grad=False)
    F.layer_norm(x, w, b).sum().backward()
    assert x.grad is not None and w.grad is None and b.grad is None


# -- dropout --------------------------------------------------------------------------------------

def test_dropout_sequence_shard_is_a_slice_of_the_serial_mask(device):
    s, b, h = 7, 3, 5
    x = make((s, b, h), 0)
    full = F.dropout(x, 0.4, seed=5, counter=3)
    shard = F.dropout(Tensor(x.data[2:5].copy()), 0.4, seed=5, counter=3, global_shape=(s, b, h),
                      offset=(2, 0, 0))
    assert max_error(shard, full.data[2:5]) == 0.0
    assert numpy.any(host(full) == 0) and numpy.any(host(full) != 0)  # the check is not vacuous


def test_dropout_head_shard_is_a_slice_of_the_serial_mask(device):
    batch, heads, seq = 2, 6, 5
    probs = make((batch, heads, seq, seq), 1)
    full = F.dropout(probs, 0.3, seed=9, counter=1)
    for start, stop in ((0, 2), (2, 4), (4, 6)):  # three ranks, two heads each
        shard = F.dropout(Tensor(probs.data[:, start:stop].copy()), 0.3, seed=9, counter=1,
                          global_shape=probs.shape, offset=(0, start, 0, 0))
        assert max_error(shard, full.data[:, start:stop]) == 0.0


def test_dropout_keeps_about_one_minus_p(device):
    x = Tensor(backend.xp.ones((400, 500)))
    for p in (0.1, 0.5, 0.9):
        kept = float((host(F.dropout(x, p, seed=1, counter=0)) != 0).mean())
        assert abs(kept - (1 - p)) <= 0.005  # 200,000 draws: the standard error is at most 0.0012


def test_dropout_output_is_masked_and_rescaled(device):
    x = make((6, 1, 5), 0)
    y = host(F.dropout(x, 0.25, seed=0, counter=0))
    mask = host(rng.keep_mask((6, 1, 5), 0.25, seed=0, counter=0))
    assert max_error(y, numpy.where(mask, host(x) / 0.75, 0.0)) <= 1e-15


def test_dropout_streams_differ(device):
    x = Tensor(backend.xp.ones((50, 40)))
    base = host(F.dropout(x, 0.5, seed=1, counter=0))
    assert numpy.array_equal(base, host(F.dropout(x, 0.5, seed=1, counter=0)))  # pure function
    assert not numpy.array_equal(base, host(F.dropout(x, 0.5, seed=1, counter=1)))
    assert not numpy.array_equal(base, host(F.dropout(x, 0.5, seed=2, counter=0)))
    assert not numpy.array_equal(base, host(F.dropout(x, 0.5, seed=0, counter=1)))  # not seed + counter


def test_dropout_identity_and_errors(device):
    x = make((3, 4), 0)
    for out in (F.dropout(x, 0.0, seed=1, counter=0), F.dropout(x, 0.7, seed=1, counter=0, training=False)):
        assert out.data is x.data
        out.backward(backend.xp.ones(x.shape))
    assert max_error(x.grad, numpy.full((3, 4), 2.0)) == 0.0
    for p in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            F.dropout(x, p, seed=1, counter=0)
    with pytest.raises(ValueError):
        F.dropout(x, 0.5, seed=1, counter=0, global_shape=(3, 4), offset=(1, 0))  # does not fit


def _splitmix64_reference(seed, counter, flat_index):
    """The keep-mask hash written again with Python integers, one element at a time."""
    def finalise(z):
        z &= 2 ** 64 - 1
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2 ** 64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2 ** 64
        return z ^ (z >> 31)
    key = finalise(finalise(seed) + 0x9E3779B97F4A7C15 * (counter + 1))
    return finalise(key + flat_index * 0x9E3779B97F4A7C15)


def test_keep_mask_matches_a_python_reference_on_every_backend(device):
    shape, global_shape, offset, p = (2, 3, 4), (5, 3, 9), (1, 0, 4), 0.3
    mask = host(rng.keep_mask(shape, p, seed=12345, counter=7, global_shape=global_shape, offset=offset,
                              xp=backend.xp))
    threshold = round(p * 2 ** 32)
    for i, j, k in numpy.ndindex(*shape):
        flat = ((i + 1) * 3 + j) * 9 + (k + 4)
        assert mask[i, j, k] == (_splitmix64_reference(12345, 7, flat) >> 32 >= threshold)
    numpy_mask = rng.keep_mask(shape, p, 12345, 7, global_shape, offset, xp=numpy)
    assert numpy.array_equal(mask, numpy_mask)  # identical bits on numpy and (on GPU) CuPy


@pytest.mark.parametrize("block", [10 ** 9, 7])
def test_keep_mask_in_blocks_is_the_hash_of_random_bits(device, block, monkeypatch):
    """keep_mask hashes a cache-sized block at a time (minitp.blocks); over blocks of 7 elements (a
    shorter last one) and over one block, the mask is random_bits' top 32 bits against the threshold."""
    from minitp import blocks
    monkeypatch.setattr(blocks, "BLOCK", block)
    shape, global_shape, offset, p = (3, 5, 4), (4, 5, 11), (1, 0, 6), 0.3
    mask = host(rng.keep_mask(shape, p, seed=99, counter=2, global_shape=global_shape, offset=offset, xp=backend.xp))
    bits = host(rng.random_bits(shape, 99, 2, global_shape, offset, xp=backend.xp))
    threshold = numpy.uint64(round(p * 2 ** 32))
    assert mask.shape == shape and numpy.array_equal(mask, (bits >> numpy.uint64(32)) >= threshold)
    assert host(rng.keep_mask((), p, 99, 2, xp=backend.xp)).shape == ()


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_gelu_of_a_0d_tensor(device, approximate):
    """A scalar input (a 0-d array) goes through GeLU's in-place buffers and back."""
    x = Tensor(backend.xp.asarray(0.7), requires_grad=True)
    y = F.gelu(x, approximate=approximate)
    assert y.shape == ()
    assert gradcheck(lambda t: F.gelu(t, approximate=approximate), [x]).max_error <= 1e-6


@pytest.mark.parametrize("case", ["gelu-tanh", "softmax", "softmax-axis0"])
def test_blocked_ops_compute_what_one_block_does(device, case, monkeypatch):
    """GeLU and softmax walk their arrays in cache-sized blocks (minitp.blocks):
    with blocks of a few elements (many blocks, a shorter last one) outputs and gradients are those of
    one whole-array block, and the gradient still matches finite differences."""
    from minitp import blocks
    function, shapes = CASES[case]
    shapes = [tuple(3 * n + 2 if n > 1 else n for n in shape) for shape in shapes]  # several blocks of rows
    results = []
    for block in (10 ** 9, 7):
        monkeypatch.setattr(blocks, "BLOCK", block)
        inputs = [make(shape, seed) for seed, shape in enumerate(shapes)]
        output = function(*inputs)
        output.backward(backend.xp.asarray(numpy.random.default_rng(9).standard_normal(output.shape)))
        results.append([host(output)] + [host(t.grad) for t in inputs])
    for whole, blocked in zip(*results):
        assert max_error(blocked, whole) <= 1e-15
    assert gradcheck(function, [make(shape, seed) for seed, shape in enumerate(shapes)]).max_error <= TOLERANCE
