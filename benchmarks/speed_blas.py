"""Where does minitp's time go, and what could this machine do? (a part of ``speed.py``)

- The block's GEMMs replayed alone with numpy (or CuPy) at the same shapes: the share of the step that
  BLAS needs, whatever the engine does around it.
- The machine's GEMM FLOP/s on big squares: the limit for this work at this thread count; on a GPU,
  also the FP32 peak from the device's properties.
- A cProfile of the step, naming the rest; the page faults each step takes.

``speed.py`` times ``steps(...)`` turn about with the block steps of ``speed_block.py`` and renders the
sections below into ``speed.md``.
"""
import cProfile
import io
import math
import pstats
from pathlib import Path

import numpy

import harness

# -- what a block computes, in GEMMs --------------------------------------------------------------


def block_gemms(s, b, h, a, ffn=None, t=1):
    """The GEMMs of one block's forward and backward as (name, batch shape, m, k, n): forward C = A B with
    A (m, k), B (k, n); backward dA = dC Bᵀ and dB = Aᵀ dC, the same FLOPs each.

    ``t``: those of one rank of t tensor-parallel ranks (Megatron's split: the QKV and fc1 weights by
    columns, n/t; attention by heads, a/t; proj and fc2 by rows, k/t) -- 1/t of the FLOPs, in smaller GEMMs."""
    ffn, d, tokens = ffn or 4 * h, h // a, s * b
    forward = [("qkv", (), tokens, h, 3 * h // t), ("q kᵀ", (b, a // t), s, d, s), ("probs v", (b, a // t), s, s, d),
               ("proj", (), tokens, h // t, h), ("fc1", (), tokens, h, ffn // t), ("fc2", (), tokens, ffn // t, h)]
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


def steps(xp, shape, dtype, gemm_size, result):
    """The steps to time beside the block: its GEMMs alone, and one big square GEMM. Records the block's
    GEMM FLOPs and the square's size in ``result``; ``machine_rate`` turns the square's time into FLOP/s."""
    gemms = block_gemms(**shape)
    result["flops"] = gemm_flops(gemms)
    result["gemm_size"] = gemm_size
    return {"gemm_replay": replay_gemms(xp, gemms, dtype), "big_square_gemm": big_square_gemm(xp, dtype, gemm_size)}


def machine_rate(result):
    """Replace the big square's time in ``result`` by the machine's GEMM FLOP/s (``"machine_gemm"``)."""
    result["machine_gemm"] = 2 * result["gemm_size"] ** 3 / result.pop("big_square_gemm")


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


# -- the rest of the step ---------------------------------------------------------------------------

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


# -- the report -------------------------------------------------------------------------------------

def render_gpu(r):
    gpu = r["gpu"]
    return [f"GPU: {gpu['name']} (compute capability {gpu['compute_capability']}), FP32 peak "
            f"{harness.rate(gpu['fp32_peak'])}FLOP/s (SMs × FP32 lanes × 2 × clock).", ""]


def render_rate(r):
    """The block's GEMM FLOPs and the machine's GEMM rate: the two numbers the block table divides by."""
    return [f"{r['flops'] / 1e9:.2f} GFLOP per step in GEMMs (72sbh² + 12s²bh: every GEMM of the forward, twice "
            f"more in backward). The machine's GEMM rate: {harness.rate(r['machine_gemm'])}FLOP/s "
            f"({r['gemm_size']}² float32 squares, numpy{'/CuPy' if r['device'] == 'gpu' else ''}).", ""]


def render_share(r):
    share = r["gemm_replay"] / r["minitp"]
    return [f"BLAS share: the GEMMs alone take {100 * share:.0f}% of minitp's step; the other "
            f"{100 * (1 - share):.0f}% is elementwise work (LayerNorm, softmax, GeLU, the causal mask, residual "
            "and bias additions), gradient accumulation and the engine's Python.", ""]


def render_faults(r):
    faults = {name: count for name, count in r.get("faults", {}).items() if count is not None}
    if not faults:
        return []
    return ["Page faults per step (pages the kernel maps afresh, zeroing each): " +
            ", ".join(f"{name} {count:,.0f}" for name, count in faults.items()) +
            ". By default glibc hands freed blocks above its mmap threshold back to the kernel, so every "
            "large temporary would be faulted in again on its next allocation; `minitp.allocator` (on when "
            "minitp is imported) serves every block from the heap and keeps freed memory there, so a step "
            "reuses the pages of the one before. `MINITP_MALLOC=default` turns it off.", ""]


def render_profile(r):
    return ["## Where minitp's time goes (cProfile, per step)", "",
            "Own time of each function; a GEMM's time shows up in the Python function that runs the `@`.", "",
            harness.table(["function", "calls", "own ms", "share", "cumulative ms"], r["profile"], "lrrrr"), ""]
