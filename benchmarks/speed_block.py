"""How fast is minitp's GPT block, and a small GPT training step, against PyTorch? (a part of ``speed.py``)

1. Forward + backward of one GPT-2 block (b=4, s=256, h=512, a=8, float32): minitp serial, with dropout
   and with selective or full recomputation, against the same block written in PyTorch on the CPU
   (same shapes, dtype, weights and thread count), as a ratio.
2. A small GPT training step (embeddings, blocks, LM head, cross-entropy, AdamW) both ways.

PyTorch is optional: without it the comparison rows say so. The block's shape is defined here and
shared with the strong-scaling part (``speed_scaling.py``), which times the same block on t ranks.
"""
import numpy

import harness

BLOCK = dict(s=256, b=4, h=512, a=8)
QUICK_BLOCK = dict(s=16, b=2, h=32, a=4)
GPT_SHAPE = dict(vocab=4096, s=128, b=4, h=256, a=8, layers=2)
QUICK_GPT = dict(vocab=64, s=8, b=2, h=16, a=2, layers=1)
DROPOUT = 0.1  # the "with dropout" rows


def block_shape(args):
    if args.block:
        return dict(zip("sbha", args.block))
    return QUICK_BLOCK if args.quick else BLOCK


# -- minitp ---------------------------------------------------------------------------------------

def minitp_block_step(shape, dtype, dropout, recompute=None):
    """A function running one forward + backward of a minitp block, and the block (for its weights)."""
    from minitp import backend
    from minitp.autograd import Tensor
    from minitp.nn import TransformerBlock
    block = TransformerBlock(shape["h"], shape["a"], dropout=dropout, attention_dropout=dropout, dtype=dtype, seed=1,
                             recompute=recompute)
    rng = numpy.random.default_rng(0)
    x = backend.from_host(rng.standard_normal((shape["s"], shape["b"], shape["h"])).astype(dtype))
    upstream = backend.from_host(rng.standard_normal(x.shape).astype(dtype))

    def step():
        tensor = Tensor(x, requires_grad=True)
        block(tensor).backward(upstream)
        block.zero_grad()
    return step, block, x


def minitp_variants(shape, dtype):
    """The block with dropout, and with selective and full recomputation: steps to time beside it."""
    return {"minitp_dropout": minitp_block_step(shape, dtype, DROPOUT)[0],
            "minitp_selective": minitp_block_step(shape, dtype, 0.0, "selective")[0],
            "minitp_full": minitp_block_step(shape, dtype, 0.0, "full")[0]}


def minitp_gpt_step(shape, dtype):
    from minitp.nn import GPT, AdamW, GPTConfig
    model = GPT(GPTConfig(shape["vocab"], shape["s"], shape["h"], shape["a"], shape["layers"], dtype=dtype, seed=1))
    optimizer = AdamW(model.parameters(), lr=1e-4)
    rng = numpy.random.default_rng(0)
    ids = rng.integers(0, shape["vocab"], (shape["s"] + 1, shape["b"]))

    def step():
        loss = model.loss(ids[:-1], ids[1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss
    return step, model, ids


# -- PyTorch, the same computation ------------------------------------------------------------------

BLOCK_PARAMETERS = ["ln1.weight", "ln1.bias", "attention.qkv.weight", "attention.qkv.bias", "attention.proj.weight",
                    "attention.proj.bias", "ln2.weight", "ln2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                    "mlp.fc2.weight", "mlp.fc2.bias"]


def import_torch(args, result):
    """PyTorch set to the same thread count, or None with the reason in ``result["torch"]``."""
    try:
        if args.no_torch:
            raise ImportError("--no-torch")
        import torch
    except ImportError as error:
        result["torch"] = f"PyTorch not used ({error}; pip install torch==2.13.0 for the comparison): skipped"
        return None
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    result["torch_version"] = torch.__version__
    result["torch_threads"] = torch.get_num_threads()
    return torch


def torch_name(r):
    """How a row names PyTorch: its version and threads (on a GPU: CUDA, TF32 off)."""
    threads = r["torch_threads"]
    where = "CUDA, TF32 off" if r.get("device") == "gpu" else f"{threads} CPU thread{'s' * (threads > 1)}"
    return f"PyTorch {r['torch_version']}, {where}"


def torch_block(torch, p, x, heads, dropout, fused_attention=False):
    """minitp's TransformerBlock in PyTorch: (s, b, h), weights (in, out), head-major fused qkv, causal,
    tanh GeLU; ``p`` maps minitp's parameter names (without a prefix) to torch leaves."""
    functional = torch.nn.functional
    s, b, h = x.shape
    d = h // heads
    normed = functional.layer_norm(x, (h,), p["ln1.weight"], p["ln1.bias"])
    qkv = (normed @ p["attention.qkv.weight"] + p["attention.qkv.bias"]).view(s, b, heads, 3, d)
    q, k, v = (part.permute(1, 2, 0, 3) for part in qkv.unbind(3))  # (b, a, s, d)
    if fused_attention:
        context = functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
    else:
        scores = (q * d ** -0.5) @ k.transpose(-1, -2)
        future = torch.ones(s, s, dtype=torch.bool).triu(1)
        probs = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
        context = functional.dropout(probs, dropout) @ v
    context = context.permute(2, 0, 1, 3).reshape(s, b, h)
    x = x + functional.dropout(context @ p["attention.proj.weight"] + p["attention.proj.bias"], dropout)
    normed = functional.layer_norm(x, (h,), p["ln2.weight"], p["ln2.bias"])
    hidden = functional.gelu(normed @ p["mlp.fc1.weight"] + p["mlp.fc1.bias"], approximate="tanh")
    return x + functional.dropout(hidden @ p["mlp.fc2.weight"] + p["mlp.fc2.bias"], dropout)


def torch_leaves(torch, module, prefix="", device=None):
    from minitp import backend
    return {name: torch.tensor(backend.to_host(module.state_dict()[prefix + name]), device=device, requires_grad=True)
            for name in BLOCK_PARAMETERS}


def torch_block_step(torch, block, x, heads, dropout, fused_attention=False, device=None):
    from minitp import backend
    p = torch_leaves(torch, block, device=device)
    inputs = torch.tensor(backend.to_host(x), device=device)
    upstream = torch.tensor(numpy.random.default_rng(0).standard_normal(x.shape).astype(x.dtype), device=device)

    def step():
        tensor = inputs.clone().requires_grad_()
        torch_block(torch, p, tensor, heads, dropout, fused_attention).backward(upstream)
        for leaf in p.values():
            leaf.grad = None
    return step, lambda: torch_block(torch, p, inputs, heads, 0.0, fused_attention).detach().cpu().numpy()


def torch_steps(torch, block, x, heads, result, device=None):
    """PyTorch's block written as minitp writes it (plain and with dropout) and as its users write it
    (``speed_torch``: F.linear, SDPA; plain and with dropout): steps to time beside minitp's. Records in
    ``result`` how far each PyTorch output is from minitp's (the same weights and input)."""
    import speed_torch
    from minitp import Tensor, backend, no_grad
    torch_step, torch_forward = torch_block_step(torch, block, x, heads, 0.0, device=device)
    idiomatic_step, idiomatic_forward = speed_torch.block_step(torch, block, x, heads, 0.0, device)
    with no_grad():
        minitp_output = backend.to_host(block(Tensor(x)).data)
    result["torch_max_difference"] = float(numpy.abs(torch_forward() - minitp_output).max())
    result["torch_idiomatic_max_difference"] = float(numpy.abs(idiomatic_forward() - minitp_output).max())
    return {"torch": torch_step, "torch_idiomatic": idiomatic_step,
            "torch_dropout": torch_block_step(torch, block, x, heads, DROPOUT, device=device)[0],
            "torch_idiomatic_dropout": speed_torch.block_step(torch, block, x, heads, DROPOUT, device)[0]}


def torch_gpt_step(torch, model, ids, shape):
    """minitp's GPT (weights copied) trained one step with torch.optim.AdamW, as minitp does."""
    state = model.state_dict()
    blocks = [{name: torch.tensor(numpy.asarray(state[f"blocks.{i}.{name}"]), requires_grad=True)
               for name in BLOCK_PARAMETERS} for i in range(shape["layers"])]
    other = {name: torch.tensor(numpy.asarray(state[name]), requires_grad=True)
             for name in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias", "lm_head.weight")}
    leaves = [leaf for block in blocks for leaf in block.values()] + list(other.values())
    optimizer = torch.optim.AdamW(leaves, lr=1e-4, weight_decay=0.01)
    inputs, targets = torch.tensor(ids[:-1]), torch.tensor(ids[1:])

    def step():
        x = other["wte.weight"][inputs] + other["wpe.weight"][torch.arange(shape["s"])][:, None, :]
        for p in blocks:
            x = torch_block(torch, p, x, shape["a"], 0.0)
        x = torch.nn.functional.layer_norm(x, (shape["h"],), other["ln_f.weight"], other["ln_f.bias"])
        logits = x @ other["lm_head.weight"]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, shape["vocab"]), targets.reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss
    return step


def gpt(args, torch, dtype, repeats):
    """The GPT training step, minitp and (with ``torch``) PyTorch from the same weights, timed turn about."""
    gpt_shape = QUICK_GPT if args.quick else GPT_SHAPE
    result = {"gpt_shape": gpt_shape}
    gpt_step, model, ids = minitp_gpt_step(gpt_shape, dtype)
    steps = {"minitp_gpt": gpt_step}
    if torch is not None:
        import speed_torch
        steps["torch_gpt"] = torch_gpt_step(torch, model, ids, gpt_shape)
        steps["torch_gpt_idiomatic"] = speed_torch.gpt_step(torch, model, ids, gpt_shape, torch.device("cpu"))
        # the same model from the same weights: the first step's losses agree (float32 rounding apart)
        result["gpt_losses"] = [float(gpt_step().data), float(steps["torch_gpt"]().detach()),
                                float(steps["torch_gpt_idiomatic"]().detach())]
    result.update(harness.interleaved_best(steps, repeats))
    return result


# -- the report -------------------------------------------------------------------------------------

def _torch_time(r):
    return r.get("torch") if isinstance(r.get("torch"), float) else None


def target(r):
    """The speed target for the block, with the figure measured here (none without PyTorch)."""
    if not _torch_time(r):
        return []
    ratio = r["minitp"] / r["torch_idiomatic"]
    limit = 1.0
    return [f"- Block forward+backward at most idiomatic PyTorch's time ({torch_name(r)}): minitp / PyTorch = "
            f"{ratio:.2f} ({'met' if ratio <= limit else 'NOT met'}); against PyTorch written as minitp "
            f"{r['minitp'] / r['torch']:.2f}."]


def render_heading(r):
    shape = r["shape"]
    return [f"## One GPT block, forward + backward: s={shape['s']}, b={shape['b']}, h={shape['h']}, "
            f"a={shape['a']}, float32", ""]


def render_table(r):
    """minitp's block and its variants, its GEMMs alone, and PyTorch's: time, ratio to PyTorch, FLOP/s
    and the share of the machine's GEMM rate (``r["flops"]``, ``r["machine_gemm"]`` from speed_blas)."""
    flops, peak = r["flops"], r["machine_gemm"]
    torch_time = r.get("torch_idiomatic") if _torch_time(r) else None  # the ratio: against idiomatic PyTorch
    rows = []

    def row(name, seconds, note=""):
        ratio = f"{seconds / torch_time:.2f}" if torch_time else "-"
        rows.append([name, harness.ms(seconds), ratio, harness.rate(flops / seconds),
                     f"{100 * flops / seconds / peak:.0f}%", note])
    row("minitp", r["minitp"])
    row("its GEMMs alone (numpy, same shapes)", r["gemm_replay"], "what BLAS needs, whatever the engine does")
    row(f"minitp, dropout {DROPOUT}", r["minitp_dropout"], "masks from minitp.rng's counter-based hash")
    row("minitp, selective recomputation", r["minitp_selective"],
        f"{100 * (r['minitp_selective'] / r['minitp'] - 1):+.0f}%: the attention core runs twice")
    row("minitp, full recomputation", r["minitp_full"],
        f"{100 * (r['minitp_full'] / r['minitp'] - 1):+.0f}%: the whole forward runs twice")
    if torch_time:
        name = torch_name(r)
        row(f"{name}, idiomatic: F.linear, SDPA(is_causal)", r["torch_idiomatic"],
            f"largest difference of outputs {r['torch_idiomatic_max_difference']:.1e}")
        row(f"{name}, idiomatic, dropout {DROPOUT}", r["torch_idiomatic_dropout"])
        row(f"{name}, written as minitp: x @ W + b, attention by hand", r["torch"],
            f"largest difference of outputs {r['torch_max_difference']:.1e}")
        row(f"{name}, as minitp, dropout {DROPOUT}", r["torch_dropout"])
    return [harness.table(["implementation", "ms / step", "× idiomatic PyTorch", "FLOP/s", "of GEMM rate", "note"],
                          rows, "lrrrrl"), ""]


def render_no_torch(r):
    return [] if _torch_time(r) else [f"PyTorch comparison: {r.get('torch', 'not run')}.", ""]


def render_gpt(r):
    if "minitp_gpt" not in r:
        return []
    g = r["gpt_shape"]
    lines = [f"## A small GPT training step: vocab={g['vocab']}, s={g['s']}, b={g['b']}, h={g['h']}, "
             f"a={g['a']}, layers={g['layers']}, float32, AdamW", ""]
    gpt_rows = [["minitp", harness.ms(r["minitp_gpt"]), "-"]]
    if _torch_time(r):
        minitp_loss, torch_loss, idiomatic_loss = r["gpt_losses"]
        gpt_rows[0][2] = f"first loss {minitp_loss:.6f}"
        gpt_rows.append([f"{torch_name(r)}, idiomatic (F.linear, SDPA, F.cross_entropy)",
                         harness.ms(r["torch_gpt_idiomatic"]), f"minitp / PyTorch = "
                         f"{r['minitp_gpt'] / r['torch_gpt_idiomatic']:.2f}; first loss {idiomatic_loss:.6f}"])
        gpt_rows.append([f"{torch_name(r)}, written as minitp", harness.ms(r["torch_gpt"]),
                         f"minitp / PyTorch = {r['minitp_gpt'] / r['torch_gpt']:.2f}; first loss {torch_loss:.6f}"])
    return lines + [harness.table(["implementation", "ms / step", "note"], gpt_rows, "lrl"), ""]
