"""The tools that prove an op right: finite-difference gradient checks and error measures.

Both work serially and across MPI ranks. Neither raises on its own: they return numbers, and the
caller asserts on every rank at once (``pytest_mpi.parallel_assert``), so that no rank can fail alone
and leave the others waiting in a collective.
"""
from dataclasses import dataclass

import numpy

from minitp import backend
from minitp.autograd import Tensor, no_grad


def max_error(actual, expected):
    """max |actual - expected|, scaled by max(1, max |expected|): relative for large values, absolute
    for small ones. Takes Tensors or arrays; 0.0 means bit-equal."""
    actual, expected = (numpy.asarray(_host(a), dtype=numpy.float64) for a in (actual, expected))
    if actual.shape != expected.shape:
        raise ValueError(f"shapes differ: {actual.shape} vs {expected.shape}")
    if actual.size == 0:
        return 0.0
    scale = max(1.0, float(numpy.max(numpy.abs(expected))))
    return float(numpy.max(numpy.abs(actual - expected))) / scale


def _host(value):
    """The values of a Tensor, a numpy or CuPy array, a scalar or a list, on the host.

    (Not ``getattr(value, "data", value)``: a numpy array's ``.data`` is its memoryview.)"""
    if isinstance(value, Tensor):
        value = value.data
    return backend.to_host(value) if hasattr(value, "__cuda_array_interface__") else value


@dataclass
class GradcheckResult:
    max_error: float
    """the largest error between an analytic and a central-difference derivative"""
    where: str
    """which input and entry it was found at"""
    entries: int
    """how many entries were perturbed (summed over ranks)"""

    def __str__(self):
        return f"gradcheck: max error {self.max_error:.3e} at {self.where} over {self.entries} entries"


def gradcheck(fn, inputs, eps=1e-6, seed=0, comm=None, replicated_output=False):
    """Compare the analytic gradient of ``fn`` with central finite differences.

    ``fn(*inputs)`` returns a Tensor ``y``; the check differentiates the scalar ``L = sum(y * r)``
    for a fixed random ``r``, so every output entry takes part. Every input with ``requires_grad`` is
    checked, entry by entry: ``dL/dx_i ~ (L(x + eps e_i) - L(x - eps e_i)) / (2 eps)``, whose error is
    O(eps^2) in float64 -- use float64 inputs.

    With ``comm`` (an mpi4py communicator), ``fn`` is a collective: each rank passes its own shard of
    the inputs, and ranks take turns to perturb their entries while all of them evaluate ``fn``, so the
    check covers the whole sharded op, communication included. The output is either

    - sharded (the default): each rank returns its part of y, with its own random ``r``, and ``L`` is
      summed over the ranks; or
    - replicated (``replicated_output=True``): every rank returns the same whole y. Then ``r`` is the
      same on every rank and ``L`` counts y once -- which is also what the parallel operators assume:
      a replicated tensor receives the same gradient on every rank (the Megatron invariant).

    Only inputs that are genuinely per-rank can be perturbed one rank at a time: perturbing one rank's
    copy of a replicated input would break the replication that the operators rely on. Check such an
    input's gradient against the serial op instead.
    """
    rank, size = _rank_and_size(comm)
    checked = _checked_inputs(inputs)
    loss, analytic = _loss_and_gradients(fn, inputs, checked, seed, comm, replicated_output)

    worst, where, entries = 0.0, "nowhere", 0
    for turn in range(size):
        counts = [t.size for t in checked] if rank == turn else None
        counts = comm.bcast(counts, root=turn) if comm is not None else counts
        for index, count in enumerate(counts):
            for flat in range(count):
                mine = rank == turn
                if mine:
                    data = checked[index].data.reshape(-1)  # a view: perturbing it perturbs the input
                    original = data[flat].item()
                    data[flat] = original + eps
                plus = loss()
                if mine:
                    data[flat] = original - eps
                minus = loss()
                if mine:
                    data[flat] = original
                    numeric = (plus - minus) / (2 * eps)
                    exact = float(analytic[index].reshape(-1)[flat])
                    error = _relative_error(exact, numeric)
                    if error > worst:
                        worst, where = error, f"rank {rank} input {index} entry {flat}"
                entries += 1
    return _worst_over_ranks(worst, where, entries, comm)


# -- the pieces of a check -------------------------------------------------------------------------

def _rank_and_size(comm):
    return (comm.Get_rank(), comm.Get_size()) if comm is not None else (0, 1)


def _checked_inputs(inputs):
    """The inputs that require grad, their gradients cleared; ``ValueError`` unless they are float64
    (finite differences need its precision) and C-contiguous (the checks perturb them in place)."""
    checked = [t for t in inputs if t.requires_grad]
    for t in checked:
        if t.dtype != numpy.float64:
            raise ValueError(f"gradcheck needs float64 inputs, got {t.dtype}")
        if not t.data.flags.c_contiguous:
            raise ValueError("gradcheck perturbs inputs in place: pass C-contiguous arrays")
        t.grad = None
    return checked


def _loss_and_gradients(fn, inputs, checked, seed, comm, replicated_output):
    """``loss()``, evaluating ``L = sum(fn(*inputs) * r)`` without a graph, and the analytic gradients of
    ``L`` with respect to ``checked`` (host arrays; zeros where no gradient flows).

    The cotangent ``r`` is drawn from ``seed`` on a replicated output (the same on every rank), from
    ``seed`` and the rank on a sharded one; ``L`` is summed over the ranks of ``comm`` unless the output
    is replicated (then every rank holds the same ``L``).
    """
    rank, _ = _rank_and_size(comm)
    y = fn(*inputs)
    xp = backend.array_module(y.data)
    rng = numpy.random.default_rng(seed if replicated_output else seed + 7919 * rank)
    r = xp.asarray(rng.standard_normal(y.shape))

    def loss():
        with no_grad():
            local = float(xp.sum(fn(*inputs).data * r))
        if comm is None or replicated_output:
            return local
        return comm.allreduce(local)

    y.backward(r)
    analytic = [backend.to_host(t.grad) if t.grad is not None else numpy.zeros(t.shape) for t in checked]
    return loss, analytic


def _relative_error(exact, numeric):
    return abs(exact - numeric) / max(1.0, abs(exact), abs(numeric))


def _worst_over_ranks(worst, where, entries, comm):
    if comm is not None:
        worst, where = max(comm.allgather((worst, where)))
    return GradcheckResult(worst, where, entries)
