"""The engine itself: how gradients flow and accumulate, no_grad, the errors it raises, and the
accounting of bytes kept for backward (track_saved) that the activation-memory benchmark reads.

Serial tests, run once per backend through the ``device`` fixture.
"""
import numpy
import pytest

from minitp import backend
from minitp import functional as F
from minitp.autograd import Tensor, no_grad
from minitp.saved_bytes import track_saved
from minitp.testing import max_error


class Weight(Tensor):
    """A stand-in for minitp.nn.Parameter: weights are not activations, so track_saved leaves them out."""
    is_parameter = True


def make(shape, seed, requires_grad=True, cls=Tensor, dtype=numpy.float64):
    values = numpy.random.default_rng(seed).standard_normal(shape).astype(dtype)
    return cls(backend.xp.asarray(values), requires_grad=requires_grad)


def host(tensor):
    return backend.to_host(tensor.data)


# -- how gradients flow ---------------------------------------------------------------------------

def test_gradients_add_over_two_paths(device):
    x = make((3, 4), 0)
    y = x * x + x  # x reaches y along three edges: d/dx = 2x + 1
    y.backward(backend.xp.ones(y.shape))
    assert max_error(x.grad, 2 * host(x) + 1) <= 1e-15


def test_shared_intermediate_receives_the_sum(device):
    x = make((5,), 1)
    h = F.exp(x)
    y = (h * 2.0 + h * h).sum()  # dy/dh = 2 + 2h, dh/dx = h
    y.backward()
    h_values = numpy.exp(host(x))
    assert max_error(x.grad, (2 + 2 * h_values) * h_values) <= 1e-14


def test_leaf_grad_accumulates_across_backward_calls(device):
    x = make((2, 3), 2)
    (x * 2.0).sum().backward()
    (x * 3.0).sum().backward()
    assert max_error(x.grad, numpy.full((2, 3), 5.0)) == 0.0


def test_a_leaf_is_final_and_hooked_as_soon_as_its_last_op_has_run(device):
    # y = tanh(tanh(x·w1)·w2)·w3, with w1 used twice: the hooks fire once per weight, in the order backward
    # finishes with them (w3 first), each seeing its whole gradient, while ops below it remain to be run
    x, w1, w2, w3 = make((4,), 0), make((4,), 1), make((4,), 2), make((4,), 3)
    fired = []

    def hook(name):
        return lambda leaf: fired.append((name, backend.to_host(leaf.grad).copy(), w1.grad is None))
    handles = [w.register_post_accumulate_grad_hook(hook(name)) for name, w in (("w1", w1), ("w2", w2), ("w3", w3))]
    y = (F.tanh(F.tanh(x * w1 + x * w1) * w2) * w3).sum()
    y.backward()
    assert [name for name, _, _ in fired] == ["w3", "w2", "w1"]
    assert [w1_not_yet for _, _, w1_not_yet in fired] == [True, True, False], "w3, w2 hooked while w1's ops remain"
    for (name, grad_then, _), w in zip(sorted(fired), (w1, w2, w3)):
        assert numpy.array_equal(grad_then, backend.to_host(w.grad)), f"{name}: the whole gradient when hooked"
    for handle in handles:
        handle.remove()
    (x * w1).sum().backward()
    assert len(fired) == 3, "removed hooks do not run"


def test_no_gradient_reaches_inputs_that_do_not_require_it(device):
    x, constant = make((3,), 0), make((3,), 1, requires_grad=False)
    (x * constant).sum().backward()
    assert constant.grad is None
    assert max_error(x.grad, host(constant)) == 0.0


def test_broadcast_operand_gradient_is_summed(device):
    x, bias = make((4, 3), 0), make((3,), 1)
    (x + bias).sum().backward()
    assert bias.grad.shape == (3,)
    assert max_error(bias.grad, numpy.full(3, 4.0)) == 0.0


def test_python_numbers_keep_float32(device):
    x = make((3,), 0, dtype=numpy.float32)
    y = 2 * x - 1.5 / (x + 3)
    y.sum().backward()
    assert y.dtype == numpy.float32 and x.grad.dtype == numpy.float32


def test_deep_graph_walks_without_recursion(device):
    x = make((2,), 0)
    y = x
    for _ in range(3000):  # far beyond Python's recursion limit
        y = y + 1.0
    y.sum().backward()
    assert max_error(x.grad, numpy.ones(2)) == 0.0


def test_backward_releases_what_was_saved(device):
    x = make((3, 4), 0)
    y = F.softmax(x)
    fn = y._fn
    assert len(fn.saved) == 1
    y.sum().backward()
    assert fn.saved == () and y._fn is None


# -- no_grad and errors ---------------------------------------------------------------------------

def test_no_grad_records_nothing(device):
    x = make((3, 4), 0)
    with track_saved() as saved:
        with no_grad():
            y = F.layer_norm(x, make((4,), 1), make((4,), 2)) * x
    assert not y.requires_grad and y._fn is None
    assert saved.total == 0 and saved.by_op == {}
    with pytest.raises(RuntimeError):
        y.sum().backward()
    z = x * x  # recording is back on after the block
    assert z.requires_grad and z._fn is not None


def test_backward_of_non_scalar_needs_a_grad(device):
    y = make((2, 3), 0) * 2.0
    with pytest.raises(RuntimeError):
        y.backward()
    with pytest.raises(ValueError):
        y.backward(backend.xp.ones((3, 2)))  # wrong shape
    y.backward(backend.xp.ones((2, 3)))  # and with one it works


def test_backward_on_a_tensor_without_grad_raises(device):
    with pytest.raises(RuntimeError):
        make((1,), 0, requires_grad=False).backward()


# -- track_saved: the bytes kept for backward -----------------------------------------------------

def test_array_saved_by_two_ops_is_counted_once(device):
    x = make((5, 7), 0)
    with track_saved() as saved:
        h = F.exp(x)  # saves its output h
        h * h         # Mul saves h twice (each factor for the other's gradient)
    assert saved.total == h.data.nbytes
    assert saved.by_op == {"Exp": h.data.nbytes}


def test_parameters_are_not_counted(device):
    x, weight = make((4, 3, 5), 0), make((5, 6), 1, cls=Weight)
    with track_saved() as saved:
        x @ weight  # saves x (for dW) and W (for dX); W is a weight, not an activation
    assert saved.total == x.data.nbytes
    plain = make((5, 6), 1)
    with track_saved() as saved:
        x @ plain
    assert saved.total == x.data.nbytes + plain.data.nbytes  # the same op counts a non-parameter


def test_dropout_saves_one_byte_per_element(device):
    x = make((7, 2, 5), 0)
    with track_saved() as saved:
        F.dropout(x, 0.1, seed=0, counter=0)
    assert saved.by_op == {"Dropout": x.size}


def test_dropout_identity_saves_nothing(device):
    x = make((7, 2, 5), 0)
    with track_saved() as saved:
        F.dropout(x, 0.0, seed=0, counter=0)
        F.dropout(x, 0.5, seed=0, counter=0, training=False)
    assert saved.total == 0


def test_softmax_saves_only_its_output(device):
    x = make((2, 3, 5, 5), 0)
    with track_saved() as saved:
        y = F.softmax(x)
    assert saved.by_op == {"Softmax": y.data.nbytes}
    assert backend.data_ptr(y._fn.saved[0]) == backend.data_ptr(y.data)


def test_layer_norm_saves_input_size_and_row_stats(device):
    seq, batch, hidden = 5, 3, 8
    x = make((seq, batch, hidden), 0)
    weight, bias = make((hidden,), 1, cls=Weight), make((hidden,), 2, cls=Weight)
    with track_saved() as saved:
        F.layer_norm(x, weight, bias)
    row_stats = seq * batch * x.data.itemsize  # one 1/std per token
    assert saved.by_op == {"LayerNorm": x.data.nbytes + row_stats}


@pytest.mark.parametrize("op, expected", [
    ("gelu", lambda x: x.nbytes),                          # its input only
    ("causal_mask", lambda x: 0),                          # the mask is rebuilt from the shape
    ("embedding", lambda x: 6 * numpy.dtype(numpy.int64).itemsize),  # only the ids
    ("cross_entropy", lambda x: x.nbytes + 6 * numpy.dtype(numpy.int64).itemsize),  # softmax + targets
])
def test_other_ops_save_what_their_backward_needs(device, op, expected):
    x = make((2, 3, 5), 0)
    token_ids = backend.xp.asarray(numpy.array([[0, 4, 1], [2, 2, 3]], dtype=numpy.int64))
    calls = {
        "gelu": lambda: F.gelu(x),
        "causal_mask": lambda: F.causal_mask(x),
        "embedding": lambda: F.embedding(token_ids, make((5, 4), 1, cls=Weight)),
        "cross_entropy": lambda: F.cross_entropy(x, token_ids),
    }
    with track_saved() as saved:
        calls[op]()
    assert saved.total == expected(x.data)


def test_slices_of_one_tensor_add_their_gradients_into_one_array(monkeypatch):
    """q, k and v as thirds of one qkv: the first slice's backward makes the (zeros) gradient, the others
    add their thirds into it (``backward_into``); another consumer of qkv adds in place too. The sum
    is the chain rule's, and the upstream gradients handed to backward are left as they were."""
    from minitp.functional.shape import GetItem
    calls = {"backward": 0, "backward_into": 0}
    for name in calls:
        def counted(self, *args, _name=name, _original=getattr(GetItem, name)):
            calls[_name] += 1
            return _original(self, *args)
        monkeypatch.setattr(GetItem, name, counted)
    qkv = make((2, 3, 9), 0)
    weights = [numpy.random.default_rng(i).standard_normal((2, 3, 3)) for i in range(3)]
    scale = numpy.random.default_rng(5).standard_normal((2, 3, 9))
    pieces = F.split(qkv, 3, axis=2)
    loss = sum((piece * w).sum() for piece, w in zip(pieces, weights)) + (qkv * scale).sum()
    loss.backward()
    assert calls == {"backward": 1, "backward_into": 2}, calls
    assert max_error(qkv.grad, numpy.concatenate(weights, axis=2) + scale) <= 1e-15


def test_a_gradient_shared_by_two_inputs_is_never_added_into():
    """Add's backward hands one array to both inputs; later gradients reaching either input must go
    into a new sum, not into that shared array (which the other input still holds)."""
    x = make((4, 5), 1)
    y = make((4, 5), 2)
    z = x + y  # dz reaches x and y as the same array
    upstream = numpy.random.default_rng(3).standard_normal((4, 5))
    loss_x, loss_y = (x[1:3] * 2.0).sum(), (y[:, 2:] * 3.0).sum()  # fresh GetItem gradients after
    total = (z * Tensor(upstream)).sum() + loss_x + loss_y
    total.backward()
    expected_x, expected_y = upstream.copy(), upstream.copy()
    expected_x[1:3] += 2.0
    expected_y[:, 2:] += 3.0
    assert max_error(x.grad, expected_x) == 0 and max_error(y.grad, expected_y) == 0
