"""The machinery behind the proofs that a sharded layer is its serial twin (test_parallel_layers.py,
test_sequence_parallel.py).

A proof builds the serial module, randomises its weights, cuts them into the sharded module
(``load_serial_state``), runs both on the same input with the same random upstream gradient, and
measures on every rank: the output, the input's gradient and every parameter's gradient (gathered back
to serial shape by ``gather_serial_grads``). Where the sharded module holds only a block of a tensor (a
sequence block under sequence parallelism, a column block of a column-parallel output), the block is
compared with the same block of the serial tensor. The functions here return numbers; the tests assert.
"""
import math

import numpy
from mpi4py import MPI

from minitp import comm
from minitp.autograd import Tensor
from minitp.nn.layers import Dropout
from minitp.parallel.tensor import mappings
from minitp.parallel.tensor.shard import gather_serial_grads, load_serial_state, split_axis
from minitp.testing import gradcheck, max_error

WORLD = MPI.COMM_WORLD
TIGHT = 1e-12  # sharded vs serial in float64: the same sums in another order, rounding only
GRADCHECK = 1e-6  # finite differences with eps = 1e-6 in float64: O(eps^2) error, plus rounding / eps


def tp_mesh():
    """Every rank in one tensor-parallel group: t = the world size."""
    return comm.init(tp=WORLD.size)


def replicated(shape, seed):
    """The same standard-normal float64 array on every rank (every rank draws it from the same seed)."""
    return numpy.random.default_rng(seed).standard_normal(shape)


def randomize(module, seed=0):
    """Overwrite every parameter of ``module`` with N(0, 0.5²) entries, in place; returns ``module``.

    LayerNorm starts at weight 1 and bias 0, which would hide a forward that skipped them and make
    their gradients' sums trivially right; random values make every parameter matter."""
    rng = numpy.random.default_rng(seed)
    for _, parameter in module.named_parameters():
        parameter.data[...] = 0.5 * rng.standard_normal(parameter.shape)
    return module


def block(array, group, axis):
    """This rank's block of ``array`` along ``axis`` (C-contiguous, a copy)."""
    return numpy.ascontiguousarray(comm.split(array, group, axis))


def sequence_block(array, group):
    return block(array, group, 0)


def whole(array):
    return array


def reset_dropout(module):
    """Rewind every dropout's call counter, so the next forward draws the same masks as the last one
    (a gradcheck runs the same forward many times)."""
    for sub in module.modules():
        if isinstance(sub, Dropout):
            sub.counter = 0


def compare(serial, sharded, x, upstream, input_block=whole, output_block=whole):
    """Run ``serial`` on ``x`` and ``sharded`` on ``input_block(x)``; backward from ``upstream`` (a random
    gradient of the serial output, so every output entry matters) and its ``output_block``.

    Loads the serial weights into ``sharded`` first (over ``sharded.group``, its tensor-parallel group).
    Returns {what: max error}: "output", "input grad", and "<parameter> grad" for each serial parameter, whose sharded gradient is gathered to full shape
    (``inf`` when the sharded module lacks it or computed no gradient for it). A sharded parameter the
    serial module lacks makes ``load_serial_state`` raise.
    """
    load_serial_state(sharded, serial.state_dict(), sharded.group)
    serial_x = Tensor(x.copy(), requires_grad=True)
    serial_y = serial(serial_x)
    serial_y.backward(upstream)

    sharded_x = Tensor(input_block(x), requires_grad=True)
    sharded_y = sharded(sharded_x)
    sharded_y.backward(output_block(upstream))
    grads = gather_serial_grads(sharded, sharded.group)

    errors = {"output": max_error(sharded_y, output_block(serial_y.data)),
              "input grad": max_error(sharded_x.grad, input_block(serial_x.grad))}
    for name, parameter in serial.named_parameters():
        sharded_grad = grads.get(name)
        errors[f"{name} grad"] = math.inf if sharded_grad is None else max_error(sharded_grad, parameter.grad)
    return errors


def worst(errors):
    """The largest error and what it was, for an assertion message."""
    name = max(errors, key=errors.get)
    return f"largest error {errors[name]:.2e} in {name}; all: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items())


def sharded_gradcheck(module, x, group, replicated_input=False, replicated_output=False):
    """A finite-difference gradcheck of the sharded ``module`` itself, communication included, with
    respect to this rank's input ``x`` and every split parameter (the genuinely per-rank numbers).

    Ranks take turns perturbing one entry of their own shard, so each checked number must live on one
    rank only. A replicated tensor has t copies: moving one copy breaks the replication that Megatron's
    operators assume (f̄'s identity backward is right only when every rank receives the same gradient
    of the replicated output). So a replicated input enters as this rank's sequence block, all-gathered
    (backward: split, since the module's input gradient is replicated), and a replicated output leaves
    as this rank's sequence block (backward: the all-gather that makes its gradient the same on every
    rank). Replicated parameters (LayerNorm, row-parallel bias) are not perturbed here; their gradients
    are proven against the serial module by ``compare``.

    Returns (the GradcheckResult, the number of entries it should have perturbed over all ranks).
    """
    parameters = [p for _, p in module.named_parameters() if split_axis(p) is not None]

    def sharded(tokens, *parameters):  # the parameters are the module's own: gradcheck perturbs them in place
        reset_dropout(module)
        if replicated_input:
            tokens = mappings.gather_from_sequence_parallel_region(tokens, group, tensor_parallel_output_grad=False)
        y = module(tokens)
        return mappings.scatter_to_sequence_parallel_region(y, group) if replicated_output else y

    result = gradcheck(sharded, [x, *parameters], comm=group.comm)
    expected = group.comm.allreduce(x.size + sum(p.size for p in parameters))
    return result, expected


def run_logged(module, x, upstream):
    """The collectives of ``module``'s forward and of its backward from ``upstream``: two lists of records."""
    x = Tensor(x, requires_grad=True)
    with comm.log_collectives() as forward:
        y = module(x)
    with comm.log_collectives() as backward:
        y.backward(upstream)
    return forward.records, backward.records


def summary(log):
    """(op, shape, tag) of each record: what an assertion message shows."""
    return [(r.op, r.shape, r.tag) for r in log]


def value_error(build):
    """(the ValueError's message or None, the number of collectives run) when calling ``build()``.

    Caught here rather than by pytest.raises, so that a rank that does not raise reports it through
    parallel_assert instead of failing alone."""
    with comm.log_collectives() as log:
        try:
            build()
        except ValueError as error:
            return str(error), len(log)
    return None, len(log)
