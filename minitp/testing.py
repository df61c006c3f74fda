"""The tools that prove an op right: finite-difference gradient checks and error measures.

Two gradient checks: ``gradcheck`` perturbs one entry at a time (it says which entry is wrong; two
evaluations per entry; per-rank inputs only), ``directional_gradcheck`` moves every input at once along
random directions (two evaluations per direction; replicated inputs too).

All of them work serially and across MPI ranks. None raises on its own: they return numbers, and the
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
    """how many entries were perturbed (summed over ranks; a replicated input's counted once)"""

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
    input's gradient with ``directional_gradcheck``, which moves every rank's copy together.
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


def directional_gradcheck(fn, inputs, eps=1e-6, seed=0, comm=None, replicated_output=False,
                          replicated_inputs=(), directions=2):
    """Compare the analytic derivative of ``fn`` along random directions with central finite differences,
    moving every input at once (as Chainer's ``check_backward`` does): two evaluations of ``fn`` per
    direction, however many entries the inputs have.

    ``L = sum(y * r)`` for a random cotangent ``r``, exactly as in ``gradcheck`` (same seed, same ``r``;
    with ``comm``, summed over the ranks for a sharded output, counted once for a replicated one). For
    each of ``directions`` random directions ``v`` (one standard-normal array ``v_i`` per input that
    requires grad), the check compares

        analytic  D = sum over inputs i of <grad_i, v_i>     (grad_i from one ``y.backward(r)``)
        numeric   (L(x + eps v) - L(x - eps v)) / (2 eps)     (every input moved on every rank at once)

    with the relative error ``|D - numeric| / max(1, |D|, |numeric|)``: O(eps^2) in float64 -- use
    float64 inputs. The result reports the worst direction.

    Across ranks (``comm`` given), each input is one of two kinds, and that decides both its direction
    and what is summed in D:

    - sharded (the default): each rank's array is its own block of numbers. Its direction is drawn from
      (``seed``, direction, input, rank): different on every rank, so that a gradient delivered to the
      wrong rank cannot cancel out. Its term ``<grad_i, v_i>`` is **summed over the ranks** (an
      all-reduce): the derivative along the whole direction.
    - replicated (its position in ``inputs`` listed in ``replicated_inputs``): every rank holds the same
      array, one variable with a copy per rank. Its direction is drawn from (``seed``, direction,
      input) only, so it is the same on every rank and every copy moves together (the inputs stay
      replicated). Its term is this rank's ``<grad_i, v_i>``, **not summed**: by the Megatron invariant
      each rank's ``grad_i`` is already the whole gradient of the one variable.

    So ``D`` on rank k = all-reduce(sum of the sharded terms) + rank k's replicated terms, and each rank
    compares its own ``D`` with the numeric derivative (the same number on every rank); the result is
    the worst over directions and ranks. A replicated input whose gradient is only a partial sum on some
    rank (an f without its all-reduce), or differs between ranks, fails on those ranks. A replicated
    input left out of ``replicated_inputs`` gets a different direction on each rank, so its copies move
    apart, which the operators do not allow for: expect a failure, not a pass.
    ``entries`` counts the numbers moved along each direction: the sharded inputs' entries on all ranks
    plus each replicated input's once.
    """
    rank, _ = _rank_and_size(comm)
    replicated = set(replicated_inputs)
    if not replicated <= set(range(len(inputs))):
        raise ValueError(f"replicated_inputs {sorted(replicated)} are not positions in the {len(inputs)} inputs")
    checked = _checked_inputs(inputs)
    positions = [i for i, t in enumerate(inputs) if t.requires_grad]  # where each checked input sits
    shared = [i in replicated for i in positions]
    loss, analytic = _loss_and_gradients(fn, inputs, checked, seed, comm, replicated_output)
    originals = [t.data.copy() for t in checked]
    xp = backend.array_module(originals[0]) if originals else numpy

    def total(per_input):
        """The sharded inputs' numbers summed over the ranks, plus this rank's replicated ones once."""
        sharded = sum(number for number, copy in zip(per_input, shared) if not copy)
        sharded = comm.allreduce(sharded) if comm is not None else sharded
        return sharded + sum(number for number, copy in zip(per_input, shared) if copy)

    worst, where = 0.0, "nowhere"
    for direction in range(directions):
        # a replicated input's direction is the same on every rank; a sharded one's differs by rank
        v = [numpy.random.default_rng([seed, direction, position] + ([] if copy else [rank + 1]))
             .standard_normal(t.shape) for position, copy, t in zip(positions, shared, checked)]
        exact = total([float(numpy.vdot(grad, d)) for grad, d in zip(analytic, v)])
        values = []
        for sign in (1, -1):
            for t, original, d in zip(checked, originals, v):
                t.data[...] = original + sign * eps * xp.asarray(d)
            values.append(loss())
        for t, original in zip(checked, originals):
            t.data[...] = original
        numeric = (values[0] - values[1]) / (2 * eps)
        error = _relative_error(exact, numeric)
        if error > worst or where == "nowhere":
            worst, where = error, f"rank {rank} direction {direction}: analytic {exact:.9e}, numeric {numeric:.9e}"
    return _worst_over_ranks(worst, where, total([t.size for t in checked]), comm)


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
