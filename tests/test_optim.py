"""SGD and AdamW against their formulas written out in numpy, AdamW's decoupled weight decay, and the
optimizer state_dict (what a checkpoint saves and a tensor-parallel run would reshard).

Serial tests, once per backend through the ``device`` fixture.
"""
import math

import numpy
import pytest

from minitp import backend
from minitp import nn
from minitp.testing import max_error

EXACT = 1e-14


def host(array):
    return backend.to_host(array)


def parameter(values, dtype=numpy.float64):
    """A Parameter holding a copy of ``values`` (optimizers update parameters in place)."""
    return nn.Parameter(backend.from_host(numpy.array(values, dtype=dtype)))


def gradients(seed, shape, steps):
    generator = numpy.random.default_rng(seed)
    return [generator.standard_normal(shape) for _ in range(steps)]


def test_adamw_two_steps_match_the_formula(device):
    """Two steps by hand: decay p first, then the bias-corrected Adam step (Loshchilov & Hutter, alg. 2)."""
    lr, (beta1, beta2), eps, weight_decay = 0.1, (0.8, 0.9), 1e-3, 0.05
    start = numpy.random.default_rng(1).standard_normal((3, 2))
    grads = gradients(2, (3, 2), 2)
    p = parameter(start)
    optimizer = nn.AdamW([p], lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay)

    expected, m, v = start.copy(), numpy.zeros((3, 2)), numpy.zeros((3, 2))
    for t, g in enumerate(grads, start=1):
        p.grad = backend.from_host(g)
        optimizer.step()
        expected = expected - lr * weight_decay * expected
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g ** 2
        m_hat, v_hat = m / (1 - beta1 ** t), v / (1 - beta2 ** t)
        expected = expected - lr * m_hat / (numpy.sqrt(v_hat) + eps)
        assert max_error(p.data, expected) <= EXACT
    state = optimizer.state_dict()["state"][0]
    assert state["step"] == 2 and max_error(state["exp_avg"], m) <= EXACT and max_error(state["exp_avg_sq"], v) <= EXACT


def test_adamw_weight_decay_is_decoupled(device):
    """A zero gradient still decays p by exactly (1 - lr*wd); a gradient-only parameter (wd=0) ignores p."""
    p = parameter([1.0, -2.0, 3.0])
    optimizer = nn.AdamW([p], lr=0.1, weight_decay=0.5)
    p.grad = backend.xp.zeros(3)
    optimizer.step()
    assert max_error(p.data, numpy.array([1.0, -2.0, 3.0]) * (1 - 0.1 * 0.5)) <= EXACT

    # Adam with an L2 term (g + wd*p) moves every entry by about lr (Adam normalises the step size);
    # AdamW decays each entry in proportion to its size. The two must differ.
    values, g = numpy.array([10.0, 0.1]), numpy.array([1.0, 1.0])
    decoupled, coupled = parameter(values), parameter(values)
    optimizer = nn.AdamW([decoupled], lr=0.01, weight_decay=0.1)
    decoupled.grad = backend.from_host(g)
    optimizer.step()
    l2 = nn.AdamW([coupled], lr=0.01, weight_decay=0.0)
    coupled.grad = backend.from_host(g + 0.1 * values)
    l2.step()
    assert max_error(decoupled.data, values * (1 - 0.001) - 0.01) <= 1e-9  # eps = 1e-8 in the step
    assert max_error(coupled.data, values - 0.01) <= 1e-9
    assert max_error(decoupled.data, coupled.data) > 1e-3


def test_parameters_without_grad_are_skipped(device):
    p, q = parameter([1.0, 2.0]), parameter([3.0])
    optimizer = nn.AdamW([p, q], lr=0.1, weight_decay=0.5)
    p.grad = backend.from_host(numpy.array([0.5, -0.5]))
    optimizer.step()
    assert host(q.data).tolist() == [3.0] and 1 not in optimizer.state_dict()["state"]


def test_optimizers_never_write_into_grad(device):
    """The engine may share one gradient array between tensors: it must come out of step() untouched."""
    for make in (lambda ps: nn.AdamW(ps, lr=0.1), lambda ps: nn.SGD(ps, lr=0.1, momentum=0.9)):
        p = parameter([1.0, 2.0, 3.0])
        grad = backend.from_host(numpy.array([0.1, 0.2, 0.3]))
        p.grad = grad
        optimizer = make([p])
        for _ in range(3):
            optimizer.step()
        assert p.grad is grad and host(grad).tolist() == [0.1, 0.2, 0.3]


def test_sgd_momentum_matches_the_formula(device):
    lr, momentum = 0.1, 0.9
    start = numpy.array([[1.0, -1.0], [0.5, 2.0]])
    grads = gradients(3, (2, 2), 3)
    p = parameter(start)
    optimizer = nn.SGD([p], lr=lr, momentum=momentum)
    expected, velocity = start.copy(), None
    for g in grads:
        p.grad = backend.from_host(g)
        optimizer.step()
        velocity = g if velocity is None else momentum * velocity + g  # torch: v starts at the first g
        expected = expected - lr * velocity
        assert max_error(p.data, expected) <= EXACT

    plain = parameter(start)
    nn_sgd = nn.SGD([plain], lr=lr)
    plain.grad = backend.from_host(grads[0])
    nn_sgd.step()
    assert max_error(plain.data, start - lr * grads[0]) <= EXACT and nn_sgd.state_dict()["state"][0] == {"step": 1}


@pytest.mark.parametrize("optimizer_class", [nn.AdamW, lambda ps, lr: nn.SGD(ps, lr, momentum=0.5)])
def test_state_dict_resumes_exactly(device, optimizer_class):
    """Two steps, save, restore into a fresh optimizer over copies of the weights: the third step is the
    same. Built from named_parameters(), the state is keyed by parameter name."""
    model = nn.MLP(3, 4, dtype=numpy.float64, seed=1)
    optimizer = optimizer_class(model.named_parameters(), lr=0.05)
    grads = {name: gradients(i, p.shape, 3) for i, (name, p) in enumerate(model.named_parameters())}

    def step(model, optimizer, index):
        for name, p in model.named_parameters():
            p.grad = backend.from_host(grads[name][index])
        optimizer.step()

    step(model, optimizer, 0)
    step(model, optimizer, 1)
    saved = optimizer.state_dict()
    assert set(saved["state"]) == {name for name, _ in model.named_parameters()}
    resumed = nn.MLP(3, 4, dtype=numpy.float64, seed=2)
    resumed.load_state_dict(model.state_dict())
    resumed_optimizer = optimizer_class(resumed.named_parameters(), lr=0.05)
    resumed_optimizer.load_state_dict(saved)
    snapshot = {key: {name: numpy.array(host(value)) for name, value in entry.items() if name != "step"}
                for key, entry in saved["state"].items()}
    step(model, optimizer, 2)
    step(resumed, resumed_optimizer, 2)
    for (name, p), (_, q) in zip(model.named_parameters(), resumed.named_parameters()):
        assert max_error(q.data, p.data) == 0.0, name
    assert resumed_optimizer.step_count == optimizer.step_count == 3
    # the saved state was a copy: the third step did not change it
    assert saved["step"] == 2
    assert all((host(saved["state"][key][name]) == value).all()
               for key, entry in snapshot.items() for name, value in entry.items())


def test_optimizer_load_state_dict_errors():
    p = parameter([[1.0, 2.0]])
    optimizer = nn.AdamW([("w", p)])
    p.grad = backend.xp.ones((1, 2))
    optimizer.step()
    saved = optimizer.state_dict()
    with pytest.raises(ValueError, match="unknown parameter 'v'"):
        optimizer.load_state_dict({"step": 1, "state": {"v": saved["state"]["w"]}})
    bad = {"step": 1, "state": {"w": dict(saved["state"]["w"], exp_avg=numpy.zeros((2, 1)))}}
    with pytest.raises(ValueError, match=r"exp_avg of parameter 'w' has shape \(2, 1\), the parameter \(1, 2\)"):
        optimizer.load_state_dict(bad)
    with pytest.raises(TypeError, match="not a Parameter"):
        nn.SGD([backend.xp.ones(2)], lr=0.1)
    with pytest.raises(ValueError, match="no parameters"):
        nn.SGD([], lr=0.1)


def test_float32_parameters_stay_float32(device):
    p = parameter([1.0, 2.0], dtype=numpy.float32)
    optimizer = nn.AdamW([p], lr=0.1)
    p.grad = backend.xp.ones(2, dtype=numpy.float32)
    optimizer.step()
    assert p.dtype == numpy.float32 and optimizer.state[0]["exp_avg"].dtype == numpy.float32


def test_adamw_trains_a_tiny_gpt(device):
    """The loss on a fixed batch goes down under AdamW (the whole stack, forward to update, works)."""
    model = nn.GPT(nn.GPTConfig(vocab=8, seq_len=6, hidden=16, heads=2, layers=1, seed=0))
    ids = backend.from_host(numpy.random.default_rng(0).integers(0, 8, (7, 2)))
    optimizer = nn.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = model.loss(ids[:-1], ids[1:])
        model.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5 and math.isfinite(losses[-1])


def test_clip_grad_norm_scales_as_torch_does_and_refuses_a_max_norm_that_is_not_positive():
    """torch: factor = max_norm / (norm + 1e-6), clamped at 1 -- so a norm just below max_norm (within
    eps) is still scaled a little, and one well below is left alone."""
    from minitp.parallel.data.data_parallel import clip_grad_norm
    layer = nn.Linear(2, 1, bias=False, dtype=numpy.float64)
    for norm, max_norm in [(3.0, 1.0), (1.0 - 1e-7, 1.0), (0.5, 1.0)]:
        layer.weight.grad = numpy.array([[0.6], [0.8]]) * norm  # |g| = norm
        reported = clip_grad_norm(layer, max_norm)
        factor = min(1.0, max_norm / (norm + 1e-6))
        assert abs(reported - norm) < 1e-15 and numpy.allclose(layer.weight.grad, numpy.array([[0.6], [0.8]]) * norm
                                                               * factor, rtol=1e-15, atol=0)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="max_norm must be positive"):
            clip_grad_norm(layer, bad)


@pytest.mark.parametrize("norm, max_norm", [(1.0 - 1e-7, 1.0), (3.0, 1.0), (0.5, 1.0), (1.0 - 1e-5, 1.0)])
def test_plain_and_zero_clipping_follow_one_rule_torchs(norm, max_norm):
    """PyTorch's rule written out: coef = max_norm / (norm + 1e-6), applied iff coef < 1. Just below
    max_norm (norm = max_norm - 1e-7) coef = 1 / (1 + 9e-7) < 1: the gradient IS scaled, by 1 - 9e-7.
    Both the plain path (``data_parallel.clip_grad_norm`` on ``.grad``) and ZeRO-1's
    (``ZeroOptimizer.clip_grad_norm`` on this rank's slices; one rank, so its slice is everything) must
    give exactly that, as must the one shared rule, ``nn.optim.clip_coefficient``."""
    from minitp import comm
    from minitp.nn.optim import clip_coefficient
    from minitp.parallel.data.data_parallel import clip_grad_norm
    from minitp.parallel.data.zero import ZeroOptimizer
    direction = numpy.array([[0.6], [0.8]])  # |direction| = 1, so |g| = norm
    coef = max_norm / (norm + 1e-6)
    expected = direction * norm * (coef if coef < 1 else 1.0)
    assert clip_coefficient(norm, max_norm) == (coef if coef < 1 else 1.0)

    layer = nn.Linear(2, 1, bias=False, dtype=numpy.float64)
    layer.weight.grad = direction * norm
    assert abs(clip_grad_norm(layer, max_norm) - norm) < 1e-15
    plain = host(layer.weight.grad)

    zero = ZeroOptimizer(nn.AdamW(layer.named_parameters()), comm.init(tp=1, dp=1))
    layer.weight.grad = direction * norm
    zero.gradients.wait()
    assert abs(zero.clip_grad_norm(max_norm) - norm) < 1e-15
    sliced = host(zero.gradients.grad_shards[0]).reshape(expected.shape)
    for path, got in (("plain", plain), ("ZeRO-1", sliced)):
        # a few ulps (CuPy rounds direction·norm·coef in another order than numpy); a path that did not
        # scale just below max_norm would be off by 9e-7, relative
        assert numpy.allclose(got, expected, rtol=1e-15, atol=0), f"{path}: {got.ravel()} vs torch's {expected.ravel()}"


def test_zero_clipping_refuses_a_max_norm_that_is_not_positive():
    """A negative max_norm would flip the gradient (coef < 0), 0 would zero it: refused on both paths."""
    from minitp import comm
    from minitp.parallel.data.zero import ZeroOptimizer
    layer = nn.Linear(2, 1, bias=False, dtype=numpy.float64)
    zero = ZeroOptimizer(nn.AdamW(layer.named_parameters()), comm.init(tp=1, dp=1))
    for bad in (0.0, -1.0):
        layer.weight.grad = numpy.array([[0.6], [0.8]]) * 3
        zero.gradients.wait()
        with pytest.raises(ValueError, match="max_norm must be positive"):
            zero.clip_grad_norm(bad)
