"""Activation recomputation: keep a region's inputs, not its intermediates, and run the region again
in backward (Korthikanti et al. 2022, section 5; Megatron-LM's ``tensor_parallel.checkpoint``, named
``recompute`` here so that it is not confused with ``minitp.checkpoint``, which saves training to files).

Every op keeps what its backward reads (``save_for_backward``): for a transformer layer that is
sbh(34 + 5as/h) bytes at 2-byte activations, and the 5as/h term -- attention's (b, a, s, s) softmax,
its dropout mask and the dropped probabilities -- dominates at long sequences. ``recompute`` trades
those bytes for compute (``recompute``):

    forward    run the region under ``no_grad``: its ops keep nothing; keep only the region's inputs
    backward   run it again, with grad on, from detached copies of those inputs; back-propagate the
               incoming gradient through that fresh graph; hand the inputs' gradients on

The parameters inside the region are leaves of the re-run graph, so they accumulate their ``.grad``
there, exactly as they would have in one pass.

Two regions, as in the paper:

- ``recompute="selective"`` (``MultiHeadAttention``): the attention core -- Q Kᵀ, the causal mask, the
  softmax, the attention dropout, the product with V. It keeps q, k and v (3sbh at t = 1) and drops
  the 5as²b bytes, for the price of re-running the core's two batched GEMMs (a few percent of the
  layer's FLOPs).
- ``recompute="full"`` (``TransformerBlock``): the whole layer; only its input (sbh) is kept, at the
  price of a second forward in backward.

**The same dropout masks.** A re-run must drop exactly the elements the first run dropped, or the
gradient belongs to another function. minitp's masks are a pure function of (seed, counter, element
index), and each ``nn.Dropout`` advances its ``counter`` once per call. So ``recompute`` notes the
counters of the Dropout modules in the region before the forward, rewinds them to those values for the
re-run (which then draws the same masks and advances them to where the forward left them), and finally
puts back the counters they held when backward began -- the module may have run again since, e.g. for
a second micro-batch. No random state needs saving: a counter and the microbatch a call drew
(``Dropout.microbatch``, which block of the step's mask) are the whole state, and both are replayed.
"""
from minitp.autograd import Function, Tensor, enable_grad, no_grad
from minitp.nn.layers import Dropout

RECOMPUTE_CHOICES = (None, "selective", "full")


def check_recompute(value, allowed, owner):
    """``value`` if it is one of ``allowed`` (a subset of ``RECOMPUTE_CHOICES``), else a ValueError that
    says what ``owner`` accepts."""
    if value not in allowed:
        raise ValueError(f"{owner}: recompute must be one of {allowed}, not {value!r}")
    return value


class RecomputeFunction(Function):
    """Run ``region`` without keeping its intermediates; re-run it in backward.

    Positional inputs: the region's ``inputs_count`` activation inputs, then the region's parameters.
    The parameters are inputs only so that the op is recorded when they alone require grad (the
    engine records an op when one of its inputs does); their gradients reach their ``.grad`` inside
    the re-run, so backward returns ``None`` for them.

    Saves the activation inputs and nothing else: ``track_saved`` shows them under this op's name.
    """

    def forward(self, *arrays, region, inputs_count, dropouts):
        self.region, self.dropouts = region, dropouts
        self.states = _states(dropouts)  # where the masks of this run start, and which microbatch they are
        inputs = arrays[:inputs_count]
        with no_grad():
            output = region(*(Tensor(array) for array in inputs))
        self.save_for_backward(*inputs)
        return output.data

    def backward(self, grad):
        # fresh leaves over the saved arrays: the re-run graph stops at them, not in the graph before
        inputs = [Tensor(array, requires_grad=needed) for array, needed in zip(self.saved, self.needs_input_grad)]
        current = _states(self.dropouts)
        _set_states(self.dropouts, self.states)
        try:
            with enable_grad():
                output = self.region(*inputs)
        finally:
            _set_states(self.dropouts, current)
        if output.requires_grad:
            output.backward(grad)  # parameters inside accumulate into .grad here; inputs into theirs
        parameters_count = len(self.needs_input_grad) - len(inputs)
        return tuple(tensor.grad for tensor in inputs) + (None,) * parameters_count


def _states(dropouts):
    return [(dropout.counter, dropout.microbatch) for dropout in dropouts]


def _set_states(dropouts, states):
    for dropout, (counter, microbatch) in zip(dropouts, states):
        dropout.counter, dropout.microbatch = counter, microbatch


def recompute(region, *inputs, modules=()):
    """``region(*inputs)``, keeping only ``inputs`` for backward and re-running ``region`` there.

    ``region`` maps Tensors to one Tensor. ``modules``: the Modules it runs; their Dropout layers are
    rewound for the re-run (same masks) and their parameters receive gradients. Any other Tensor the
    region reads must be one of ``inputs`` (or a Parameter of ``modules``): a tensor captured from the
    graph before the region would be walked twice in backward.
    """
    dropouts, parameters, seen = [], [], set()
    for module in modules:
        for sub in module.modules():
            if isinstance(sub, Dropout) and id(sub) not in seen:
                seen.add(id(sub))
                dropouts.append(sub)
        for parameter in module.parameters():
            if id(parameter) not in seen:
                seen.add(id(parameter))
                parameters.append(parameter)
    return RecomputeFunction.apply(*inputs, *parameters, region=region, inputs_count=len(inputs),
                                    dropouts=dropouts)
