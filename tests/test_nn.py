"""The serial layers of minitp.nn: gradients against finite differences (float64), forward values
against plain numpy references, Module bookkeeping (names, state_dict, train/eval), and dropout's
counter. These layers are the serial twins every tensor-parallel layer is proven equal to.

Serial tests, once per backend through the ``device`` fixture (without a GPU, the GPU run uses the CuPy
stand-in).
"""
import math

import numpy
import pytest

from minitp import backend
from minitp import nn
from minitp.autograd import Tensor, no_grad
from minitp.testing import gradcheck, max_error

TOLERANCE = 1e-6  # gradcheck, float64
EXACT = 1e-12  # float64 forward against a numpy reference of the same formula


def host(value):
    """A numpy array of the values (a numpy array's own .data is a memoryview: test the type)."""
    return backend.to_host(value.data if isinstance(value, Tensor) else value)


def make(shape, seed, dtype=numpy.float64, requires_grad=True):
    values = numpy.random.default_rng(seed).standard_normal(shape).astype(dtype)
    return Tensor(backend.from_host(values), requires_grad=requires_grad)


def randomize(module, seed, scale=0.5):
    """Give every parameter random values (LayerNorm's ones and zeros, GPT's small init hide bugs)."""
    generator = numpy.random.default_rng(seed)
    for parameter in module.parameters():
        parameter.data[...] = backend.from_host(scale * generator.standard_normal(parameter.shape))
    return module


def reset_dropout(module):
    """Rewind every Dropout's counter: the next forward draws the same masks as the first one did."""
    for sub in module.modules():
        if isinstance(sub, nn.Dropout):
            sub.counter = 0


def check_layer(module, *inputs):
    """gradcheck of ``module(*inputs)`` w.r.t. every float input and every parameter.

    Each forward rewinds the dropout counters, so the finite differences see the same masks as the
    analytic backward (dropout is a fixed linear map once its mask is drawn).
    """
    def forward(*_):
        reset_dropout(module)
        return module(*inputs)

    checked = [t for t in inputs if isinstance(t, Tensor) and t.requires_grad] + module.parameters()
    return gradcheck(forward, checked)


def state(module):
    return {name: host(array) for name, array in module.state_dict().items()}


# -- numpy references: the formulas written out, nothing shared with minitp ---------------------------

def ref_layer_norm(x, weight, bias, eps=1e-5):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / numpy.sqrt(var + eps) * weight + bias


def ref_gelu(x, approximate="tanh"):
    if approximate == "tanh":
        return 0.5 * x * (1 + numpy.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    return 0.5 * x * (1 + numpy.vectorize(math.erf)(x / math.sqrt(2)))


def ref_softmax(scores):
    exps = numpy.exp(scores - scores.max(axis=-1, keepdims=True))
    return exps / exps.sum(axis=-1, keepdims=True)


def ref_attention(x, wq, bq, wk, bk, wv, bv, wo, bo, heads, causal):
    """Multi-head attention with separate (h, h) q, k, v weights; head i owns columns [d*i, d*(i+1))."""
    seq, batch, hidden = x.shape
    d = hidden // heads
    # (s, b, h) -> (s, b, a, d): the heads via reshape
    q, k, v = ((x @ w + b).reshape(seq, batch, heads, d) for w, b in ((wq, bq), (wk, bk), (wv, bv)))
    scores = numpy.einsum("ibad,jbad->baij", q, k) / math.sqrt(d)  # (b, a, s_q, s_k)
    if causal:
        scores = numpy.where(numpy.triu(numpy.ones((seq, seq), dtype=bool), 1), -numpy.inf, scores)
    context = numpy.einsum("baij,jbad->ibad", ref_softmax(scores), v).reshape(seq, batch, hidden)
    return context @ wo + bo


def fuse_head_major(wq, wk, wv, heads):
    """The fused qkv weight (or bias) that MultiHeadAttention documents: for head i, the 3d columns
    [3d*i, 3d*(i+1)) are [q_i | k_i | v_i]."""
    hidden = wq.shape[-1]
    d = hidden // heads
    parts = [w.reshape(*w.shape[:-1], heads, 1, d) for w in (wq, wk, wv)]
    return numpy.concatenate(parts, axis=-2).reshape(*wq.shape[:-1], 3 * hidden)


def unfuse_head_major(w, heads):
    hidden = w.shape[-1] // 3
    split = w.reshape(*w.shape[:-1], heads, 3, hidden // heads)
    return [split[..., i, :].reshape(*w.shape[:-1], hidden) for i in range(3)]


def ref_attention_from_state(x, weights, prefix, heads, causal):
    wq, wk, wv = unfuse_head_major(weights[prefix + "qkv.weight"], heads)
    bq, bk, bv = unfuse_head_major(weights[prefix + "qkv.bias"], heads)
    return ref_attention(x, wq, bq, wk, bk, wv, bv, weights[prefix + "proj.weight"],
                         weights[prefix + "proj.bias"], heads, causal)


def ref_mlp(x, weights, prefix):
    hidden = ref_gelu(x @ weights[prefix + "fc1.weight"] + weights[prefix + "fc1.bias"])
    return hidden @ weights[prefix + "fc2.weight"] + weights[prefix + "fc2.bias"]


def ref_block(x, weights, prefix, heads, causal=True):
    def ln(name, values):
        return ref_layer_norm(values, weights[prefix + name + ".weight"], weights[prefix + name + ".bias"])
    x = x + ref_attention_from_state(ln("ln1", x), weights, prefix + "attention.", heads, causal)
    return x + ref_mlp(ln("ln2", x), weights, prefix + "mlp.")


def ref_gpt(ids, weights, heads, layers, tied=False):
    seq = ids.shape[0]
    x = weights["wte.weight"][ids] + weights["wpe.weight"][:seq][:, None, :]
    for i in range(layers):
        x = ref_block(x, weights, f"blocks.{i}.", heads)
    x = ref_layer_norm(x, weights["ln_f.weight"], weights["ln_f.bias"])
    return x @ (weights["wte.weight"].T if tied else weights["lm_head.weight"])


# -- Linear, Embedding, LayerNorm, GELU ---------------------------------------------------------------

@pytest.mark.parametrize("shape, out_features, bias", [((3, 2, 5), 4, True), ((1, 1, 3), 1, True),
                                                       ((2, 3), 5, False)])
def test_linear_gradcheck(device, shape, out_features, bias):
    layer = nn.Linear(shape[-1], out_features, bias=bias, dtype=numpy.float64, seed=1)
    result = check_layer(layer, make(shape, 2))
    assert result.max_error <= TOLERANCE, result


@pytest.mark.parametrize("dtype", [numpy.float64, numpy.float32])
def test_linear_forward_is_x_at_w_plus_b(device, dtype):
    layer = nn.Linear(5, 3, dtype=dtype, seed=3)
    x = make((3, 2, 5), 4, dtype=dtype)
    y = layer(x)
    weights = state(layer)
    assert layer.weight.shape == (5, 3)  # (in, out): the paper's A
    assert y.dtype == dtype and layer.weight.dtype == dtype
    assert max_error(y, host(x) @ weights["weight"] + weights["bias"]) <= (EXACT if dtype == numpy.float64 else 1e-6)


def test_embedding_gradcheck_with_repeated_ids(device):
    table = nn.Embedding(7, 4, dtype=numpy.float64, seed=1)
    ids = backend.from_host(numpy.array([[0, 3], [3, 6], [0, 0]]))  # (s, b), ids repeat
    result = check_layer(table, ids)
    assert result.max_error <= TOLERANCE, result
    assert max_error(table(ids), host(table.weight)[host(ids)]) == 0.0


@pytest.mark.parametrize("shape", [(3, 2, 5), (1, 1, 4), (2, 7)])
def test_layer_norm_gradcheck_and_values(device, shape):
    layer = randomize(nn.LayerNorm(shape[-1], dtype=numpy.float64), seed=5)
    x = make(shape, 6)
    result = check_layer(layer, x)
    assert result.max_error <= TOLERANCE, result
    weights = state(layer)
    assert max_error(layer(x), ref_layer_norm(host(x), weights["weight"], weights["bias"])) <= EXACT


def test_layer_norm_starts_as_pure_normalisation(device):
    layer = nn.LayerNorm(6, dtype=numpy.float64)
    y = host(layer(make((4, 3, 6), 7)))
    assert numpy.abs(y.mean(axis=-1)).max() <= 1e-12
    assert numpy.abs(y.var(axis=-1) - 1).max() <= 1e-4  # eps = 1e-5 shrinks the variance a little


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_gelu_module(device, approximate):
    x = make((3, 5), 8)
    assert max_error(nn.GELU(approximate)(x), ref_gelu(host(x), approximate)) <= EXACT
    with pytest.raises(ValueError, match="approximate"):
        nn.GELU("fast")


# -- Dropout: a counter, a seed, and exact shards ------------------------------------------------------

def test_dropout_counter_advances_only_in_training(device):
    x = make((4, 3, 5), 9)
    dropout = nn.Dropout(0.4, seed=11)
    first = host(dropout(x))
    assert dropout.counter == 1
    second = host(dropout(x))
    assert dropout.counter == 2
    assert (first != second).any()  # a new counter draws a new mask
    assert (first == 0).any() and (first != 0).any()
    kept = first != 0
    assert numpy.allclose(first[kept], host(x)[kept] / 0.6, rtol=1e-14, atol=0)

    dropout.counter = 0  # a copy starting from the same counter draws the same mask
    assert (host(dropout(x)) == first).all()

    dropout.eval()
    assert dropout(x) is x and dropout.counter == 1
    dropout.train()
    assert nn.Dropout(0.0)(x) is x


def test_dropout_rejects_bad_probability():
    for p in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="dropout probability"):
            nn.Dropout(p)


def test_dropout_block_draws_its_slice_of_the_full_mask(device):
    """A sequence shard (rows 2..3 of 6: block 1 of 3 along axis 0) and a batch shard (column 1 of 2)
    drop what the full tensor drops there; the same rows placed as block 0 draw another mask."""
    x = make((6, 2, 3), 10)
    full = host(nn.Dropout(0.5, seed=12)(x))
    block = nn.Dropout(0.5, seed=12, splits=((0, 1, 3),))(x[2:4])
    assert (host(block) == full[2:4]).all()
    both = nn.Dropout(0.5, seed=12, splits=((0, 1, 3), (1, 1, 2)))(x[2:4, 1:2])
    assert (host(both) == full[2:4, 1:2]).all()
    misplaced = nn.Dropout(0.5, seed=12, splits=((0, 0, 3),))(x[2:4])
    assert (host(misplaced) != full[2:4]).any()


def test_train_and_eval_toggle_every_dropout(device):
    model = nn.GPT(nn.GPTConfig(vocab=7, seq_len=4, hidden=4, heads=2, layers=2, ffn_hidden=6, dropout=0.3,
                   dtype=numpy.float64))
    ids = backend.from_host(numpy.array([[1, 2], [3, 4], [5, 6]]))
    model.eval()
    assert all(not m.training for m in model.modules())
    with no_grad():
        reference = host(model(ids))
        assert (host(model(ids)) == reference).all()  # deterministic: no dropout in eval
        model.train()
        assert all(m.training for m in model.modules())
        trained = host(model(ids))
    assert max_error(trained, reference) > 1e-3
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(dropouts) == 1 + 2 * 3 and all(m.counter == 1 for m in dropouts)
    assert len({m.seed for m in dropouts}) == len(dropouts)  # every dropout its own stream


# -- MLP -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, ffn, p", [((3, 2, 4), 6, 0.0), ((1, 1, 5), 3, 0.3), ((2, 3, 4), None, 0.3)])
def test_mlp_gradcheck(device, shape, ffn, p):
    mlp = nn.MLP(shape[-1], ffn, dropout=p, dtype=numpy.float64, seed=2)
    result = check_layer(mlp, make(shape, 3))
    assert result.max_error <= TOLERANCE, result
    assert mlp.fc1.weight.shape == (shape[-1], ffn or 4 * shape[-1])


def test_mlp_forward_matches_numpy(device):
    mlp = nn.MLP(5, 7, dropout=0.3, dtype=numpy.float64, seed=4).eval()
    x = make((3, 2, 5), 5)
    assert max_error(mlp(x), ref_mlp(host(x), state(mlp), "")) <= EXACT


# -- attention -----------------------------------------------------------------------------------------

ATTENTION_SIZES = [(3, 2, 4, 2), (1, 1, 4, 2), (5, 3, 6, 3), (2, 1, 3, 1)]  # (s, b, h, heads)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("seq, batch, hidden, heads", ATTENTION_SIZES)
def test_attention_matches_numpy_with_head_major_qkv(device, causal, seq, batch, hidden, heads):
    """Build the fused qkv weight from separate Wq, Wk, Wv by the documented head-major rule: the
    module must then compute ordinary multi-head attention."""
    generator = numpy.random.default_rng(6)
    wq, wk, wv, wo = (generator.standard_normal((hidden, hidden)) * 0.5 for _ in range(4))
    bq, bk, bv, bo = (generator.standard_normal(hidden) for _ in range(4))
    attention = nn.MultiHeadAttention(hidden, heads, causal=causal, attention_dropout=0.5, dropout=0.5,
                                      dtype=numpy.float64).eval()
    attention.load_state_dict({"qkv.weight": fuse_head_major(wq, wk, wv, heads),
                               "qkv.bias": fuse_head_major(bq, bk, bv, heads),
                               "proj.weight": wo, "proj.bias": bo})
    x = make((seq, batch, hidden), 7)
    expected = ref_attention(host(x), wq, bq, wk, bk, wv, bv, wo, bo, heads, causal)
    assert max_error(attention(x), expected) <= EXACT


def test_attention_is_causal(device):
    """Changing the last token changes no earlier output under the causal mask (and does without it)."""
    x = make((4, 2, 6), 8, requires_grad=False)
    changed = host(x).copy()
    changed[-1] += 1.0
    for causal in (True, False):
        attention = nn.MultiHeadAttention(6, 3, causal=causal, dtype=numpy.float64, seed=9)
        before, after = host(attention(x)), host(attention(Tensor(backend.from_host(changed))))
        difference = numpy.abs(before[:-1] - after[:-1]).max()
        assert (difference == 0) if causal else (difference > 1e-6)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("seq, batch, hidden, heads", ATTENTION_SIZES[:3])
def test_attention_gradcheck_with_dropout(device, causal, seq, batch, hidden, heads):
    attention = nn.MultiHeadAttention(hidden, heads, causal=causal, attention_dropout=0.3, dropout=0.2,
                                      dtype=numpy.float64, seed=10)
    x = make((seq, batch, hidden), 11)
    result = check_layer(attention, x)
    assert result.max_error <= TOLERANCE, result
    # and the dropouts were really on: the training output is not the eval one
    reset_dropout(attention)
    trained = host(attention(x))
    assert max_error(trained, host(attention.eval()(x))) > 1e-6


def test_attention_core_head_block_draws_its_slice_of_the_mask(device):
    """A head-parallel rank runs attention_core on heads [2, 4) of 4, its dropout placed as block 1 of 2
    along the heads axis: its output, attention dropout included, is exactly those heads of the serial core."""
    batch, heads, seq, d = 2, 4, 3, 2
    q, k, v = (make((batch, heads, seq, d), seed) for seed in (12, 13, 14))
    full = attention_core_output(q, k, v, splits=())
    block = attention_core_output(*(t[:, 2:4] for t in (q, k, v)), splits=((1, 1, 2),))
    assert max_error(block, full[:, 2:4]) <= EXACT
    # the placement matters: the same heads drawn as if they were heads 0..1 get another mask
    assert max_error(attention_core_output(*(t[:, 2:4] for t in (q, k, v)), splits=((1, 0, 2),)),
                     full[:, 2:4]) > 1e-6


def attention_core_output(q, k, v, splits):
    dropout = nn.Dropout(0.5, seed=15, splits=splits)
    return host(nn.attention_core(q, k, v, True, dropout))


def test_attention_rejects_heads_that_do_not_divide_hidden():
    with pytest.raises(ValueError, match=r"heads \(3\) must divide hidden \(4\)"):
        nn.MultiHeadAttention(4, 3)


# -- the transformer block and the GPT ---------------------------------------------------------------

@pytest.mark.parametrize("seq, batch", [(3, 2), (1, 1)])
def test_transformer_block_gradcheck(device, seq, batch):
    block = randomize(nn.TransformerBlock(4, 2, ffn_hidden=6, dropout=0.2, attention_dropout=0.3,
                                          dtype=numpy.float64, seed=3), seed=4)
    result = check_layer(block, make((seq, batch, 4), 5))
    assert result.max_error <= TOLERANCE, result


def test_transformer_block_matches_numpy(device):
    block = randomize(nn.TransformerBlock(6, 3, ffn_hidden=5, dropout=0.5, dtype=numpy.float64, seed=6),
                      seed=7).eval()
    x = make((5, 3, 6), 8)
    assert [name for name, _ in block._modules.items()] == ["ln1", "attention", "ln2", "mlp"]
    assert max_error(block(x), ref_block(host(x), state(block), "", heads=3)) <= EXACT


@pytest.mark.parametrize("tied", [False, True])
def test_gpt_gradcheck(device, tied):
    model = nn.GPT(nn.GPTConfig(vocab=7, seq_len=4, hidden=4, heads=2, layers=1, ffn_hidden=6, dropout=0.2,
                   tie_embeddings=tied, dtype=numpy.float64, seed=1))
    randomize(model, seed=2)
    ids = backend.from_host(numpy.array([[1, 6], [0, 1], [5, 1]]))  # (s, b) = (3, 2)
    result = check_layer(model, ids)
    assert result.max_error <= TOLERANCE, result


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("seq, batch", [(3, 2), (1, 1), (5, 3)])
def test_gpt_logits_and_loss_match_numpy(device, tied, seq, batch):
    model = nn.GPT(nn.GPTConfig(vocab=11, seq_len=5, hidden=6, heads=3, layers=2, ffn_hidden=5, dropout=0.1,
                   tie_embeddings=tied, dtype=numpy.float64, seed=2))
    randomize(model, seed=3).eval()
    generator = numpy.random.default_rng(4)
    ids, targets = (generator.integers(0, 11, (seq, batch)) for _ in range(2))
    expected = ref_gpt(ids, state(model), heads=3, layers=2, tied=tied)
    logits = model(backend.from_host(ids))
    assert logits.shape == (seq, batch, 11)
    assert max_error(logits, expected) <= EXACT
    log_probs = ref_softmax(expected)[numpy.arange(seq)[:, None], numpy.arange(batch), targets]
    assert max_error(model.loss(backend.from_host(ids), backend.from_host(targets)),
                     -numpy.log(log_probs).mean()) <= EXACT


def test_gpt_names_and_gpt2_init():
    layers = 8
    model = nn.GPT(nn.GPTConfig(vocab=50, seq_len=16, hidden=64, heads=4, layers=layers, seed=0, dtype=numpy.float64))
    names = [name for name, _ in model.named_parameters()]
    assert names[:2] == ["wte.weight", "wpe.weight"] and names[-3:] == ["ln_f.weight", "ln_f.bias", "lm_head.weight"]
    assert "blocks.7.mlp.fc2.weight" in names and len(model.blocks) == layers
    weights = state(model)
    residual = 0.02 / math.sqrt(2 * layers)
    for name, std in [("wte.weight", 0.02), ("blocks.3.attention.qkv.weight", 0.02),
                      ("blocks.3.attention.proj.weight", residual), ("blocks.3.mlp.fc2.weight", residual),
                      ("blocks.3.mlp.fc1.weight", 0.02), ("lm_head.weight", 0.02)]:
        assert abs(weights[name].std() / std - 1) < 0.1, name
    assert (weights["blocks.3.mlp.fc1.bias"] == 0).all() and (weights["blocks.0.ln1.weight"] == 1).all()
    tied = nn.GPT(nn.GPTConfig(vocab=50, seq_len=16, hidden=64, heads=4, layers=1, tie_embeddings=True))
    assert tied.lm_head is None and "lm_head.weight" not in dict(tied.named_parameters())


def test_gpt_rejects_a_sequence_longer_than_seq_len():
    model = nn.GPT(nn.GPTConfig(vocab=5, seq_len=3, hidden=4, heads=2, layers=1))
    with pytest.raises(ValueError, match="longer than the model's seq_len 3"):
        model(numpy.zeros((4, 1), dtype=numpy.int64))


def test_gpt_generate(device):
    model = nn.GPT(nn.GPTConfig(vocab=9, seq_len=4, hidden=8, heads=2, layers=1, dropout=0.5, dtype=numpy.float64, seed=5))
    randomize(model, seed=6, scale=1.0)
    prompt = backend.from_host(numpy.array([[1, 2], [3, 4]]))
    greedy = host(model.generate(prompt, steps=5))
    assert greedy.shape == (7, 2) and (greedy[:2] == host(prompt)).all() and model.training
    # greedy: each new token is the argmax of the logits for the tokens before it (last seq_len of them)
    model.eval()
    for position in range(2, 7):
        context = greedy[max(0, position - 4):position]
        logits = host(model(backend.from_host(context)))[-1]
        assert (greedy[position] == logits.argmax(axis=-1)).all()
    sampled = [host(model.generate(prompt, 5, temperature=1.0, rng=numpy.random.default_rng(7))) for _ in range(2)]
    assert (sampled[0] == sampled[1]).all() and sampled[0].min() >= 0 and sampled[0].max() < 9


# -- Module: names, state_dict, determinism, dtype -------------------------------------------------

def test_named_parameters_are_dotted_and_ordered():
    block = nn.TransformerBlock(4, 2, ffn_hidden=6)
    assert [name for name, _ in block.named_parameters()] == [
        "ln1.weight", "ln1.bias", "attention.qkv.weight", "attention.qkv.bias", "attention.proj.weight",
        "attention.proj.bias", "ln2.weight", "ln2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
        "mlp.fc2.weight", "mlp.fc2.bias"]
    assert all(p.is_parameter and p.requires_grad for p in block.parameters())
    assert nn.Linear(3, 2, bias=False).parameters()[0].shape == (3, 2)


def test_state_dict_round_trip(device):
    source = nn.GPT(nn.GPTConfig(vocab=7, seq_len=4, hidden=4, heads=2, layers=2, dtype=numpy.float64, seed=1))
    target = nn.GPT(nn.GPTConfig(vocab=7, seq_len=4, hidden=4, heads=2, layers=2, dtype=numpy.float64, seed=2))
    ids = backend.from_host(numpy.array([[1, 2], [3, 4]]))
    assert max_error(source(ids), target(ids)) > 1e-6  # different seeds: different weights
    saved = source.state_dict()
    target.load_state_dict({name: host(array) for name, array in saved.items()})  # from host arrays
    assert max_error(source(ids), target(ids)) == 0.0
    source.wte.weight.data[...] = 0  # the state dict holds copies
    assert (host(saved["wte.weight"]) != 0).any()


def test_load_state_dict_names_the_problem():
    model = nn.MLP(4, 6)
    good = model.state_dict()
    wrong_shape = dict(good, **{"fc2.weight": numpy.zeros((4, 6))})
    with pytest.raises(ValueError, match=r"'fc2.weight' has shape \(6, 4\), the state holds shape \(4, 6\)"):
        model.load_state_dict(wrong_shape)
    missing = {name: array for name, array in good.items() if name != "fc1.bias"}
    with pytest.raises(ValueError, match=r"missing parameters \['fc1.bias'\]"):
        model.load_state_dict(missing)
    with pytest.raises(ValueError, match=r"unexpected parameters \['fc3.weight'\]"):
        model.load_state_dict(dict(good, **{"fc3.weight": numpy.zeros(3)}))
    assert max_error(model.fc2.weight, good["fc2.weight"]) == 0.0  # nothing loaded on error


def test_same_seed_same_weights_on_every_backend(device):
    """Weights are drawn on the host: a GPU model starts from exactly the CPU model's weights."""
    here = state(nn.GPT(nn.GPTConfig(vocab=7, seq_len=4, hidden=4, heads=2, layers=1, seed=3)))
    backend.use("cpu")  # the device fixture restores the backend after the test
    on_cpu = state(nn.GPT(nn.GPTConfig(vocab=7, seq_len=4, hidden=4, heads=2, layers=1, seed=3)))
    other_seed = state(nn.GPT(nn.GPTConfig(vocab=7, seq_len=4, hidden=4, heads=2, layers=1, seed=4)))
    assert all((here[name] == on_cpu[name]).all() for name in on_cpu)
    assert any((other_seed[name] != on_cpu[name]).any() for name in on_cpu)


def test_zero_grad_and_module_registration():
    mlp = nn.MLP(3, 5, dtype=numpy.float64)
    mlp(make((2, 1, 3), 1)).sum().backward()
    assert all(p.grad is not None for p in mlp.parameters())
    mlp.zero_grad()
    assert all(p.grad is None for p in mlp.parameters())
    mlp.fc2 = None  # replacing a sub-module unregisters it
    assert [name for name, _ in mlp.named_parameters()] == ["fc1.weight", "fc1.bias"]
    layers = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 3)])
    assert len(layers) == 2 and layers[1].out_features == 3
    assert [name for name, _ in layers.named_parameters()][-1] == "1.bias"
    with pytest.raises(TypeError):
        layers.append("not a module")


def test_float32_model_stays_float32(device):
    model = nn.GPT(nn.GPTConfig(vocab=7, seq_len=4, hidden=4, heads=2, layers=1, dropout=0.1))
    ids = backend.from_host(numpy.array([[1, 2], [3, 4]]))
    loss = model.loss(ids, ids)
    loss.backward()
    assert loss.dtype == numpy.float32
    assert all(p.dtype == numpy.float32 and p.grad.dtype == numpy.float32 for p in model.parameters())


@pytest.mark.parametrize("field, value", [("vocab", 0), ("layers", -1), ("hidden", 2.5), ("heads", True),
                                          ("seq_len", None)])
def test_gpt_config_refuses_sizes_that_are_not_positive_integers(field, value):
    options = dict(vocab=8, seq_len=4, hidden=8, heads=2, layers=1)
    with pytest.raises(ValueError, match=f"{field} must be a positive integer"):
        nn.GPTConfig(**{**options, field: value})


def test_gpt_config_fills_in_its_defaults_and_checks_heads():
    config = nn.GPTConfig(vocab=8, seq_len=4, hidden=8, heads=2, layers=1, dropout=0.1, dtype=numpy.float64)
    assert (config.ffn_hidden, config.attention_dropout, config.dtype) == (32, 0.1, "float64")
    assert nn.GPT(config).config is config
    with pytest.raises(ValueError, match=r"heads \(3\) must divide hidden \(8\)"):
        nn.GPTConfig(vocab=8, seq_len=4, hidden=8, heads=3, layers=1)
