"""The numerics of bf16 and fp16 on numpy (issue 24, item 1): ml_dtypes' bfloat16, and one rule for a
matrix product of 2-byte floats (``minitp.functional.precision``).

- The rule, bit for bit: matmul and linear (forward and both gradients) of float16 or bfloat16 operands
  equal ``(a.astype(f32) @ b.astype(f32)).astype(dtype)`` -- fp32 accumulation, one rounding.
- Collectives and point-to-point of bfloat16 (which no MPI has a datatype for), and of float16 on the
  same emulated path (what an MPI without MPI_FLOAT16 takes): 2 bytes on the wire per element, sums by
  a user-defined MPI op, exact on integer-valued data.
- A bf16 GPT: one serial forward within a bound derived from u = 2^-8 of the float32 loss of the same
  (bf16-rounded) weights; a tensor-parallel bf16 step close to the serial one.
- A bf16 model on the GPU (the CuPy stand-in) is refused when it is built.
"""
import ml_dtypes
import numpy
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

from minitp import backend, comm
from minitp import functional as F
from minitp.autograd import Tensor
from minitp.comm import collectives, exchange, nonblocking, p2p
from minitp.nn import GPT, AdamW, GPTConfig
from minitp.parallel.data.data_parallel import clip_grad_norm
from minitp.parallel.gpt import ParallelGPT
from minitp.parallel.tensor.cross_entropy import vocab_parallel_cross_entropy
from minitp.functional import precision

BF16, F16, F32 = numpy.dtype(ml_dtypes.bfloat16), numpy.dtype(numpy.float16), numpy.dtype(numpy.float32)
HALVES = pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "fp16"])
WORLD = MPI.COMM_WORLD


def rounded_product(a, b):
    """The definition: the inputs as they are (2-byte), multiplied and summed in fp32, rounded once."""
    return (a.astype(F32) @ b.astype(F32)).astype(a.dtype)


def same(actual, expected):
    """Bit for bit: the same dtype and the same values (NaN nowhere: these are finite products)."""
    actual = actual.data if isinstance(actual, Tensor) else actual
    return actual.dtype == expected.dtype and actual.shape == expected.shape and numpy.array_equal(
        actual.astype(F32), expected.astype(F32))


def draw(shape, seed, dtype):
    return numpy.random.default_rng(seed).standard_normal(shape).astype(dtype)


# -- (a) the product rule ---------------------------------------------------------------------------


@pytest.mark.parallel(1)
@HALVES
@pytest.mark.parametrize("shapes", [((5, 33), (33, 7)), ((3, 4, 33), (33, 7)), ((2, 3, 5, 33), (2, 3, 33, 6))],
                         ids=["matrix", "weight", "batched"])
def test_matmul_and_its_gradients_accumulate_in_fp32_and_round_once(dtype, shapes):
    a_values, b_values = draw(shapes[0], 1, dtype), draw(shapes[1], 2, dtype)
    upstream = draw(shapes[0][:-1] + shapes[1][-1:], 3, dtype)
    a, b = Tensor(a_values, requires_grad=True), Tensor(b_values, requires_grad=True)
    out = F.matmul(a, b)
    out.backward(upstream)
    assert same(out, rounded_product(a_values, b_values))
    assert same(a.grad, rounded_product(upstream, numpy.swapaxes(b_values, -1, -2)))
    if len(shapes[1]) == 2:  # dW summed over every leading position: one (k, s*b) @ (s*b, n) product
        expected = rounded_product(a_values.reshape(-1, a_values.shape[-1]).T, upstream.reshape(-1, upstream.shape[-1]))
    else:
        expected = rounded_product(numpy.swapaxes(a_values, -1, -2), upstream)
    assert same(b.grad, expected)


@pytest.mark.parallel(1)
@HALVES
def test_linear_is_the_product_plus_the_bias_rounded_once(dtype):
    x_values, w_values, bias_values = draw((4, 3, 40), 4, dtype), draw((40, 9), 5, dtype), draw((9,), 6, dtype)
    upstream = draw((4, 3, 9), 7, dtype)
    x, w, bias = (Tensor(v, requires_grad=True) for v in (x_values, w_values, bias_values))
    y = F.linear(x, w, bias)
    y.backward(upstream)
    flat = x_values.reshape(-1, 40)
    # the bias added to the fp32 product before its one rounding (addmm's epilogue)
    assert same(y, (flat.astype(F32) @ w_values.astype(F32) + bias_values.astype(F32)).astype(dtype).reshape(4, 3, 9))
    assert same(x.grad, rounded_product(upstream.reshape(-1, 9), w_values.T).reshape(4, 3, 40))
    assert same(w.grad, rounded_product(flat.T, upstream.reshape(-1, 9)))
    assert bias.grad.dtype == dtype


@pytest.mark.parallel(1)
def test_a_product_in_the_low_dtype_itself_would_fail_the_rule():
    """The check can fail: a sum rounded to bf16 after every addition (what multiplying in the low dtype
    does) differs from the once-rounded fp32 sum on these operands."""
    a, b = draw((8, 256), 8, BF16), draw((256, 8), 9, BF16)
    per_addition = numpy.zeros((8, 8), dtype=BF16)
    for k in range(256):
        per_addition = (per_addition + numpy.multiply.outer(a[:, k], b[k, :]).astype(BF16)).astype(BF16)
    assert not same(per_addition, rounded_product(a, b))
    assert same(precision.product(a, b), rounded_product(a, b))


@pytest.mark.parallel(1)
def test_float32_and_float64_products_are_numpys_own():
    for dtype in (numpy.float32, numpy.float64):
        a, b = draw((6, 5), 10, dtype), draw((5, 4), 11, dtype)
        assert same(precision.product(a, b), a @ b)


@pytest.mark.parallel(1)
def test_finfo_knows_bfloat16():
    assert precision.finfo(BF16).eps == 2.0 ** -7 and precision.finfo(F16).eps == 2.0 ** -10
    assert precision.UNIT_ROUNDOFF[BF16] == precision.finfo(BF16).eps / 2


# -- (b, c) collectives and point-to-point of 2-byte floats ----------------------------------------


@pytest.fixture(params=["bf16", "fp16 emulated"])
def half(request, monkeypatch):
    """bfloat16 (no MPI has a datatype for it), or float16 forced onto the same 2-byte-word path, as an
    MPI without MPI_FLOAT16 (Open MPI 4.1 may lack it) would take it: the datatype table says so."""
    if request.param == "bf16":
        return BF16
    monkeypatch.setitem(collectives._DATATYPES, F16, collectives._Words(F16))
    return F16


def integers(shape, seed, dtype):
    """Small integers (|v| <= 8, sums over 4 ranks below 2^8): exact in bf16 and fp16 whatever the order
    of the additions, so every rank count and algorithm gives the same bits."""
    return numpy.random.default_rng(seed).integers(-8, 9, shape).astype(dtype)


def everyone(shape, dtype, n):
    """Every rank's input, rank r's drawn from seed r: each rank can compute the expected result."""
    return [integers(shape, r, dtype) for r in range(n)]


@pytest.mark.parallel([2, 3, 4])
def test_collectives_of_2_byte_floats_are_exact_and_send_2_bytes_an_element(half):
    group = comm.init(tp=WORLD.size, checked=True).tp
    n, r = group.size, group.rank
    inputs = everyone((2 * n, 3), half, n)
    x = inputs[r]
    exact = sum(v.astype(numpy.float64) for v in inputs)  # exact: small integers
    with comm.log_collectives() as log:
        reduced = comm.all_reduce(x, group)
        peak = comm.all_reduce(x, group, op="max")
        in_place = x.copy()
        comm.all_reduce(in_place, group, out=in_place)
        scattered = comm.reduce_scatter(x, group)
        scattered_columns = comm.reduce_scatter(numpy.tile(x, (1, n)), group, axis=1)  # block r: x itself
        gathered = comm.all_gather(x, group, axis=1)
        broadcast = comm.broadcast(x, group, root=n - 1)
        started = (nonblocking.iall_reduce(x, group), nonblocking.ireduce_scatter(x, group),
                   nonblocking.iall_gather(x, group))
        nonblocking_results = [pending.wait() for pending in started]
        ring = exchange.sendrecv(x, group, (r + 1) % n, (r - 1) % n)
        swapped = exchange.all_to_all(x, group, split_axis=0, concat_axis=0)
    block = slice(2 * r, 2 * r + 2)
    checks = {
        "all_reduce": same(reduced, exact.astype(half)),
        "all_reduce max": same(peak, numpy.max(inputs, axis=0).astype(half)),
        "all_reduce in place": same(in_place, exact.astype(half)),
        "reduce_scatter": same(scattered, exact[block].astype(half)),
        "reduce_scatter axis 1": same(scattered_columns, exact.astype(half)),
        "all_gather": same(gathered, numpy.concatenate(inputs, axis=1)),
        "broadcast": same(broadcast, inputs[n - 1]),
        "iall_reduce": same(nonblocking_results[0], exact.astype(half)),
        "ireduce_scatter": same(nonblocking_results[1], exact[block].astype(half)),
        "iall_gather": same(nonblocking_results[2], numpy.concatenate(inputs, axis=0)),
        "sendrecv": same(ring, inputs[(r - 1) % n]),
        "all_to_all": same(swapped, numpy.concatenate([inputs[j][block] for j in range(n)])),
        "the input untouched": same(x, inputs[r]),
    }
    parallel_assert(all(checks.values()), f"{half}: wrong {[name for name, ok in checks.items() if not ok]}")
    per_element = {record.op: record.payload_bytes / numpy.prod(record.shape) for record in log}
    parallel_assert(all(record.dtype == half.name for record in log) and len(log) == 12, log.table())
    parallel_assert(set(per_element.values()) == {2.0}, f"bytes per element {per_element}")


@pytest.mark.parallel([2, 3, 4])
def test_point_to_point_and_all_to_all_v_of_2_byte_floats(half):
    group = comm.init(tp=WORLD.size).tp
    n, r = group.size, group.rank
    inputs = everyone((5, 2), half, n)
    with comm.log_collectives() as log:
        pending = p2p.send(inputs[r], group, (r + 1) % n, match=7)
        received = p2p.recv((5, 2), half, group, (r - 1) % n, match=7)
        pending.wait()
        counts = [(r + j) % 3 for j in range(n)]  # rank r sends (r + j) % 3 rows to rank j
        rows = integers((sum(counts), 2), 100 + r, half)
        arrived = exchange.all_to_all_v(rows, group, counts, [(j + r) % 3 for j in range(n)])
    expected_rows = []
    for j in range(n):
        theirs = integers((sum((j + k) % 3 for k in range(n)), 2), 100 + j, half)
        start = sum((j + k) % 3 for k in range(r))
        expected_rows.append(theirs[start:start + (j + r) % 3])
    parallel_assert(same(received, inputs[(r - 1) % n]), f"recv {received} from rank {(r - 1) % n}")
    parallel_assert(same(arrived, numpy.concatenate(expected_rows)), "all_to_all_v")
    parallel_assert(all(record.payload_bytes == 2 * numpy.prod(record.shape) for record in log
                        if record.op in ("send", "recv")), log.table())


@pytest.mark.parallel(1)
def test_the_sum_of_2_byte_words_is_one_op_per_dtype_and_only_sum_and_max():
    words = collectives._Words(BF16)
    assert words.op("sum") is words.op("sum") and words.op("max") is not words.op("sum")
    assert collectives._datatype(BF16) is collectives._datatype(BF16)
    with pytest.raises(ValueError, match="op must be one of"):
        comm.all_reduce(numpy.ones(2, BF16), comm.init().tp, op="min")


# -- (d) a bf16 GPT ----------------------------------------------------------------------------------

U = precision.UNIT_ROUNDOFF[BF16]  # 2^-8
GPT_CONFIG = dict(vocab=24, seq_len=12, hidden=24, heads=12, layers=2, dropout=0.0, seed=5)
LOSS_BOUND = 4 * U
"""Relative: one rounding of the loss itself (u) plus the error the logits carry in (cross-entropy moves
by at most 2·max|Δlogit|, and every rounded stage -- products, sums, GeLU, LayerNorm -- adds about u of
the logits' small size: a few u in all). Measured: at most 0.7u over 6 seeds."""


def windows(seed=0):
    w = numpy.random.default_rng(seed).integers(0, GPT_CONFIG["vocab"], (GPT_CONFIG["seq_len"] + 1, 3))
    return w[:-1], w[1:]


@pytest.mark.parallel(1)
def test_a_bf16_gpt_runs_in_bf16_and_its_loss_is_the_float32_loss_within_a_few_u():
    ids, targets = windows()
    model = GPT(GPTConfig(**GPT_CONFIG, dtype=BF16))
    reference = GPT(GPTConfig(**GPT_CONFIG, dtype=F32))
    reference.load_state_dict({name: value.astype(F32) for name, value in model.state_dict().items()})  # exact
    logits = model(ids)
    loss = F.cross_entropy(logits, targets)
    expected = F.cross_entropy(reference(ids), targets).item()
    assert logits.dtype == BF16 and loss.dtype == BF16
    assert abs(loss.item() - expected) <= LOSS_BOUND * expected, (loss.item(), expected)
    loss.backward()
    assert all(p.grad.dtype == BF16 and numpy.isfinite(p.grad.astype(F32)).all() for p in model.parameters())
    before = {name: p.data.copy() for name, p in model.named_parameters()}
    AdamW(model.named_parameters(), lr=1e-2).step()
    moved = [name for name, p in model.named_parameters() if not numpy.array_equal(p.data, before[name])]
    assert all(p.dtype == BF16 for p in model.parameters()) and len(moved) == len(before)


@pytest.mark.parallel(2)
@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_a_tensor_parallel_bf16_step_is_close_to_the_serial_bf16_step(sequence_parallel):
    """tp = 2: the row-parallel products are rounded to bf16 on each rank before their all-reduce, and the
    vocabulary's sums come in two halves: other roundings than serial's, so the loss and the gradient
    norm agree within LOSS_BOUND (a few u), not bit for bit."""
    ids, targets = windows(1)
    serial = GPT(GPTConfig(**GPT_CONFIG, dtype=BF16))
    serial_loss = F.cross_entropy(serial(ids), targets)
    serial_loss.backward()
    serial_norm = clip_grad_norm(serial, 1e9)
    mesh = comm.init(tp=2, checked=True)
    model = ParallelGPT(GPTConfig(**GPT_CONFIG, dtype=BF16), mesh, sequence_parallel=sequence_parallel)
    optimizer = AdamW(model.named_parameters(), lr=1e-2)
    loss = vocab_parallel_cross_entropy(model(ids), targets, group=mesh.tp)
    loss.backward()
    norm = clip_grad_norm(model, 1e9, mesh)
    optimizer.step()
    parallel_assert(loss.dtype == BF16 and all(p.dtype == BF16 and p.grad.dtype == BF16 for p in model.parameters()),
                    "every parameter and gradient in bf16")
    parallel_assert(abs(loss.item() - serial_loss.item()) <= LOSS_BOUND * serial_loss.item(),
                    f"loss {loss.item()} vs serial {serial_loss.item()}")
    parallel_assert(abs(norm - serial_norm) <= LOSS_BOUND * serial_norm, f"gradient norm {norm} vs {serial_norm}")
    finite = all(numpy.isfinite(p.data.astype(F32)).all() for p in model.parameters())
    parallel_assert(finite, "the step's weights are finite")


# -- (e) no bfloat16 on the GPU ------------------------------------------------------------------------


@pytest.mark.parallel(1)
def test_a_bf16_model_on_the_gpu_is_refused_when_it_is_built(device):
    if device == "cpu":
        assert GPT(GPTConfig(**GPT_CONFIG, dtype=BF16)).wte.weight.dtype == BF16
        return
    with pytest.raises(ValueError, match="bfloat16 is not supported on the GPU"):
        GPT(GPTConfig(**GPT_CONFIG, dtype=BF16))
    assert GPT(GPTConfig(**GPT_CONFIG, dtype=F16)).wte.weight.dtype == F16  # float16 is fine there


@pytest.mark.parallel(1)
@HALVES
def test_sums_of_2_byte_floats_accumulate_in_fp32_and_round_once(dtype):
    """4096 ones: added one by one in bf16 the total stalls at 256 (256 + 1 rounds back to 256); in fp16
    at 2048 (numpy's fp16 sum along a leading axis, row by row). Accumulated in fp32 it is 4096, exact in both. The same through the ops that sum."""
    ones = numpy.ones((4096,), dtype=dtype)
    assert same(precision.total(ones), numpy.asarray(4096, dtype=dtype))
    columns = numpy.ones((4096, 2), dtype=dtype)  # along axis 0 numpy adds row by row: fp16 stalls at 2048
    assert same(precision.total(columns, axis=0), numpy.full(2, 4096, dtype=dtype))
    assert same(precision.average(ones.reshape(2, 2048), axis=1), numpy.ones(2, dtype=dtype))
    x = Tensor(ones.reshape(64, 64), requires_grad=True)
    assert same(F.sum(x), numpy.asarray(4096, dtype=dtype))
    bias = Tensor(numpy.zeros(64, dtype=dtype), requires_grad=True)
    (x + bias).backward(numpy.ones((64, 64), dtype=dtype))  # the bias gradient: a sum over 64 rows
    assert same(bias.grad, numpy.full(64, 64, dtype=dtype))
    values = draw((6, 300), 12, dtype)
    assert same(precision.total(values, axis=1), values.astype(F32).sum(axis=1).astype(dtype))


# -- (f) elementwise math of 2-byte floats: in fp32, rounded once ------------------------------------

from minitp.functional import activations, masks, normalization  # noqa: E402 (the ops' modules, for the planted bug)


def _widened(array):
    """A 2-byte float array as fp32 (exact); anything else (a bool mask, float32) as it is."""
    return array.astype(F32) if array.dtype in precision.HALF_DTYPES else array


def _run(op, arrays, upstream, **options):
    """``op``'s forward on raw ``arrays`` and its backward of ``upstream``: (output, gradients, the op)."""
    fn = op()
    fn.needs_input_grad = (True,) * len(arrays)
    output = fn.forward(*arrays, **options)
    grads = fn.backward(upstream)
    return output, grads if isinstance(grads, tuple) else (grads,), fn


def _rounded_fp32_op(op, arrays, upstream, saved, **options):
    """The definition: forward is the fp32 op on the widened inputs, rounded once to each input's dtype;
    backward is the fp32 backward on the widened arrays the 2-byte forward saved (``saved``) and the
    widened upstream gradient, each gradient rounded once to its input's dtype."""
    fn = op()
    fn.needs_input_grad = (True,) * len(arrays)
    output = fn.forward(*(_widened(a) for a in arrays), **options).astype(arrays[0].dtype)
    fn.saved = tuple(_widened(a) for a in saved)
    grads = fn.backward(_widened(upstream))
    grads = grads if isinstance(grads, tuple) else (grads,)
    return output, tuple(g.astype(a.dtype) for g, a in zip(grads, arrays))


def _cases(dtype):
    """(op, inputs, upstream, options) for each op under the rule; GeLU's and softmax's arrays span
    several blocks (``minitp.blocks``), GeLU's reach far enough below 0 for e^(-2u) to overflow in fp32."""
    x = draw((5, 13113), 20, F32) * 4
    rows = draw((300, 257), 21, F32) * 3
    hidden = draw((6, 7, 96), 22, F32) * 2 + 1
    return [
        ("gelu tanh", activations.GeLU, [x.astype(dtype)], draw(x.shape, 23, dtype), {"approximate": "tanh"}),
        ("gelu erf", activations.GeLU, [x[:2, :999].astype(dtype)], draw((2, 999), 24, dtype), {"approximate": "none"}),
        ("softmax", activations.Softmax, [rows.astype(dtype)], draw(rows.shape, 25, dtype), {"axis": -1}),
        ("softmax axis 0", activations.Softmax, [rows[:40].astype(dtype)], draw((40, 257), 26, dtype), {"axis": 0}),
        ("log_softmax", activations.LogSoftmax, [rows.astype(dtype)], draw(rows.shape, 27, dtype), {"axis": -1}),
        ("layer_norm", normalization.LayerNorm,
         [hidden.astype(dtype), draw((96,), 28, dtype), draw((96,), 29, dtype)], draw(hidden.shape, 30, dtype), {}),
        ("dropout", masks.Dropout, [x.astype(dtype)], draw(x.shape, 31, dtype),
         {"p": 0.1, "seed": 5, "counter": 2}),
    ]


CASE_NAMES = [case[0] for case in _cases(F32)]


@pytest.mark.parallel(1)
@HALVES
@pytest.mark.parametrize("name", CASE_NAMES)
def test_elementwise_ops_of_2_byte_floats_compute_in_fp32_and_round_once(dtype, name):
    """GeLU, softmax, log-softmax, LayerNorm and dropout of bf16/fp16: forward and every gradient equal,
    bit for bit, the fp32 op on the widened inputs rounded once; what they save stays in the dtype."""
    _, op, arrays, upstream, options = next(case for case in _cases(dtype) if case[0] == name)
    output, grads, fn = _run(op, arrays, upstream, **options)
    expected_output, expected_grads = _rounded_fp32_op(op, arrays, upstream, fn.saved, **options)
    assert same(output, expected_output)
    assert len(grads) == len(arrays) and all(same(g, e) for g, e in zip(grads, expected_grads))
    assert all(a.dtype == dtype for a in fn.saved if a.dtype.kind != "b")


@pytest.mark.parallel(1)
@HALVES
def test_elementwise_math_in_the_low_dtype_itself_would_fail_the_rule(dtype, monkeypatch):
    """The check can fail: with the rule switched off (each op computing in the 2-byte dtype, one
    rounding per operation) every op's forward or a gradient differs from the once-rounded fp32 op."""
    for module in (activations, masks, normalization):
        monkeypatch.setattr(module, "compute_dtype", lambda x: x.dtype)
    for name, op, arrays, upstream, options in _cases(dtype):
        output, grads, fn = _run(op, arrays, upstream, **options)
        expected_output, expected_grads = _rounded_fp32_op(op, arrays, upstream, fn.saved, **options)
        assert not (same(output, expected_output) and all(same(g, e) for g, e in zip(grads, expected_grads))), name


@pytest.mark.parallel(1)
def test_the_rule_leaves_float32_float64_and_the_gpu_as_they_are(device):
    """``compute_dtype`` widens only 2-byte floats on numpy: float32 and float64 compute in their own
    dtype (the ops take their code path unchanged), and so does a device array (CuPy's float16 runs natively)."""
    for dtype in (F32, numpy.dtype(numpy.float64)):
        assert precision.compute_dtype(numpy.zeros(3, dtype)) == dtype
    for dtype in (F16, BF16):
        assert precision.compute_dtype(numpy.zeros(3, dtype)) == F32
    array = backend.from_host(numpy.zeros(3, F16))  # a CuPy array on "gpu" (a GPU or the stand-in)
    assert precision.compute_dtype(array) == (F32 if device == "cpu" else F16)
