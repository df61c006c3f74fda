"""How would a PyTorch user write minitp's MLP, block and GPT step? (a part of ``speed.py``)

``speed_block.py`` and ``speed_mlp.py`` write PyTorch as minitp writes itself: ``x @ W + b`` with (in, out)
weights, attention by hand. A PyTorch user writes ``F.linear`` / ``nn.Linear`` -- (out, in) weights, one
``addmm`` with the bias fused into the GEMM -- ``F.scaled_dot_product_attention(is_causal=True)`` (a
fused kernel that never holds the s×s probabilities for backward), ``F.layer_norm`` (``nn.LayerNorm``),
``F.gelu(approximate="tanh")`` and ``F.cross_entropy``. That is the baseline minitp answers to: the
README's headline ratios are against it.

Same weights (minitp's, transposed once into (out, in) and made contiguous, as ``nn.Linear`` holds
them), same input and upstream gradient, same thread count: the same computation. ``float64_differences``
checks it: in float64 the idiomatic PyTorch output equals minitp's to ~1e-12.

On a GPU (``--device gpu``) the same functions run on CUDA, with TF32 off (``allow_tf32 = False``): full
float32 GEMMs, as CuPy's.
"""
import numpy

BLOCK_LINEARS = ("attention.qkv", "attention.proj", "mlp.fc1", "mlp.fc2")


def use_device(torch, device):
    """The torch device for minitp's ``device`` ("cpu" or "gpu"): on CUDA with TF32 off."""
    if device != "gpu":
        return torch.device("cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return torch.device("cuda")


def synchronizer(torch, device):
    """A function that waits for queued work of both minitp (CuPy) and PyTorch (CUDA): before each clock read."""
    from minitp import backend

    def synchronize():
        backend.synchronize()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return synchronize


def tensor(torch, array, device, requires_grad=False):
    from minitp import backend
    return torch.tensor(backend.to_host(array), device=device, requires_grad=requires_grad)


def leaves(torch, state, prefix, names, device):
    """{name: leaf}: minitp's parameters under ``prefix``; Linear weights (in, out) -> (out, in), contiguous."""
    out = {}
    for name in names:
        value = backend_host(state[prefix + name])
        if name.endswith(".weight") and any(name.startswith(linear) for linear in BLOCK_LINEARS + ("fc1", "fc2")):
            value = numpy.ascontiguousarray(value.T)  # nn.Linear's layout
        out[name] = torch.tensor(value, device=device, requires_grad=True)
    return out


def backend_host(array):
    from minitp import backend
    return backend.to_host(array)


# -- the modules, as a PyTorch user writes them -------------------------------------------------------

def block(torch, p, x, heads, dropout):
    """minitp's TransformerBlock (pre-LayerNorm, head-major fused qkv, causal, tanh GeLU) in idiomatic
    PyTorch, on (s, b, h) like minitp."""
    F = torch.nn.functional
    s, b, h = x.shape
    d = h // heads
    qkv = F.linear(F.layer_norm(x, (h,), p["ln1.weight"], p["ln1.bias"]), p["attention.qkv.weight"],
                   p["attention.qkv.bias"]).view(s, b, heads, 3, d)
    q, k, v = (part.permute(1, 2, 0, 3) for part in qkv.unbind(3))  # (b, a, s, d)
    context = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
    context = context.permute(2, 0, 1, 3).reshape(s, b, h)
    x = x + F.dropout(F.linear(context, p["attention.proj.weight"], p["attention.proj.bias"]), dropout)
    hidden = F.gelu(F.linear(F.layer_norm(x, (h,), p["ln2.weight"], p["ln2.bias"]), p["mlp.fc1.weight"],
                             p["mlp.fc1.bias"]), approximate="tanh")
    return x + F.dropout(F.linear(hidden, p["mlp.fc2.weight"], p["mlp.fc2.bias"]), dropout)


def mlp(torch, p, x):
    F = torch.nn.functional
    return F.linear(F.gelu(F.linear(x, p["fc1.weight"], p["fc1.bias"]), approximate="tanh"), p["fc2.weight"],
                    p["fc2.bias"])


GPT_OTHER = ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias", "lm_head.weight")


def gpt_loss(torch, blocks, other, inputs, targets, heads):
    F = torch.nn.functional
    seq = inputs.shape[0]
    x = F.embedding(inputs, other["wte.weight"]) + other["wpe.weight"][:seq, None, :]
    for p in blocks:
        x = block(torch, p, x, heads, 0.0)
    x = F.layer_norm(x, (x.shape[-1],), other["ln_f.weight"], other["ln_f.bias"])
    logits = F.linear(x, other["lm_head.weight"])  # the head's (V, h) weight
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


# -- steps to time --------------------------------------------------------------------------------------

def block_step(torch, module, x, heads, dropout, device):
    from speed_block import BLOCK_PARAMETERS
    p = leaves(torch, module.state_dict(), "", BLOCK_PARAMETERS, device)
    inputs = tensor(torch, x, device)
    upstream = torch.tensor(numpy.random.default_rng(0).standard_normal(x.shape).astype(x.dtype), device=device)

    def step():
        block(torch, p, inputs.clone().requires_grad_(), heads, dropout).backward(upstream)
        for leaf in p.values():
            leaf.grad = None
    return step, lambda: block(torch, p, inputs, heads, 0.0).detach().cpu().numpy()


def mlp_step(torch, module, x, upstream, device):
    p = leaves(torch, module.state_dict(), "", ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"), device)
    inputs, grad = tensor(torch, x, device), tensor(torch, upstream, device)

    def step():
        mlp(torch, p, inputs.clone().requires_grad_()).backward(grad)
        for leaf in p.values():
            leaf.grad = None
    return step, lambda: mlp(torch, p, inputs).detach().cpu().numpy()


def gpt_parameters(torch, model, layers, device):
    from speed_block import BLOCK_PARAMETERS
    state = model.state_dict()
    blocks = [leaves(torch, state, f"blocks.{i}.", BLOCK_PARAMETERS, device) for i in range(layers)]
    other = {name: torch.tensor(backend_host(state[name]), device=device, requires_grad=True) for name in GPT_OTHER}
    other["lm_head.weight"] = torch.tensor(numpy.ascontiguousarray(backend_host(state["lm_head.weight"]).T),
                                           device=device, requires_grad=True)  # (h, V) -> nn.Linear's (V, h)
    return blocks, other


def gpt_step(torch, model, ids, shape, device):
    """minitp's GPT (weights copied) trained one step with torch.optim.AdamW, written idiomatically."""
    blocks, other = gpt_parameters(torch, model, shape["layers"], device)
    optimizer = torch.optim.AdamW([leaf for p in blocks for leaf in p.values()] + list(other.values()),
                                  lr=1e-4, weight_decay=0.01)
    inputs, targets = torch.tensor(ids[:-1], device=device), torch.tensor(ids[1:], device=device)

    def step():
        loss = gpt_loss(torch, blocks, other, inputs, targets, shape["a"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss
    return step


# -- the same computation: float64 ---------------------------------------------------------------------

def float64_differences(torch):
    """{what: largest |idiomatic PyTorch - minitp|} in float64 on small shapes, random weights (LayerNorm's
    ones and zeros would hide a swapped weight and bias): ~1e-13 when both compute the same function."""
    from minitp import Tensor, no_grad
    from minitp.nn import GPT, MLP, GPTConfig, TransformerBlock
    rng = numpy.random.default_rng(0)
    cpu = torch.device("cpu")

    def randomize(module):
        for parameter in module.parameters():
            parameter.data[...] = 0.3 * rng.standard_normal(parameter.shape)
        return module
    differences = {}
    with no_grad():
        x = rng.standard_normal((200, 2, 24))  # s = 200 > 128: minitp's attention is blockwise here
        module = randomize(TransformerBlock(24, 3, dtype=numpy.float64, seed=2))
        p = leaves(torch, module.state_dict(), "", __import__("speed_block").BLOCK_PARAMETERS, cpu)
        differences["block (s=200)"] = float(numpy.abs(
            block(torch, p, torch.tensor(x), 3, 0.0).detach().numpy() - module(Tensor(x)).data).max())
        module = randomize(MLP(24, 96, dtype=numpy.float64, seed=3))
        p = leaves(torch, module.state_dict(), "", ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"), cpu)
        differences["MLP"] = float(numpy.abs(mlp(torch, p, torch.tensor(x)).detach().numpy()
                                             - module(Tensor(x)).data).max())
        model = randomize(GPT(GPTConfig(50, 16, 24, 3, 2, dtype=numpy.float64, seed=4)))
        ids = rng.integers(0, 50, (17, 2))
        blocks, other = gpt_parameters(torch, model, 2, cpu)
        expected = float(model.loss(ids[:-1], ids[1:]).data)
        loss = gpt_loss(torch, blocks, other, torch.tensor(ids[:-1]), torch.tensor(ids[1:]), 3)
        differences["GPT loss"] = abs(float(loss.detach()) - expected)
    return differences
