"""How fast is minitp's MLP, forward + backward, against PyTorch? (a part of ``speed.py``)

The transformer's MLP alone (b=4, s=256, h=512, ffn=2048, float32): fc1, tanh GeLU, fc2, as in
``minitp.nn.MLP``, against the same computation in PyTorch on the CPU (same weights, input, upstream
gradient and thread count), and against its six GEMMs replayed alone (``speed_blas.replay_gemms``): what
BLAS needs, whatever the engine does. Two thirds of a block's GEMM FLOPs are here, and GeLU's passes over
the (s, b, ffn) activations are the largest elementwise work of a block.
"""
import numpy

import harness
import speed_blas

MLP_SHAPE = dict(s=256, b=4, h=512, ffn=2048)
QUICK_MLP = dict(s=16, b=2, h=32, ffn=128)


def mlp_gemms(s, b, h, ffn):
    """fc1 and fc2 forward and backward: the MLP's rows of ``speed_blas.block_gemms``."""
    return [gemm for gemm in speed_blas.block_gemms(s, b, h, 1, ffn) if gemm[0].startswith("fc")]


def minitp_mlp_step(shape, dtype):
    """A function running one forward + backward of minitp's MLP, the MLP, its input and upstream grad."""
    from minitp import backend
    from minitp.autograd import Tensor
    from minitp.nn import MLP
    mlp = MLP(shape["h"], shape["ffn"], dtype=dtype, seed=1)
    rng = numpy.random.default_rng(0)
    x = backend.from_host(rng.standard_normal((shape["s"], shape["b"], shape["h"])).astype(dtype))
    upstream = backend.from_host(rng.standard_normal(x.shape).astype(dtype))

    def step():
        mlp(Tensor(x, requires_grad=True)).backward(upstream)
        mlp.zero_grad()
    return step, mlp, x, upstream


def torch_mlp_step(torch, mlp, x, upstream):
    """The same MLP in PyTorch, from minitp's weights ((in, out) layout, so x @ W + b as minitp)."""
    state = mlp.state_dict()
    p = {name: torch.tensor(numpy.asarray(state[name]), requires_grad=True)
         for name in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")}
    inputs, grad = torch.tensor(numpy.asarray(x)), torch.tensor(numpy.asarray(upstream))

    def forward(x):
        hidden = torch.nn.functional.gelu(x @ p["fc1.weight"] + p["fc1.bias"], approximate="tanh")
        return hidden @ p["fc2.weight"] + p["fc2.bias"]

    def step():
        forward(inputs.clone().requires_grad_()).backward(grad)
        for leaf in p.values():
            leaf.grad = None
    return step, lambda: forward(inputs).detach().numpy()


def mlp(args, torch, dtype, repeats):
    """minitp's MLP, its GEMMs alone and (with ``torch``) PyTorch's MLP, timed turn about; a profile."""
    from minitp import Tensor, backend, no_grad
    shape = QUICK_MLP if args.quick else MLP_SHAPE
    step, module, x, upstream = minitp_mlp_step(shape, dtype)
    result = {"mlp_shape": shape}
    steps = {"minitp_mlp": step, "mlp_gemm_replay": speed_blas.replay_gemms(backend.xp, mlp_gemms(**shape), dtype)}
    if torch is not None:
        import speed_torch
        steps["torch_mlp"], torch_forward = torch_mlp_step(torch, module, x, upstream)
        steps["torch_mlp_idiomatic"], idiomatic_forward = speed_torch.mlp_step(torch, module, x, upstream,
                                                                               torch.device("cpu"))
        with no_grad():
            expected = backend.to_host(module(Tensor(x)).data)
        result["mlp_max_difference"] = float(numpy.abs(torch_forward() - expected).max())
        result["mlp_idiomatic_max_difference"] = float(numpy.abs(idiomatic_forward() - expected).max())
    result.update(harness.interleaved_best(steps, repeats, synchronize=backend.synchronize))
    result["mlp_profile"] = speed_blas.profile(step, 10)
    return result


def target(r):
    """The speed target of the MLP, the block and the GPT step: forward + backward (and the optimizer
    step) in at most idiomatic PyTorch's CPU time, with the figures measured here (none without PyTorch)."""
    pairs = [(name, r.get(f"minitp{key}"), r.get(f"torch{key}_idiomatic"))
             for name, key in (("MLP", "_mlp"), ("block", ""), ("GPT step", "_gpt"))]
    ratios = [(name, ours / theirs) for name, ours, theirs in pairs if isinstance(theirs, float) and ours]
    if not ratios:
        return []
    met = all(ratio <= 1.0 for _, ratio in ratios)
    figures = ", ".join(f"{name} {ratio:.2f}" for name, ratio in ratios)
    from speed_block import torch_name
    return [f"- MLP, block and GPT step at most idiomatic PyTorch's time ({torch_name(r)}): minitp / PyTorch = "
            f"{figures} ({'met' if met else 'NOT met'})."]


def render(r):
    if "minitp_mlp" not in r:
        return []
    g, torch_time = r["mlp_shape"], r.get("torch_mlp_idiomatic")
    lines = [f"## The MLP, forward + backward: s={g['s']}, b={g['b']}, h={g['h']}, ffn={g['ffn']}, float32", ""]

    def ratio(seconds):
        return f"{seconds / torch_time:.2f}" if torch_time else "-"
    rows = [["minitp", harness.ms(r["minitp_mlp"]), ratio(r["minitp_mlp"]), ""],
            ["its GEMMs alone (numpy, same shapes)", harness.ms(r["mlp_gemm_replay"]), ratio(r["mlp_gemm_replay"]),
             "what BLAS needs, whatever the engine does"]]
    if torch_time:
        from speed_block import torch_name
        rows.append([f"{torch_name(r)}, idiomatic: F.linear (bias fused into addmm)", harness.ms(torch_time), "1.00",
                     f"largest difference of outputs {r['mlp_idiomatic_max_difference']:.1e}"])
        rows.append([f"{torch_name(r)}, written as minitp: x @ W + b", harness.ms(r["torch_mlp"]),
                     ratio(r["torch_mlp"]), f"largest difference of outputs {r['mlp_max_difference']:.1e}"])
    lines += [harness.table(["implementation", "ms / step", "× idiomatic PyTorch", "note"], rows, "lrrl"), ""]
    lines += ["minitp's MLP step, cProfile (own time per step):", ""]
    return lines + [harness.table(["function", "calls", "own ms", "share", "cumulative ms"], r["mlp_profile"]), ""]
