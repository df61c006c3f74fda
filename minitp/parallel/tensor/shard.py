"""Moving weights between a serial model and its tensor-parallel shards.

A sharded module names its parameters exactly as the serial module does (``mlp.fc1.weight``), and each
parameter says which axis of the serial weight it is a block of (``split_axis``; ``None`` when every
rank holds all of it). That is all it takes to go both ways:

- ``load_serial_state(module, state, group)``: cut each full serial array into this rank's block (a
  trained serial model into shards; a fresh model needs no loading: it draws its own shards);
- ``gather_serial_state(module, group)``: all-gather the blocks back into full arrays, on every rank;
- ``gather_serial_grads(module, group)``: the same for the gradients, to compare them with the serial ones.
"""
from minitp import comm


def split_axis(parameter):
    """The axis of the serial weight that ``parameter`` is a block of, or ``None`` if replicated."""
    return getattr(parameter, "split_axis", None)


def load_serial_state(module, state, group):
    """Load a serial model's ``state`` (name -> full array) into the sharded ``module``: each split
    parameter takes rank r's block along its ``split_axis``, each replicated one the whole array. No
    communication: every rank holds the full state and cuts its own block."""
    local = {}
    for name, parameter in module.named_parameters():
        if name not in state:
            raise ValueError(f"load_serial_state: the serial state has no parameter {name!r}")
        full = state[name]
        axis = split_axis(parameter)
        local[name] = full if axis is None else comm.split(full, group, axis)
    module.load_state_dict(local)


def _gather(arrays, module, group):
    full = {}
    for name, parameter in module.named_parameters():
        array = arrays(parameter)
        if array is None:
            full[name] = None
            continue
        axis = split_axis(parameter)
        full[name] = array if axis is None else comm.all_gather(array, group, axis=axis, tag=f"gather {name}")
    return full


def gather_serial_state(module, group):
    """{serial name: full array} from the sharded ``module``, on every rank (one all-gather per split
    parameter)."""
    return _gather(lambda p: p.data, module, group)


def gather_serial_grads(module, group):
    """{serial name: full gradient} of the sharded ``module``, on every rank (``None`` where no gradient)."""
    return _gather(lambda p: p.grad, module, group)

