"""Speed: one GPT block against PyTorch and against the machine's GEMM rate; strong scaling over tensor-
parallel ranks; MPI all-reduce bandwidth.

1. Forward + backward of one GPT-2 block (b=4, s=256, h=512, a=8, float32): minitp serial against the
   same block written in PyTorch on the CPU (same shapes, dtype, weights and thread count), as a ratio.
   Also a small GPT training step (embeddings, blocks, LM head, cross-entropy, AdamW) both ways.
2. Where minitp's time goes: the block's GEMMs replayed alone with numpy at the same shapes (the share
   of the step that BLAS needs, whatever the engine does), the FLOP/s minitp achieves, and the machine's
   GEMM FLOP/s on big squares -- the limit for this work. A cProfile of the step names the rest.
3. Strong scaling: the same block with tensor parallelism (and with TP+SP) on t = 1, 2, 4 ranks, one
   BLAS thread per rank (``mpiexec -n t``); time per step and speedup.
4. ``dist.all_reduce`` bandwidth against message size on 2 and 4 ranks.

Run: ``python benchmarks/speed.py`` (``--quick``: tiny sizes, a smoke test). PyTorch is optional: without
it the comparison rows say so. ``--device gpu`` times the block with CuPy against the GPU's FP32 peak
(see ``benchmarks/gpu_check.sh``). Writes ``benchmarks/results/speed.md`` and ``speed.png``.
"""
import argparse
import cProfile
import io
import math
import os
import pstats
import sys
from pathlib import Path

import numpy

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

BLOCK = dict(s=256, b=4, h=512, a=8)
QUICK_BLOCK = dict(s=16, b=2, h=32, a=4)
GPT_SHAPE = dict(vocab=4096, s=128, b=4, h=256, a=8, layers=2)
QUICK_GPT = dict(vocab=64, s=8, b=2, h=16, a=2, layers=1)
DROPOUT = 0.1  # the "with dropout" rows


# -- what a block computes, in GEMMs --------------------------------------------------------------

def block_gemms(s, b, h, a, ffn=None):
    """The GEMMs of one block's forward and backward as (name, batch shape, m, k, n): forward C = A B with
    A (m, k), B (k, n); backward dA = dC Bᵀ and dB = Aᵀ dC, the same FLOPs each."""
    ffn, d, tokens = ffn or 4 * h, h // a, s * b
    forward = [("qkv", (), tokens, h, 3 * h), ("q kᵀ", (b, a), s, d, s), ("probs v", (b, a), s, s, d),
               ("proj", (), tokens, h, h), ("fc1", (), tokens, h, ffn), ("fc2", (), tokens, ffn, h)]
    gemms = []
    for name, batch, m, k, n in forward:
        gemms += [(name, batch, m, k, n), (f"{name}: dA", batch, m, n, k), (f"{name}: dB", batch, k, m, n)]
    return gemms


def gemm_flops(gemms):
    return sum(2 * math.prod(batch) * m * k * n for _, batch, m, k, n in gemms)


def replay_gemms(xp, gemms, dtype):
    """A function running ``gemms`` alone, back to back: what BLAS needs for the step, whatever the
    engine does. Operands are laid out as minitp's backward has them: Bᵀ and Aᵀ are transposed views."""
    operands = []
    rng = numpy.random.default_rng(0)
    for name, batch, m, k, n in gemms:
        def make(*shape):
            return xp.asarray(rng.standard_normal(batch + shape).astype(dtype))
        if name.endswith("dA"):  # dC (m, k) @ Bᵀ: the forward's B, stored (k', n'), read transposed
            left, right = make(m, k), xp.swapaxes(make(n, k), -1, -2)
        elif name.endswith("dB"):  # Aᵀ dC: the forward's A, stored (m', k'), read transposed
            left, right = xp.swapaxes(make(k, m), -1, -2), make(k, n)
        else:
            left, right = make(m, k), make(k, n)
        if not batch:  # minitp folds (s, b) into one GEMM: plain 2-D operands
            left, right = left.reshape(m, k), right.reshape(k, n)
        operands.append((left, right))
    return lambda: [left @ right for left, right in operands]


def big_square_gemm(xp, dtype, size):
    """A function running one (size x size) @ (size x size) GEMM: its FLOP/s, 2 size^3 / time, is the
    machine's ceiling for matrix work at this thread count."""
    rng = numpy.random.default_rng(0)
    left, right = (xp.asarray(rng.standard_normal((size, size)).astype(dtype)) for _ in range(2))
    return lambda: left @ right


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


def page_faults_per_step(step, steps=3):
    """Minor page faults per call of ``step``: each is a page the kernel had to map (and zero) because
    memory freed earlier went back to the kernel -- glibc returns large blocks (numpy's big temporaries)
    with munmap, so the next temporary of that size is faulted in afresh. None where not measurable."""
    try:
        import resource
    except ImportError:
        return None
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / steps


def _qualified(path, line, function):
    """``module.Class.function`` for a function defined at ``line`` of ``path`` (pstats keeps only the
    bare name: every op's method is called ``forward`` or ``backward``)."""
    if not line or not path.endswith(".py"):
        return function
    try:
        source = Path(path).read_text().splitlines()[:line]
    except OSError:
        return function
    owner = ""
    if source and source[-1].startswith((" ", "\t")):  # a method: find the class above it
        for text in reversed(source):
            if text.startswith("class "):
                owner = text[len("class "):].split("(")[0].split(":")[0] + "."
                break
    return f"{Path(path).stem}.{owner}{function}"


def profile(step, top):
    """The ``top`` functions by own time over three steps, as markdown rows."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(3):
        step()
    profiler.disable()
    stats = pstats.Stats(profiler, stream=io.StringIO())
    total = stats.total_tt
    rows = []
    by_own_time = sorted(stats.stats.items(), key=lambda item: -item[1][2])[:top]
    for (path, line, function), (_, calls, own, cumulative, _) in by_own_time:
        rows.append([_qualified(path, line, function).replace("|", "/"), calls // 3, f"{1e3 * own / 3:.1f}",
                     f"{100 * own / total:.1f}%", f"{1e3 * cumulative / 3:.1f}"])
    return rows


# -- PyTorch, the same computation ------------------------------------------------------------------

BLOCK_PARAMETERS = ["ln1.weight", "ln1.bias", "attention.qkv.weight", "attention.qkv.bias", "attention.proj.weight",
                    "attention.proj.bias", "ln2.weight", "ln2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                    "mlp.fc2.weight", "mlp.fc2.bias"]


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


def torch_leaves(torch, module, prefix=""):
    return {name: torch.tensor(numpy.asarray(module.state_dict()[prefix + name]), requires_grad=True)
            for name in BLOCK_PARAMETERS}


def torch_block_step(torch, block, x, heads, dropout, fused_attention=False):
    p = torch_leaves(torch, block)
    inputs = torch.tensor(numpy.asarray(x))
    upstream = torch.tensor(numpy.random.default_rng(0).standard_normal(x.shape).astype(x.dtype))

    def step():
        tensor = inputs.clone().requires_grad_()
        torch_block(torch, p, tensor, heads, dropout, fused_attention).backward(upstream)
        for leaf in p.values():
            leaf.grad = None
    return step, lambda: torch_block(torch, p, inputs, heads, 0.0, fused_attention).detach().numpy()


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


# -- the serial part --------------------------------------------------------------------------------

def serial(args):
    """Everything that runs in this process: the block and GPT step, the GEMM replay, the profile."""
    from threadpoolctl import threadpool_limits

    from minitp import backend
    if args.device == "gpu":
        backend.use("gpu")
    xp = backend.xp
    threadpool_limits(args.threads, user_api="blas")  # for the rest of this process
    shape = block_shape(args)
    repeats = 1 if args.quick else args.repeats
    dtype = numpy.float32
    sync = backend.synchronize
    result = {"threads": args.threads, "device": args.device, "shape": shape, "repeats": repeats}

    gemms = block_gemms(**shape)
    result["flops"] = gemm_flops(gemms)
    result["gemm_size"] = 256 if args.quick else args.gemm_size

    # Everything compared is timed round-robin (harness.interleaved_best): the same load for each.
    step, block, x = minitp_block_step(shape, dtype, 0.0)
    steps = {"minitp": step, "gemm_replay": replay_gemms(xp, gemms, dtype),
             "big_square_gemm": big_square_gemm(xp, dtype, result["gemm_size"]),
             "minitp_dropout": minitp_block_step(shape, dtype, DROPOUT)[0],
             "minitp_selective": minitp_block_step(shape, dtype, 0.0, "selective")[0],
             "minitp_full": minitp_block_step(shape, dtype, 0.0, "full")[0]}
    torch = None if args.device == "gpu" else import_torch(args, result)
    if torch is not None:
        torch_step, torch_forward = torch_block_step(torch, block, x, shape["a"], 0.0)
        from minitp import Tensor, no_grad
        with no_grad():
            minitp_output = block(Tensor(x)).data
        result["torch_max_difference"] = float(numpy.abs(torch_forward() - minitp_output).max())
        steps.update(torch=torch_step, torch_sdpa=torch_block_step(torch, block, x, shape["a"], 0.0, True)[0],
                     torch_dropout=torch_block_step(torch, block, x, shape["a"], DROPOUT)[0])
    result.update(harness.interleaved_best(steps, repeats, synchronize=sync))
    result["machine_gemm"] = 2 * result["gemm_size"] ** 3 / result.pop("big_square_gemm")
    result["faults"] = {"minitp": page_faults_per_step(step)}
    if torch is not None:
        result["faults"]["PyTorch"] = page_faults_per_step(steps["torch"])
    result["profile"] = profile(step, 14)
    if args.device == "gpu":
        result["gpu"] = gpu_description()
        return result

    gpt_shape = QUICK_GPT if args.quick else GPT_SHAPE
    result["gpt_shape"] = gpt_shape
    gpt_step, model, ids = minitp_gpt_step(gpt_shape, dtype)
    steps = {"minitp_gpt": gpt_step}
    if torch is not None:
        steps["torch_gpt"] = torch_gpt_step(torch, model, ids, gpt_shape)
        # the same model from the same weights: the first step's losses agree (float32 rounding apart)
        result["gpt_losses"] = [float(gpt_step().data), float(steps["torch_gpt"]().detach())]
    result.update(harness.interleaved_best(steps, repeats))
    return result


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
    return torch


def block_shape(args):
    if args.block:
        return dict(zip("sbha", args.block))
    return QUICK_BLOCK if args.quick else BLOCK


def gpu_description():
    """The GPU's name and its FP32 peak: SMs x FP32 lanes per SM x 2 (an FMA) x clock."""
    import cupy
    properties = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    major, minor = properties["major"], properties["minor"]
    # FP32 lanes per SM: Volta and A100 64; consumer Ampere, Ada and Hopper 128
    lanes = {(7, 0): 64, (7, 5): 64, (8, 0): 64}.get((major, minor), 128)
    peak = properties["multiProcessorCount"] * lanes * 2 * properties["clockRate"] * 1e3
    name = properties["name"].decode() if isinstance(properties["name"], bytes) else properties["name"]
    return {"name": name, "compute_capability": f"{major}.{minor}", "fp32_peak": peak}


# -- MPI workers ------------------------------------------------------------------------------------

def scaling_worker(args):
    """Time the TP (and TP+SP) block on all the world's ranks, one tensor-parallel group."""
    from mpi4py import MPI

    from minitp import backend, dist
    from minitp.autograd import Tensor
    from minitp.nn import TransformerBlock
    from minitp.parallel import ParallelTransformerBlock
    if args.device == "gpu":
        backend.use("gpu")
    mesh = dist.init(tp=MPI.COMM_WORLD.size)
    shape = block_shape(args)
    repeats = 1 if args.quick else args.repeats
    s, b, h, a = shape["s"], shape["b"], shape["h"], shape["a"]
    rng = numpy.random.default_rng(0)
    x_full = rng.standard_normal((s, b, h)).astype(numpy.float32)
    upstream_full = rng.standard_normal((s, b, h)).astype(numpy.float32)

    def timed(block, cut):
        x, upstream = backend.from_host(cut(x_full)), backend.from_host(cut(upstream_full))

        def step():
            block(Tensor(x, requires_grad=True)).backward(upstream)
            block.zero_grad()
        return step

    def whole(array):
        return array

    def shard(array):
        return numpy.ascontiguousarray(dist.split(array, mesh.tp, 0))

    steps = {}
    if mesh.tp_size == 1:  # the reference: the plain serial block, in the same conditions
        steps["serial"] = timed(TransformerBlock(h, a, dtype=numpy.float32), whole)
    for label, sequence_parallel in (("TP", False), ("TP+SP", True)):
        steps[label] = timed(ParallelTransformerBlock(h, a, dtype=numpy.float32, sequence_parallel=sequence_parallel,
                                                      group=mesh.tp), shard if sequence_parallel else whole)

    def barrier():  # a step ends when its slowest rank ends
        backend.synchronize()
        MPI.COMM_WORLD.Barrier()
    times = harness.interleaved_best(steps, repeats, synchronize=barrier)
    return {"t": mesh.tp_size, "times": times}


def allreduce_worker(args):
    """Seconds per ``dist.all_reduce`` of each message size on the world's ranks (float32)."""
    from mpi4py import MPI

    from minitp import backend, dist
    if args.device == "gpu":
        backend.use("gpu")
    mesh = dist.init(tp=MPI.COMM_WORLD.size)
    world = MPI.COMM_WORLD
    sizes = [2 ** k for k in (range(10, 17, 3) if args.quick else range(10, 27, 2))]
    times = {}
    for size in sizes:
        buffer = backend.xp.ones(size // 4, dtype=numpy.float32)
        count = 2 if args.quick else max(3, min(300, 2 ** 24 // size))
        best = float("inf")
        for _ in range(1 if args.quick else 3):
            world.Barrier()
            start = MPI.Wtime()
            for _ in range(count):
                dist.all_reduce(buffer, mesh.tp)
            backend.synchronize()
            world.Barrier()
            best = min(best, (MPI.Wtime() - start) / count)
        times[size] = best
    return {"n": world.size, "transport": dist.transport(), "times": times}


def worker(args):
    """One launch per rank count runs every task asked of that count; rank 0 reports them all."""
    from mpi4py import MPI
    results = {task: {"scaling": scaling_worker, "allreduce": allreduce_worker}[task](args) for task in args.task}
    if MPI.COMM_WORLD.rank == 0:
        harness.report(results)


# -- the report -----------------------------------------------------------------------------------

def ms(seconds):
    return f"{1e3 * seconds:,.1f}"


def rate(value):
    return f"{value / 1e9:,.1f} G"


def render(serial_result, scaling, bandwidth, out, command):
    r = serial_result
    shape = r["shape"]
    flops, peak = r["flops"], r["machine_gemm"]
    lines = ["# Speed", "", f"Measured {harness.machine()}; {r['threads']} BLAS/PyTorch thread(s) in the serial "
             f"part, one per rank under MPI. Best of {r['repeats']} runs after a warm-up (the fastest run: "
             "noise on a shared machine only adds time).", "",
             f"Reproduce: `{command}`", ""]
    lines += targets(r, scaling)
    if r["device"] == "gpu":
        gpu = r["gpu"]
        lines += [f"GPU: {gpu['name']} (compute capability {gpu['compute_capability']}), FP32 peak "
                  f"{rate(gpu['fp32_peak'])}FLOP/s (SMs × FP32 lanes × 2 × clock).", ""]
    lines += [f"## One GPT block, forward + backward: s={shape['s']}, b={shape['b']}, h={shape['h']}, "
              f"a={shape['a']}, float32", "",
              f"{flops / 1e9:.2f} GFLOP per step in GEMMs (72sbh² + 12s²bh: every GEMM of the forward, twice "
              f"more in backward). The machine's GEMM rate: {rate(peak)}FLOP/s "
              f"({r['gemm_size']}² float32 squares, numpy{'/CuPy' if r['device'] == 'gpu' else ''}).", ""]
    torch_time = r.get("torch") if isinstance(r.get("torch"), float) else None
    rows = []

    def row(name, seconds, note=""):
        ratio = f"{seconds / torch_time:.2f}" if torch_time else "-"
        rows.append([name, ms(seconds), ratio, rate(flops / seconds), f"{100 * flops / seconds / peak:.0f}%", note])
    row("minitp", r["minitp"])
    row("its GEMMs alone (numpy, same shapes)", r["gemm_replay"], "what BLAS needs, whatever the engine does")
    row(f"minitp, dropout {DROPOUT}", r["minitp_dropout"], "masks from minitp.rng's counter-based hash")
    row("minitp, selective recomputation", r["minitp_selective"],
        f"{100 * (r['minitp_selective'] / r['minitp'] - 1):+.0f}%: the attention core runs twice")
    row("minitp, full recomputation", r["minitp_full"],
        f"{100 * (r['minitp_full'] / r['minitp'] - 1):+.0f}%: the whole forward runs twice")
    if torch_time:
        row(f"PyTorch {r['torch_version']} CPU, the same ops", r["torch"],
            f"max |difference| of outputs {r['torch_max_difference']:.1e}")
        row("PyTorch, fused scaled_dot_product_attention", r["torch_sdpa"])
        row(f"PyTorch, dropout {DROPOUT}", r["torch_dropout"])
    lines += [harness.table(["implementation", "ms / step", "× PyTorch", "FLOP/s", "of GEMM rate", "note"], rows,
                            "lrrrrl"), ""]
    share = r["gemm_replay"] / r["minitp"]
    lines += [f"BLAS share: the GEMMs alone take {100 * share:.0f}% of minitp's step; the other "
              f"{100 * (1 - share):.0f}% is elementwise work (LayerNorm, softmax, GeLU, the causal mask, residual "
              "and bias additions), gradient accumulation and the engine's Python.", ""]
    if not torch_time:
        lines += [f"PyTorch comparison: {r.get('torch', 'not run')}.", ""]
    faults = {name: count for name, count in r.get("faults", {}).items() if count is not None}
    if faults:
        lines += ["Page faults per step (pages the kernel maps afresh, zeroing each): " +
                  ", ".join(f"{name} {count:,.0f}" for name, count in faults.items()) +
                  ". glibc hands freed blocks above its mmap threshold back to the kernel, so every large "
                  "temporary is faulted in again on its next allocation. "
                  "`MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824` in the environment keeps "
                  "them in the heap (about 7× fewer faults for this block on the 2-core machine this bench was "
                  "written on); PyTorch, loaded in the same process, frees large blocks too, which raises glibc's "
                  "dynamic threshold and can make minitp faster here than in a process of its own (the scaling "
                  "launches).", ""]
    if "minitp_gpt" in r:
        g = r["gpt_shape"]
        lines += [f"## A small GPT training step: vocab={g['vocab']}, s={g['s']}, b={g['b']}, h={g['h']}, "
                  f"a={g['a']}, layers={g['layers']}, float32, AdamW", ""]
        gpt_rows = [["minitp", ms(r["minitp_gpt"]), "-"]]
        if torch_time:
            minitp_loss, torch_loss = r["gpt_losses"]
            gpt_rows[0][2] = f"first loss {minitp_loss:.6f}"
            gpt_rows.append([f"PyTorch {r['torch_version']}", ms(r["torch_gpt"]),
                             f"minitp / PyTorch = {r['minitp_gpt'] / r['torch_gpt']:.2f}; first loss {torch_loss:.6f}"])
        lines += [harness.table(["implementation", "ms / step", "note"], gpt_rows, "lrl"), ""]
    lines += ["## Where minitp's time goes (cProfile, per step)", "",
              "Own time of each function; a GEMM's time shows up in the Python function that runs the `@`.", "",
              harness.table(["function", "calls", "own ms", "share", "cumulative ms"], r["profile"], "lrrrr"), ""]
    if scaling:
        lines += ["## Strong scaling: the block with tensor parallelism, one BLAS thread per rank", "",
                  "`mpiexec -n t`, the same block and size, t ranks in one tensor-parallel group; a step ends when "
                  "its slowest rank does (a barrier). Speedup against the plain serial `TransformerBlock`, timed "
                  "in the t = 1 launch, turn about with the t = 1 TP and TP+SP blocks.", ""]
        serial_time = next((e["times"]["serial"] for e in scaling if "serial" in e["times"]), None)
        labels = ["TP", "TP+SP"]
        rows = []
        for entry in scaling:
            cells = [entry["t"]]
            for label in labels:
                seconds = entry["times"][label]
                speedup = f" ({serial_time / seconds:.2f}×)" if serial_time else ""
                cells.append(f"{ms(seconds)} ms{speedup}")
            rows.append(cells)
        if serial_time:
            rows.insert(0, ["serial", f"{ms(serial_time)} ms (1.00×)", ""])
        lines += [harness.table(["t"] + [f"{label}: ms / step (speedup)" for label in labels], rows, "rrr"), ""]
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        oversubscribed = [entry["t"] for entry in scaling if entry["t"] > cores]
        if oversubscribed:
            lines += [f"t = {', '.join(map(str, oversubscribed))} runs more ranks than this machine's {cores} "
                      "cores: those ranks share cores, so the time there measures contention, not scaling.", ""]
    if bandwidth:
        lines += ["## all-reduce bandwidth (`minitp.dist.all_reduce`, float32)", "",
                  "Bus bandwidth = 2(n-1)/n · S / time: the bytes each rank sends in a ring all-reduce, per second "
                  "(comparable across n).", ""]
        sizes = sorted({int(size) for entry in bandwidth for size in entry["times"]})
        header = ["message"] + [f"n={e['n']}: time µs, bus GB/s ({e['transport']})" for e in bandwidth]
        rows = []
        for size in sizes:
            cells = [harness.human_bytes(size)]
            for entry in bandwidth:
                seconds = entry["times"].get(str(size))
                n = entry["n"]
                cells.append("-" if seconds is None else
                             f"{1e6 * seconds:,.1f} µs, {2 * (n - 1) / n * size / seconds / 1e9:.2f} GB/s")
            rows.append(cells)
        lines += [harness.table(header, rows, "l" + "r" * len(bandwidth)), ""]
    plot(scaling, bandwidth, out, lines)
    return "\n".join(lines)


def targets(r, scaling):
    """The issue's two speed targets, with the figures measured here."""
    lines = []
    if isinstance(r.get("torch"), float):
        ratio = r["minitp"] / r["torch"]
        lines.append(f"- Block forward+backward within 1.5× of PyTorch's CPU time: minitp / PyTorch = {ratio:.2f} "
                     f"({'met' if ratio <= 1.5 else 'NOT met'}).")
    serial_time = next((e["times"]["serial"] for e in scaling if "serial" in e["times"]), None)
    two = next((e for e in scaling if e["t"] == 2), None)
    if serial_time and two:
        speedups = {label: serial_time / two["times"][label] for label in ("TP", "TP+SP")}
        met = all(value >= 1.6 for value in speedups.values())
        lines.append(f"- t = 2 at least 1.6× faster than serial, one thread per rank: TP {speedups['TP']:.2f}×, "
                     f"TP+SP {speedups['TP+SP']:.2f}× ({'met' if met else 'NOT met'}).")
    return (["## Targets", ""] + lines + [""]) if lines else []


def plot(scaling, bandwidth, out, lines):
    if not scaling and not bandwidth:
        return
    plt = harness.pyplot()
    if plt is None:
        return
    panels = (2 if scaling else 0) + (1 if bandwidth else 0)
    figure, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2), squeeze=False)
    axes = list(axes[0])
    if scaling:
        ts = [entry["t"] for entry in scaling]
        time_axis, speedup_axis = axes.pop(0), axes.pop(0)
        reference = next((e["times"]["serial"] for e in scaling if "serial" in e["times"]), scaling[0]["times"]["TP"])
        for label in ("TP", "TP+SP"):
            times = [entry["times"][label] for entry in scaling]
            time_axis.plot(ts, [1e3 * t for t in times], "o-", label=label)
            speedup_axis.plot(ts, [reference / t for t in times], "o-", label=label)
        time_axis.plot(ts, [1e3 * reference / t for t in ts], "k--", lw=1, label="ideal (serial / t)")
        speedup_axis.plot(ts, ts, "k--", lw=1, label="ideal")
        time_axis.set(xlabel="tensor-parallel ranks t", ylabel="ms per forward+backward", xticks=ts,
                      title="strong scaling: time per step")
        speedup_axis.set(xlabel="tensor-parallel ranks t", ylabel="speedup over the serial block", xticks=ts,
                         title="strong scaling: speedup")
        for axis in (time_axis, speedup_axis):
            axis.grid(alpha=0.3)
            axis.legend()
    if bandwidth:
        axis = axes.pop(0)
        for entry in bandwidth:
            n = entry["n"]
            sizes = sorted(int(size) for size in entry["times"])
            axis.plot(sizes, [2 * (n - 1) / n * s / entry["times"][str(s)] / 1e9 for s in sizes], "o-", label=f"n={n}")
        axis.set(xscale="log", xlabel="message size (bytes)", ylabel="bus bandwidth (GB/s)",
                 title="dist.all_reduce bandwidth")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(Path(out) / "speed.png", dpi=110)
    plt.close(figure)
    lines += ["![scaling and bandwidth](speed.png)", ""]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: a smoke test in seconds")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")),
                        help="BLAS and PyTorch threads in the serial part (default $OMP_NUM_THREADS or 1)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (the best is kept)")
    parser.add_argument("--gemm-size", type=int, default=2048, help="side of the squares for the GEMM rate")
    parser.add_argument("--tp", type=int, nargs="*", help="ranks for strong scaling (default 1 2 4; 1 2 with --quick)")
    parser.add_argument("--bandwidth-ranks", type=int, nargs="*", help="ranks for all-reduce bandwidth (default 2 4)")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--block", type=int, nargs=4, metavar=("S", "B", "H", "A"),
                        help="the block's size (default s=256 b=4 h=512 a=8)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison (its import is slow)")
    parser.add_argument("--out", help="directory for speed.md and speed.png (default benchmarks/results)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--task", nargs="+", choices=["scaling", "allreduce"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    args.tp = args.tp if args.tp is not None else ([1, 2] if args.quick else [1, 2, 4])
    bandwidth_ranks = args.bandwidth_ranks if args.bandwidth_ranks is not None else ([2] if args.quick else [2, 4])
    common = ["--device", args.device, "--repeats", args.repeats] + (["--quick"] if args.quick else [])
    if args.block:
        common += ["--block", *args.block]
    result = serial(args)
    scaling, bandwidth = [], []
    for ranks in sorted(set(args.tp) | set(bandwidth_ranks)):  # one launch per rank count, every task in it
        tasks = [task for task, counts in (("scaling", args.tp), ("allreduce", bandwidth_ranks)) if ranks in counts]
        measured = harness.launch(__file__, ranks, common + ["--task", *tasks], env=harness.ONE_THREAD)
        scaling += [measured["scaling"]] if "scaling" in measured else []
        bandwidth += [measured["allreduce"]] if "allreduce" in measured else []
    out = harness.output_dir(args.out)
    command = "python benchmarks/speed.py " + " ".join(sys.argv[1:])
    text = render(result, scaling, bandwidth, out, command.strip())
    harness.write(out, "speed.md", text)
    print(text)


if __name__ == "__main__":
    main()
