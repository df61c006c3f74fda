"""Checkpoints of pipelined training (minitp.checkpoint with minitp.pipeline): saved from a (dp, pp, tp) mesh
with the serial names, resumed on another mesh -- pipelined, tensor-parallel or serial -- with the losses
of the uninterrupted serial run (float64, dropout on, AdamW, tied embeddings)."""
import numpy
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

from minitp import checkpoint, comm
from minitp.nn import GPT, AdamW, GPTConfig
from minitp.pipeline import PipelineGPT
from minitp.training import Pipelined, train_step

WORLD = MPI.COMM_WORLD
RESUME = 1e-9
CONFIG = GPTConfig(vocab=16, seq_len=4, hidden=8, heads=2, layers=4, dropout=0.1, seed=2, dtype="float64",
                   tie_embeddings=True)
STEPS, SAVED_AT = 5, 2


def batch_at(step):
    windows = numpy.random.default_rng([9, step]).integers(0, CONFIG.vocab, (CONFIG.seq_len + 1, 4))
    return windows[:-1], windows[1:]


def train(model, optimizer, first, last, mesh=None, schedule=None, microbatches=1, virtual_stages=1):
    if mesh is None:
        return [train_step(model, optimizer, *batch_at(step), None, max_norm=0.5)[0] for step in range(first, last)]
    return [train_step(model, optimizer, *batch_at(step), mesh, max_norm=0.5,
                       forward_backward=Pipelined(schedule, microbatches))[0]
            for step in range(first, last)]


def built(model):
    return model, AdamW(model.named_parameters(), lr=1e-2)


@pytest.mark.parallel(nprocs=[2, 4])
def test_saved_from_stages_resumes_anywhere_with_the_serial_losses(tmp_path):
    path = WORLD.bcast(str(tmp_path / "gpt.npz"), root=0)
    uninterrupted = train(*built(GPT(CONFIG)), 0, STEPS)

    tp = WORLD.size // 2
    mesh = comm.init(pp=2, tp=tp)  # save from two stages, tp = 1 or 2
    model, optimizer = built(PipelineGPT(CONFIG, mesh, sequence_parallel=tp > 1))
    before = train(model, optimizer, 0, SAVED_AT, mesh, "1f1b", 2)
    checkpoint.save(path, model, optimizer, mesh, step=SAVED_AT)

    resumed = {}
    mesh = comm.init(pp=WORLD.size)  # every rank a stage, two chunks each where the layers allow
    v = 2 if CONFIG.layers % (2 * WORLD.size) == 0 else 1
    model, optimizer = built(PipelineGPT(CONFIG, mesh, virtual_stages=v))
    step = checkpoint.load(path, model, optimizer, mesh)
    resumed["pipeline"] = train(model, optimizer, step, STEPS, mesh, "interleaved" if v > 1 else "afab",
                                WORLD.size)
    model, optimizer = built(GPT(CONFIG))  # and serially, on every rank
    step = checkpoint.load(path, model, optimizer)
    resumed["serial"] = train(model, optimizer, step, STEPS)
    for where, losses in resumed.items():
        worst = max(abs(a - b) for a, b in zip(before + losses, uninterrupted))
        parallel_assert(worst <= RESUME, f"resumed {where}: {before + losses} vs {uninterrupted}")

    serial_path = WORLD.bcast(str(tmp_path / "serial.npz"), root=0)
    model, optimizer = built(GPT(CONFIG))
    train(model, optimizer, 0, 1)
    checkpoint.save(serial_path, model, optimizer, step=1)
    keys = None
    if WORLD.rank == 0:
        with numpy.load(path) as pipelined, numpy.load(serial_path) as serial:
            keys = (sorted(pipelined.files), sorted(serial.files))
    keys = WORLD.bcast(keys, root=0)
    parallel_assert(keys[0] == keys[1], f"the serial names, nothing more: {set(keys[0]) ^ set(keys[1])}")
