"""The serial mixture-of-experts MLP (minitp.nn.moe) against a token-by-token numpy loop written here from
the papers' definitions (top-k, Switch's raw gate for k = 1, Mixtral's renormalised gates for k >= 2,
first-come-first-served capacity with first choices before second ones, the Switch aux loss and the z-loss),
a finite-difference gradcheck of everything (the gates', the router's and every expert's gradient, through
the output and the aux loss), hand counts of drops, and the refusals."""
import math

import numpy
import pytest

from minitp import Tensor
from minitp import functional as F
from minitp.functional import routing
from minitp.nn import GPT, GPTConfig
from minitp.nn.moe import MoE
from minitp.testing import gradcheck, max_error

H, F_HIDDEN, E = 6, 8, 4


def gelu(x):
    return 0.5 * x * (1 + numpy.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def reference(moe, x):
    """(output (s, b, h), aux loss, kept (T, k)) by a loop over tokens in batch-major order."""
    s, b, h = x.shape
    tokens = x.transpose(1, 0, 2).reshape(-1, h)
    T, k = len(tokens), moe.top_k
    W = moe.router.weight.data
    logits = tokens @ W
    probs = numpy.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    chosen = [sorted(range(E), key=lambda e: -probs[t, e])[:k] for t in range(T)]
    slots = math.inf if moe.capacity_factor is None else math.ceil(moe.capacity_factor * T * k / E)
    used, kept = [0] * E, numpy.zeros((T, k), dtype=bool)
    for j in range(k):  # every first choice before any second choice, tokens in order
        for t in range(T):
            e = chosen[t][j]
            if used[e] < slots:
                used[e] += 1
                kept[t, j] = True
    out = numpy.zeros_like(tokens)
    for t in range(T):
        if k == 1:
            gates = [probs[t, chosen[t][0]]]
        else:
            z = numpy.array([logits[t, e] for e in chosen[t]])
            gates = numpy.exp(z - z.max()) / numpy.exp(z - z.max()).sum()
        for j, e in enumerate(chosen[t]):
            if kept[t, j]:
                mlp = moe.experts[e]
                hidden = gelu(tokens[t] @ mlp.fc1.weight.data + mlp.fc1.bias.data)
                out[t] += gates[j] * (hidden @ mlp.fc2.weight.data + mlp.fc2.bias.data)
    f = numpy.bincount(numpy.array(chosen).ravel(), minlength=E) / (T * k)
    aux = moe.aux_loss_coef * E * float(f @ probs.mean(0))
    lse = numpy.log(numpy.exp(logits).sum(-1))
    aux += moe.z_loss_coef * float((lse ** 2).mean())
    return out.reshape(b, s, h).transpose(1, 0, 2), aux, kept


def layer(k, capacity_factor, seed=3, **kw):
    return MoE(H, E, top_k=k, ffn_hidden=F_HIDDEN, capacity_factor=capacity_factor, aux_loss_coef=0.1,
               z_loss_coef=0.01, dtype=numpy.float64, seed=seed, **kw)


def away_from_ties(moe, x, margin=0.05):
    """True when every token's k-th and (k+1)-th probabilities differ by ``margin`` (relative): a finite
    difference cannot flip its choice."""
    tokens = x.transpose(1, 0, 2).reshape(-1, H)
    logits = numpy.sort(tokens @ moe.router.weight.data, axis=-1)[:, ::-1]
    return moe.top_k == E or bool((logits[:, moe.top_k - 1] - logits[:, moe.top_k] > margin).all())


def inputs(moe, seed):
    """A (5, 2, h) input whose routing is away from ties (redrawn until it is)."""
    rng = numpy.random.default_rng(seed)
    while True:
        x = rng.standard_normal((5, 2, H))
        if away_from_ties(moe, x):
            return x


CASES = [(1, None), (2, None), (1, 0.6), (2, 0.5), (3, 0.75), (2, 2.0)]


@pytest.mark.parametrize("k, capacity_factor", CASES)
def test_moe_equals_the_token_by_token_loop(k, capacity_factor):
    moe = layer(k, capacity_factor)
    x = inputs(moe, 1)
    y = moe(Tensor(x))
    expected, aux, kept = reference(moe, x)
    assert max_error(y, expected) <= 1e-12
    assert abs(moe.aux_loss.item() - aux) <= 1e-12
    assert numpy.array_equal(moe.routing.kept, kept)
    if capacity_factor is None or capacity_factor >= 2:
        assert kept.all()  # no limit, or room for every pair
    elif capacity_factor < 1:
        assert not kept.all(), "the cases with c < 1 drop something"


def test_capacity_drops_by_hand():
    """8 tokens, 4 experts, k = 2, c = 0.5: ⌈0.5·8·2/4⌉ = 2 slots each. First choices in token order,
    then second choices -- counted here by hand."""
    choices = numpy.array([[0, 1], [0, 2], [0, 1], [1, 0], [1, 3], [2, 0], [3, 2], [0, 3]])
    totals = routing.counts(choices, 4)
    assert totals.tolist() == [[4, 2, 1, 1], [2, 2, 2, 2]]
    assert routing.capacity(0.5, 8, 2, 4) == 2
    positions = routing.queue_positions(choices, 4, numpy.zeros_like(totals), totals)
    # expert 0: first choices of tokens 0, 1, 2, 7 at 0..3, then second choices of 3, 5 at 4, 5
    assert positions[:, 0].tolist() == [0, 1, 2, 0, 1, 0, 0, 3]
    assert positions[:, 1].tolist() == [2, 1, 3, 4, 1, 5, 2, 2]
    kept = positions < 2
    assert kept.sum() == 8 and kept.tolist() == [[True, False], [True, True], [False, False],
                                                                   [True, False], [True, True], [True, False],
                                                                   [True, False], [False, False]]
    # split the same 8 tokens into two runs (two replicas): the second run's counts start after the first's
    first, second = choices[:4], choices[4:]
    before = routing.counts(first, 4)
    assert numpy.array_equal(routing.queue_positions(second, 4, before, totals), positions[4:])


def test_a_token_whose_every_choice_is_dropped_gets_zero():
    """Capacity c·T·k/E small enough that some token loses both choices: its output is exactly 0 (the
    block adds nothing to its residual)."""
    moe = layer(2, 0.25)
    x = inputs(moe, 2)
    y = moe(Tensor(x)).data.transpose(1, 0, 2).reshape(-1, H)
    lost = ~moe.routing.kept.any(axis=1)
    assert lost.any() and numpy.all(y[lost] == 0) and numpy.all(numpy.abs(y[~lost]).sum(-1) > 0)


@pytest.mark.parametrize("k, capacity_factor", CASES)
def test_gradcheck_output_and_aux_loss(k, capacity_factor):
    """Every parameter (router included: through the gates, P_e and the z-loss) and the input, by central
    differences of the output and the aux loss together, in float64, inputs away from ties."""
    moe = layer(k, capacity_factor)
    x = Tensor(inputs(moe, 4), requires_grad=True)

    def both(x, *parameters):
        y = moe(x)
        return F.cat([F.reshape(y, (-1,)), F.reshape(moe.aux_loss, (1,))])

    result = gradcheck(both, [x] + moe.parameters())
    assert result.max_error <= 1e-6, str(result)


@pytest.mark.parametrize("k", [1, 2])
def test_the_router_learns_through_the_gates(k):
    """With no aux or z loss, the router's gradient is nonzero: it comes through the gates alone."""
    moe = MoE(H, E, top_k=k, ffn_hidden=F_HIDDEN, aux_loss_coef=0.0, dtype=numpy.float64, seed=3)
    y = moe(Tensor(inputs(moe, 5)))
    assert moe.aux_loss is None
    y.backward(numpy.random.default_rng(0).standard_normal(y.shape))
    assert numpy.abs(moe.router.weight.grad).max() > 1e-3


def test_mixtral_gates_sum_to_one_and_switch_gate_is_the_probability():
    for k in (1, 2):
        moe = layer(k, None)
        tokens = Tensor(inputs(moe, 6).transpose(1, 0, 2).reshape(-1, H))
        logits = moe.router(tokens)
        probs = F.softmax(logits, axis=-1)
        choices = routing.top_k(probs.data, k)
        gates = moe._gates(logits, probs, choices).data
        chosen = numpy.take_along_axis(probs.data, choices, axis=1)
        expected = chosen if k == 1 else chosen / chosen.sum(1, keepdims=True)
        assert max_error(gates, expected) <= 1e-15


def test_aux_loss_is_alpha_at_perfect_balance():
    """P_e = 1/E: α·E·Σ f_e/E = α, whatever the choices, since f (pairs over T·k) sums to 1. A zero router
    gives uniform probabilities -- the layer's own aux loss, at k = 2 so that f's T·k is tested too (the
    stable top-k sends every token to experts 0 and 1; f = 1/E is the counts' case, checked below)."""
    moe = MoE(H, E, top_k=2, ffn_hidden=F_HIDDEN, aux_loss_coef=0.1, dtype=numpy.float64, seed=3)
    moe.router.weight.data[...] = 0
    moe(Tensor(numpy.random.default_rng(7).standard_normal((5, 2, H))))
    assert abs(moe.aux_loss.item() - 0.1) < 1e-15
    T = 8
    assert routing.counts(numpy.arange(T)[:, None] % E, E).tolist() == [[2, 2, 2, 2]]


def test_top_k_breaks_ties_by_the_lower_index():
    assert routing.top_k(numpy.array([[0.2, 0.4, 0.4, 0.0]]), 2).tolist() == [[1, 2]]


@pytest.mark.parametrize("bad, words", [(dict(experts=0), "positive integer number of experts"),
                                        (dict(top_k=5), "top_k must be an integer in [1, experts=4]"),
                                        (dict(top_k=0), "top_k"),
                                        (dict(capacity_factor=0.0), "capacity_factor must be a positive"),
                                        (dict(capacity_factor=-1.0), "capacity_factor"),
                                        (dict(aux_loss_coef=-0.1), "aux_loss_coef")])
def test_bad_settings_are_refused(bad, words):
    settings = dict(experts=E, top_k=1, capacity_factor=None, aux_loss_coef=0.01)
    settings.update(bad)
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
        MoE(H, ffn_hidden=F_HIDDEN, **settings)
    with pytest.raises(ValueError, match="top_k|experts|capacity|aux"):
        GPTConfig(vocab=8, seq_len=4, hidden=8, heads=2, layers=1, **({"experts": 4} | bad | (
            {"experts": -1} if bad.get("experts") == 0 else {})))


DENSE = dict(vocab=24, seq_len=8, hidden=16, heads=4, layers=2, dtype="float64")


def test_dense_config_dictionary_is_unchanged():
    """0 experts is today's model: the checkpoint's configuration holds the same keys as before experts."""
    assert list(GPTConfig(**DENSE).to_dict()) == ["vocab", "seq_len", "hidden", "heads", "layers", "ffn_hidden",
                                                    "dropout", "attention_dropout", "tie_embeddings", "seed",
                                                    "dtype", "recompute"]
    assert "experts" in GPTConfig(**DENSE, experts=4).to_dict()
    with pytest.raises(ValueError, match="full recomputation"):
        GPTConfig(**DENSE, experts=4, recompute="full")


def test_moe_gpt_loss_adds_every_layers_aux_loss():
    config = GPTConfig(**DENSE, experts=4, top_k=2, capacity_factor=1.0, aux_loss_coef=0.05, z_loss_coef=1e-3)
    model = GPT(config)
    ids = numpy.random.default_rng(0).integers(0, 24, (8, 4))
    loss = model.loss(ids, ids)
    plain = F.cross_entropy(model(ids), ids).item()
    aux = sum(block.mlp.aux_loss.item() for block in model.blocks)
    assert abs(loss.item() - (plain + aux)) <= 1e-12 and aux > 0
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    names = [name for name, _ in model.named_parameters()]
    assert "blocks.1.mlp.router.weight" in names and "blocks.1.mlp.experts.3.fc2.bias" in names
