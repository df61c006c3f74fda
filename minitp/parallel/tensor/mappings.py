"""The papers' communication operators as autograd Functions: what a tensor becomes when it enters or
leaves a parallel region, forward and backward side by side.

Names follow Megatron-LM's ``mappings.py`` (what the op does to a region); the docstrings give the papers'
symbols. Shoeybi et al. (2019) call the pair of tensor parallelism f and g; Korthikanti et al. (2022) keep
f, rename Megatron's g to f̄ (f-bar), and use g and ḡ (g-bar) for the pair of sequence parallelism:

    function                                     paper symbol        forward           backward
    copy_to_tensor_parallel_region               f                   identity          all-reduce
    reduce_from_tensor_parallel_region           f̄ (Megatron's g)    all-reduce        identity
    gather_from_sequence_parallel_region         g                   all-gather seq    reduce-scatter seq
      ... (tensor_parallel_output_grad=False)    (leave SP region)   all-gather seq    split seq
    reduce_scatter_to_sequence_parallel_region   ḡ                   reduce-scatter    all-gather seq
    scatter_to_sequence_parallel_region          (enter SP region)   split seq         all-gather seq
    scatter_to_tensor_parallel_region            (last axis)         split             all-gather
    gather_from_tensor_parallel_region           (last axis)         all-gather        split

Why each backward is the other's forward: if y = x₁ + … + xₙ (an all-reduce of the ranks' partial
sums), then ∂L/∂xᵢ = ∂L/∂y for every i -- the backward of a sum copies. Conversely, if every rank uses
the same x (a copy), each use adds its own term to ∂L/∂x, so ∂L/∂x = Σᵢ ∂Lᵢ/∂x -- the backward of a copy
sums. The same argument pairs all-gather (a copy of each block to every rank) with reduce-scatter, and
split with all-gather. These backwards assume the Megatron invariant: a tensor replicated across the
tensor-parallel group receives the same gradient on every rank.

Every operator takes the ``group`` to communicate over (``mesh.tp``: always passed, so a reader sees
from the call which ranks talk) and an
optional ``tag`` ("mlp", "attention") that prefixes the names in the collective log, e.g.
"mlp: f backward". Sequence is axis 0: activations are (s, b, h).
"""
from minitp import comm
from minitp.autograd import Function

SEQUENCE_AXIS = 0  # activations are (s, b, h): a sequence shard is a contiguous block of rows


def _tag(prefix, name):
    """The log tag ``"prefix: name"`` (``name`` alone without a prefix)."""
    return f"{prefix}: {name}" if prefix else name


tag = _tag  # public, for layers that call comm's collectives directly; inside this module `tag` is an argument


class _Mapping(Function):
    """A communication op: remembers its group and log tag for backward."""

    def setup(self, group, tag):
        if group is None:
            raise TypeError(f"{type(self).__name__} needs the group to communicate over (e.g. mesh.tp), got None")
        self.group = group
        self.tag = tag


class CopyToTensorParallelRegion(_Mapping):
    """Megatron's **f**: identity forward, all-reduce backward.

    Forward: every rank already holds the whole (replicated) input, so entering the tensor-parallel
    region costs nothing; each rank then multiplies it by its own shard of a column-split weight.
    Backward: each rank's shard produced its own contribution to ∂L/∂x; the true gradient of the one
    replicated x is their sum, all-reduced over the group (an s×b×h tensor crosses the wire).
    """

    def forward(self, x, group=None, tag=None):
        self.setup(group, tag)
        return x

    def backward(self, grad):
        return comm.all_reduce(grad, self.group, tag=_tag(self.tag, "f backward"))


class ReduceFromTensorParallelRegion(_Mapping):
    """Megatron's **g** (Korthikanti's **f̄**): all-reduce forward, identity backward -- f's conjugate.

    Forward: after a row-split weight, each rank holds a partial sum of the output; the all-reduce adds
    them (an s×b×h tensor crosses the wire), so every rank holds the full, replicated output.
    Backward: y = x₁ + … + xₙ, so ∂L/∂xᵢ = ∂L/∂y; that gradient is already replicated, nothing to send.
    """

    def forward(self, x, group=None, tag=None):
        self.setup(group, tag)
        return comm.all_reduce(x, self.group, tag=_tag(tag, "f-bar forward"))

    def backward(self, grad):
        return grad


class ScatterToTensorParallelRegion(_Mapping):
    """Split along the last (hidden) axis forward, all-gather backward: enter a region where each rank
    holds 1/n of the hidden columns.

    Forward: rank r keeps columns [r·h/n, (r+1)·h/n) of its replicated input; nothing crosses the wire.
    Backward: each rank's gradient covers only its columns; the all-gather along the last axis rebuilds
    the gradient of the whole replicated input (the full tensor crosses the wire).
    """

    def forward(self, x, group=None, tag=None):
        self.setup(group, tag)
        return comm.split(x, self.group, axis=-1)

    def backward(self, grad):
        return comm.all_gather(grad, self.group, axis=-1, tag=_tag(self.tag, "scatter(last) backward"))


class GatherFromTensorParallelRegion(_Mapping):
    """All-gather along the last (hidden) axis forward, split backward: leave a column-parallel region
    (e.g. ``ColumnParallelLinear(gather_output=True)``).

    Forward: each rank holds h/n columns; the all-gather gives every rank all h (the full tensor
    crosses the wire). Backward: the gradient of the replicated output is the same on every rank, so
    rank r's columns of it are exactly the gradient of its block; nothing to send.
    """

    def forward(self, x, group=None, tag=None):
        self.setup(group, tag)
        return comm.all_gather(x, self.group, axis=-1, tag=_tag(tag, "gather(last) forward"))

    def backward(self, grad):
        return comm.split(grad, self.group, axis=-1)


class ScatterToSequenceParallelRegion(_Mapping):
    """Split along the sequence forward, all-gather backward: enter a sequence-parallel region from a
    replicated tensor (e.g. after the embedding).

    Forward: rank r keeps tokens [r·s/n, (r+1)·s/n); nothing crosses the wire. Backward: the gradients
    of the n token blocks are all-gathered into the gradient of the whole replicated input.
    """

    def forward(self, x, group=None, tag=None):
        self.setup(group, tag)
        return comm.split(x, self.group, axis=SEQUENCE_AXIS)

    def backward(self, grad):
        return comm.all_gather(grad, self.group, axis=SEQUENCE_AXIS, tag=_tag(self.tag, "scatter(seq) backward"))


class GatherFromSequenceParallelRegion(_Mapping):
    """Korthikanti's **g**: all-gather along the sequence forward, reduce-scatter backward.

    Forward: each rank holds s/n tokens (after sequence-parallel LayerNorm and dropout); the all-gather
    gives every rank the whole sequence, which the column-parallel GEMM that follows needs (an s×b×h
    tensor is gathered; each rank sends (n-1)/n of it).

    Backward depends on what the gathered tensor feeds, i.e. on the gradient that arrives:

    - ``tensor_parallel_output_grad=True`` (the default, g proper): it feeds a tensor-parallel region,
      so each rank's gradient is only its shard's partial sum of ∂L/∂x. Sum them and keep this rank's
      tokens: a reduce-scatter along the sequence -- f's all-reduce, with the all-gather half dropped
      because the region before g is sequence-sharded.
    - ``tensor_parallel_output_grad=False``: it feeds replicated computation (leaving a sequence-parallel
      region into a replicated tensor, e.g. before the final logits), so the gradient is already the
      same full ∂L/∂x on every rank; this rank's tokens are just a slice of it: split, no communication.
    """

    def forward(self, x, group=None, tag=None, tensor_parallel_output_grad=True):
        self.setup(group, tag)
        self.tensor_parallel_output_grad = tensor_parallel_output_grad
        return comm.all_gather(x, self.group, axis=SEQUENCE_AXIS, tag=_tag(tag, "g forward"))

    def backward(self, grad):
        if self.tensor_parallel_output_grad:
            return comm.reduce_scatter(grad, self.group, axis=SEQUENCE_AXIS, tag=_tag(self.tag, "g backward"))
        return comm.split(grad, self.group, axis=SEQUENCE_AXIS)


class ReduceScatterToSequenceParallelRegion(_Mapping):
    """Korthikanti's **ḡ** (g-bar): reduce-scatter along the sequence forward, all-gather backward --
    g's conjugate.

    Forward: after a row-split weight each rank holds a partial sum of the whole s×b×h output; the
    reduce-scatter sums them and leaves rank r with tokens [r·s/n, (r+1)·s/n) of the sum, ready for
    sequence-parallel dropout and LayerNorm. This replaces f̄'s all-reduce at half its ring bytes (the
    all-gather half moves to the next g). Backward: rank r's tokens took part in every rank's partial
    sum, so each rank needs the gradient of all s tokens: an all-gather along the sequence.
    """

    def forward(self, x, group=None, tag=None):
        self.setup(group, tag)
        return comm.reduce_scatter(x, self.group, axis=SEQUENCE_AXIS, tag=_tag(tag, "g-bar forward"))

    def backward(self, grad):
        return comm.all_gather(grad, self.group, axis=SEQUENCE_AXIS, tag=_tag(self.tag, "g-bar backward"))


# -- the functions layers call ----------------------------------------------------------------------


def check_sequence_block(x, group, seq_len, what):
    """Sequence parallelism's always-on input check, local (no communication, ~0.1 µs): ``ValueError``
    unless ``x`` can be this rank's block of a sequence of at most ``seq_len`` tokens, i.e. unless
    ``len(x) · t <= seq_len``. Every rank of the group is handed the same kind of input, so all raise
    alike, before any collective.

    It is sound -- a valid block of any sequence the model takes (s <= seq_len, so s/t tokens) always
    passes -- and it catches the full sequence fed where the rank's block belongs whenever that sequence
    is longer than seq_len/t: a full-length batch always, on t > 1 ranks. Without ``seq_len`` (None)
    nothing is known locally and nothing is checked; a full sequence of at most seq_len/t tokens looks
    exactly like a valid block, and only checked mode's ``checks.not_replicated`` (every rank passed the
    same array) catches it."""
    if seq_len is None or group.size == 1 or len(x) * group.size <= seq_len:
        return
    most = seq_len // group.size
    raise ValueError(f"{what}: got {len(x)} tokens (an input of shape {tuple(x.shape)}) on tp rank {group.rank} "
                     f"of {group.size}, expected this rank's block of the sequence: s/{group.size} tokens of a "
                     f"sequence of at most seq_len={seq_len}, so at most {most}. Was the full sequence fed to a "
                     "sequence-parallel layer? Cut it first, e.g. with scatter_to_sequence_parallel_region")


def copy_to_tensor_parallel_region(x, group, tag=None):
    """f: identity forward, all-reduce backward. See ``CopyToTensorParallelRegion``."""
    y = CopyToTensorParallelRegion.apply(x, group=group, tag=tag)
    # f forwards the very same array: f of a weight (a sequence-parallel LayerNorm's, a row-parallel
    # bias) is still a weight, not an activation, for the saved-bytes accounting (track_saved).
    y.is_parameter = x.is_parameter
    return y


def reduce_from_tensor_parallel_region(x, group, tag=None):
    """Megatron's g, Korthikanti's f̄: all-reduce forward, identity backward.
    See ``ReduceFromTensorParallelRegion``."""
    return ReduceFromTensorParallelRegion.apply(x, group=group, tag=tag)


def scatter_to_tensor_parallel_region(x, group, tag=None):
    """Split the last axis forward, all-gather it backward. See ``ScatterToTensorParallelRegion``."""
    return ScatterToTensorParallelRegion.apply(x, group=group, tag=tag)


def gather_from_tensor_parallel_region(x, group, tag=None):
    """All-gather the last axis forward, split it backward. See ``GatherFromTensorParallelRegion``."""
    return GatherFromTensorParallelRegion.apply(x, group=group, tag=tag)


def scatter_to_sequence_parallel_region(x, group, tag=None):
    """Split the sequence (axis 0) forward, all-gather it backward. See ``ScatterToSequenceParallelRegion``."""
    return ScatterToSequenceParallelRegion.apply(x, group=group, tag=tag)


def gather_from_sequence_parallel_region(x, group, tag=None, tensor_parallel_output_grad=True, seq_len=None):
    """Korthikanti's g: all-gather the sequence forward; reduce-scatter backward, or split when the
    output feeds replicated computation (``tensor_parallel_output_grad=False``).
    See ``GatherFromSequenceParallelRegion``. ``seq_len``: the longest sequence the caller's model takes;
    given, a block of more than seq_len/t tokens is refused before the all-gather (``check_sequence_block``)."""
    check_sequence_block(x, group, seq_len, _tag(tag, "g (sequence-parallel input)"))
    return GatherFromSequenceParallelRegion.apply(
        x, group=group, tag=tag, tensor_parallel_output_grad=tensor_parallel_output_grad)


def reduce_scatter_to_sequence_parallel_region(x, group, tag=None):
    """Korthikanti's ḡ: reduce-scatter the sequence forward, all-gather it backward.
    See ``ReduceScatterToSequenceParallelRegion``."""
    return ReduceScatterToSequenceParallelRegion.apply(x, group=group, tag=tag)


# The papers' symbols, for readers who come from them (Korthikanti et al.'s naming: f̄ is Megatron's g).
f = copy_to_tensor_parallel_region
f_bar = reduce_from_tensor_parallel_region
g = gather_from_sequence_parallel_region
g_bar = reduce_scatter_to_sequence_parallel_region
