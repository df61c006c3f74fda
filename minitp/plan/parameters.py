"""How many parameters does each rank hold? The model's tensors, in minitp's order, cut as minitp cuts them.

Per transformer layer, GPT-2 (h hidden, f = ffn_hidden, t tensor-parallel ranks):

    ln1, ln2           weight, bias        4h                replicated over tp
    attention qkv      (h, 3h) + 3h        3h² + 3h          columns split: /t (whole heads per rank)
    attention proj     (h, h) + h          h² + h            rows split, the bias replicated
    mlp fc1            (h, f) + f          hf + f            columns split
    mlp fc2            (f, h) + h          fh + h            rows split, the bias replicated

12h² + 13h per layer at f = 4h. The first stage adds the token table (V, h) (rows split over tp) and the
position table (s, h) (replicated); the last the final LayerNorm (2h) and the LM head (h, V) (columns
split) -- or, with tied embeddings, no head (and with pp > 1 its own copy of the token table).

Narayanan et al. 2021 (arXiv 2104.04473), section 5.1: P = 12lh²(1 + 13/(12h) + (V + s)/(12lh))
= 12lh² + 13lh + (V + s)h: the same count for a tied head, without the final LayerNorm's 2h (which the
formula leaves out). ``narayanan_parameters`` is the paper's; ``count`` is minitp's, tensor by tensor.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Tensor:
    """One parameter on one rank: its serial name, the elements this rank holds, and whether it is split
    over tp (a split tensor's gradient-norm squares are summed over tp; a replicated one's counted once);
    ``tied``: the token table shared by the first and last pipeline stage (pp > 1, tied embeddings), which
    the gradient buckets put last and alone (``states.buckets``)."""
    name: str
    elements: int
    split: bool
    expert: bool = False
    tied: bool = False


def narayanan_parameters(l, h, V, s):
    """Narayanan et al. 2021, section 5.1 (the count behind table 1): P = 12lh²(1 + 13/(12h) + (V+s)/(12lh))."""
    return 12 * l * h * h * (1 + 13 / (12 * h) + (V + s) / (12 * l * h))


def block_tensors(i, model, t, experts_here=0):
    """The tensors of transformer block ``i`` on one tp rank, in ``named_parameters`` order."""
    h, f = model.hidden, model.ffn_hidden
    prefix = f"blocks.{i}."
    found = [Tensor(prefix + "ln1.weight", h, False), Tensor(prefix + "ln1.bias", h, False),
             Tensor(prefix + "attention.qkv.weight", h * 3 * h // t, True),
             Tensor(prefix + "attention.qkv.bias", 3 * h // t, True),
             Tensor(prefix + "attention.proj.weight", h // t * h, True),
             Tensor(prefix + "attention.proj.bias", h, False),
             Tensor(prefix + "ln2.weight", h, False), Tensor(prefix + "ln2.bias", h, False)]
    mlp = [("mlp.fc1.weight", h * f // t, True), ("mlp.fc1.bias", f // t, True),
           ("mlp.fc2.weight", f // t * h, True), ("mlp.fc2.bias", h, False)]
    if not model.experts:
        return found + [Tensor(prefix + name, n, split) for name, n, split in mlp]
    # E experts, each a whole MLP; ep ranks hold E/ep of them (each still split over tp); the router (h, E)
    # is replicated
    found.append(Tensor(prefix + "mlp.router.weight", h * model.experts, False))
    for e in range(experts_here):
        found += [Tensor(f"{prefix}mlp.experts.{e}.{name[4:]}", n, split, expert=True) for name, n, split in mlp]
    return found


def chunk_layers(model, p, v, chunk):
    """The blocks of model chunk ``chunk`` (0 .. p·v - 1): l/(p·v) consecutive layers (``pipeline.chunk_blocks``)."""
    per = model.layers // (p * v)
    return range(chunk * per, (chunk + 1) * per)


def chunk_tensors(model, mesh, chunk):
    """The tensors of model chunk ``chunk`` on one tp rank, in ``named_parameters`` order."""
    t, p, v = mesh.tp, mesh.pp, mesh.virtual_stages
    h, V = model.hidden, model.vocab
    blocks = chunk_layers(model, p, v, chunk)
    first, last = 0 in blocks, model.layers - 1 in blocks
    experts_here = model.experts // mesh.ep if model.experts else 0
    found = []
    if first or (last and model.tie_embeddings):
        found.append(Tensor("wte.weight" + ("" if first else " (tied copy)"), V // t * h, True,
                            tied=model.tie_embeddings and p > 1))
    if first:
        found.append(Tensor("wpe.weight", model.seq_len * h, False))
    for i in blocks:
        found += block_tensors(i, model, t, experts_here)
    if last:
        found += [Tensor("ln_f.weight", h, False), Tensor("ln_f.bias", h, False)]
        if not model.tie_embeddings:
            found.append(Tensor("lm_head.weight", h * V // t, True))
    return found


def stage_tensors(model, mesh, stage):
    """Every tensor pipeline rank ``stage`` holds (its v chunks k·p + stage, in order)."""
    return [tensor for k in range(mesh.virtual_stages)
            for tensor in chunk_tensors(model, mesh, k * mesh.pp + stage)]


def count(model, mesh=None, stage=None):
    """Parameters on one rank of pipeline ``stage`` (the whole serial model when ``mesh`` is None)."""
    from minitp.plan.shapes import Mesh
    mesh = mesh or Mesh()
    stages = range(mesh.pp) if stage is None else [stage]
    return sum(tensor.elements for r in stages for tensor in stage_tensors(model, mesh, r))


def serial_count(model):
    """The whole model's parameters, each counted once (a tied table once)."""
    from minitp.plan.shapes import Mesh
    return sum(tensor.elements for tensor in stage_tensors(model, Mesh(), 0))
