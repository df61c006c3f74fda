"""Does a ZeRO-3 rank ever hold a full parameter outside the unit being computed?

The watcher below is this test's own: it keeps a weak reference to every buffer a unit's all-gather
returns (a weak reference dies only when nothing -- not ZeRO-3, not a saved array in the graph, not a
stray view -- holds the buffer any more), and looks at every moment a module starts or ends its forward
and every moment a parameter's gradient is final. At each it notes the bytes of gathered buffers alive
and which units they belong to, and checks them against the unit being computed, which it learns from
its own module hooks (in forward: the block, embedding or head whose forward is running) and gradient
hooks (in backward: the unit whose gradients are arriving), not from ZeRO-3.

Rules, without prefetch: a block's buffers live only between the block's forward start and end, and in
backward only while its own gradients arrive; after the step nothing gathered is alive; at no moment
does more than the largest unit (two units: the tied head and the embeddings) live; the tied head's
embeddings unit is freed with the head and gathered again for the embedding's backward. The planted bugs --
a forward free removed, a backward free removed, the graph keeping the gathered arrays -- must each
be caught.
"""
import weakref

import numpy
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

from minitp import autograd, comm
from minitp.nn import AdamW, GPTConfig
from minitp.parallel import FullyShardedOptimizer, ParallelGPT
from minitp.parallel.data import zero3
from minitp.training import train_step

WORLD = MPI.COMM_WORLD
CONFIG = dict(vocab=24, seq_len=8, hidden=16, heads=4, layers=3, dropout=0.1, seed=5, dtype="float64")


class Watcher:
    """The parameter bytes alive on this rank at every moment of a step, and every breach of the rules."""

    def __init__(self, optimizer, model):
        self.tie = model.tie_embeddings
        self.units = optimizer.gradients
        self.buffers = []  # (unit name, weak reference, bytes)
        self.timeline, self.breaches = [], []
        self.computing = None  # the unit name whose forward or backward this watcher saw last begin
        original = self.units.gather

        def gather(index, why):
            had = self.units.full[index] is not None
            original(index, why)
            if not had:  # the array that owns the memory: the gathered array may be a view of it
                full = self.units.full[index]
                owner = full if full.base is None else full.base
                self.buffers.append((self.units.units[index].name, weakref.ref(owner), full.nbytes))
        self.units.gather = gather
        model.register_forward_hook(lambda *_: self.look("forward ended", None))  # after the head's free
        unit_of = {id(p): unit.name for unit in self.units.units for p in unit.parameters}
        for index, block in zip(model.block_range, model.blocks):
            block.register_forward_pre_hook(lambda *_, name=f"blocks.{index}": self.look(f"{name} starts", name))
            block.register_forward_hook(lambda *_, name=f"blocks.{index}": self.look(f"{name} ended", None))
        for p in model.parameters():  # after ZeRO-3's own hook: what it freed is gone
            p.register_post_accumulate_grad_hook(lambda p: self.look(f"gradient of {unit_of[id(p)]}", unit_of[id(p)]))

    def alive(self):
        return [(name, nbytes) for name, ref, nbytes in self.buffers if ref() is not None]

    def look(self, moment, computing):
        alive = self.alive()
        self.timeline.append((moment, sum(nbytes for _, nbytes in alive)))
        allowed = {computing} if computing is not None else set()
        if computing == "head" and self.tie:
            allowed.add("embeddings")  # the tied head multiplies by wteᵀ
        stray = sorted({name for name, _ in alive} - allowed)
        if stray:
            self.breaches.append(f"{moment}: {stray} held")

    def end(self):
        if self.alive():
            self.breaches.append(f"after the step: {sorted(name for name, _ in self.alive())} held")


def watched_step(tie=False, recompute=None):
    mesh = comm.init(dp=WORLD.size)
    model = ParallelGPT(GPTConfig(**CONFIG, tie_embeddings=tie, recompute=recompute), mesh)
    optimizer = FullyShardedOptimizer(AdamW(model.named_parameters(), lr=1e-2), model, mesh)
    watcher = Watcher(optimizer, model)
    ids = numpy.random.default_rng(0).integers(0, CONFIG["vocab"], (CONFIG["seq_len"] + 1, 12))
    train_step(model, optimizer, ids[:-1], ids[1:], mesh, max_norm=1.0)
    watcher.end()
    largest = max(b.padded for b in optimizer.gradients.buckets) * 8
    return watcher, largest


@pytest.mark.parallel(nprocs=[2, 3])
@pytest.mark.parametrize("tie, recompute", [(False, None), (True, "full"), (False, "selective")])
def test_no_rank_holds_a_parameter_outside_the_unit_being_computed(tie, recompute):
    watcher, largest = watched_step(tie, recompute)
    peak = max(nbytes for _, nbytes in watcher.timeline)
    parallel_assert(not watcher.breaches, "\n".join(watcher.breaches[:5]))
    parallel_assert(len(watcher.timeline) > 20 and len(watcher.buffers) >= 2 * (CONFIG["layers"] + 2),
                    f"the watcher saw {len(watcher.timeline)} moments, {len(watcher.buffers)} gathers")
    limit = 2 * largest if tie else largest
    parallel_assert(peak <= limit, f"{peak} B of gathered parameters alive at once, more than {limit} B")


def planted(monkeypatch, what):
    """Run the watched step with one bug planted."""
    if what == "forward free":
        original = zero3.ShardedUnits.close

        def close(self, index, output):
            self.free, saved = (lambda index: None), self.free
            try:
                return original(self, index, output)
            finally:
                self.free = saved
        monkeypatch.setattr(zero3.ShardedUnits, "close", close)
    elif what == "backward free":
        original = zero3.ShardedUnits._gradient_ready

        def ready(self, parameter):
            self.free, saved = (lambda index: None), self.free
            try:
                return original(self, parameter)
            finally:
                self.free = saved
        monkeypatch.setattr(zero3.ShardedUnits, "_gradient_ready", ready)
    else:  # the graph keeps the gathered arrays: no packing
        monkeypatch.setattr(autograd, "push_saved_hooks", lambda pack, unpack: autograd._saved_hooks.append(
            (lambda array: array, None)))
    return watched_step()[0]


@pytest.mark.parallel(nprocs=[2])
@pytest.mark.parametrize("what", ["forward free", "backward free", "graph keeps the arrays"])
def test_the_watcher_catches_a_removed_free(monkeypatch, what):
    watcher = planted(monkeypatch, what)
    parallel_assert(watcher.breaches, f"{what} removed, yet the watcher saw no parameter held outside its unit")
