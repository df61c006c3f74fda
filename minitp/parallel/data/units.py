"""Which parameters does ZeRO-3 gather together, and where does each group's computation begin and end?

A *unit* is what one all-gather brings in and one free releases (FSDP's wrapped module; Zhao et al. 2023).
For a GPT they are, in forward order:

    embeddings   wte, wpe           opened before the model's forward, closed after its embedding dropout
    blocks.i     one transformer    opened before the block, closed after it
                 block each
    head         ln_f (+ lm_head)   opened before ln_f, closed after the model's forward (the logits)

**Why a block.** A unit must be large enough that its gather is bandwidth-bound (one collective per
parameter would pay MPI's latency hundreds of times) and small enough that one unit, gathered whole,
is a small part of the model: the peak parameter memory of stage 3 is Ψ/d plus the largest unit (two
with prefetch). A transformer block is the natural grain: every block has the same 12h² + 13h
parameters, none of them is used outside it, and its forward and backward are each one contiguous stretch
of the step. A layer inside a block (a Linear) would be gathered 4-6 times per block for no saving worth
the latency; the whole model would be no saving at all.

**Why the ends are units of their own.** The embedding tables and the head are used once each, at the
two ends of the forward (and the two ends of the backward), with the whole stack of blocks in between.
Putting them in one "root" unit (FSDP's default for what no wrapped module owns) would keep V·h + s·h
(+ h·V untied) numbers gathered through every block; as two units each is held only around its own
computation.

**Tied embeddings.** With ``tie_embeddings`` the head multiplies by wteᵀ: the head's region also opens the
embeddings unit, in forward and in backward, and frees it with its own. wte is one parameter with two
uses, so its gradient is complete only after the embedding's backward, the last of the step; until then
its two parts sum in the engine, not in the gathered table, which the embedding's backward gathers
again. (FSDP puts a shared parameter in the root unit instead, gathered for the whole step: here it
costs one more gather of the embeddings each way, and the table is held only while it is used.)
"""
from minitp.nn.module import Module


class Unit:
    """``name``, its ``parameters`` (model order), and ``uses``: the indices of the units its forward
    needs gathered (itself; the tied head also the embeddings)."""

    def __init__(self, name, parameters, uses):
        self.name, self.parameters, self.uses = name, parameters, uses

    def __repr__(self):
        return f"Unit({self.name!r}, {len(self.parameters)} parameters)"


def gpt_units(model):
    """The units of a GPT (``nn.GPT`` or ``ParallelGPT``: the whole model, or the part holding some
    blocks), each with the (module, "pre" | "post") hooks that open and close its forward region:
    [(Unit, opener, closer)]. ``ValueError`` for a model that is not a GPT part."""
    if not isinstance(model, Module) or not hasattr(model, "blocks") or not hasattr(model, "first"):
        raise ValueError(f"ZeRO-3 gathers the units of a GPT (nn.GPT or ParallelGPT); "
                         f"{type(model).__name__} is not one")
    found = []
    if model.first:
        found.append((Unit("embeddings", [model.wte.weight, model.wpe.weight], None), (model, "pre"),
                      (model.drop, "post")))
    for index, block in zip(model.block_range, model.blocks):
        found.append((Unit(f"blocks.{index}", block.parameters(), None), (block, "pre"), (block, "post")))
    if model.last:
        head = [p for module in (model.ln_f, model.lm_head) if module is not None for p in module.parameters()]
        found.append((Unit("head", head, None), (model.ln_f, "pre"), (model, "post")))
    for position, (unit, _, _) in enumerate(found):
        unit.uses = [position]
        if unit.name == "head" and model.tie_embeddings and model.first:
            unit.uses.append(0)  # the head's wteᵀ is the embeddings unit's wte
    return found
