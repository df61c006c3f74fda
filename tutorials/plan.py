"""Plan a run before running it -- then run it, and see the plan was right to the byte; then plan a 70B model.

    mpirun -n 4 python tutorials/plan.py        # tp 2 × dp 2 (1 and 2 ranks work too: tp = min(2, n))

``minitp.plan`` is pure arithmetic: the papers' formulas (Korthikanti et al. 2022 table 2 for activations,
Rajbhandari et al. 2020 for ZeRO, Narayanan et al. 2021 for parameters, the bubble and the flops), each
corrected where minitp's code departs from the paper. Read top to bottom: (1) the prediction for a small
GPT on this mesh, (2) one real training step, measured, (3) both columns side by side -- what each rank
holds and sends -- and (4) the same planner on a 70B-class model on 64 GPUs, where nothing can be measured
here. The last line is the check that (1) equals (2) byte for byte.
"""
import numpy
from mpi4py import MPI

from minitp import comm, track_saved
from minitp.nn import AdamW, GPTConfig
from minitp.parallel.data.data_parallel import split_batch
from minitp.training import train_step
from minitp.parallel.gpt import ParallelGPT
from minitp.parallel.data.zero import ZeroOptimizer
from minitp.plan import Choices, Mesh, Model, plan
from minitp.plan.communication import by_group_op, logged_by_group_op
from minitp.plan.report import table
from minitp.report import banner, each_rank, say, verdict

world = MPI.COMM_WORLD.size
tp = 2 if world % 2 == 0 else 1
mesh = comm.init(tp=tp, checked=True)
banner(f"planning a step, then measuring it, on {mesh}")

# ---------------------------------------------------------------------------------------------------
# 1. The prediction. A tiny GPT (V = 64: train_gpt.py pads its vocabulary to a multiple of 8 the same way),
# SP on when tp > 1, dropout on (so the masks count), ZeRO-1 with 2 KiB buckets (several, padded over dp).
# ---------------------------------------------------------------------------------------------------
config = GPTConfig(vocab=64, seq_len=16, hidden=32, heads=4, layers=2, dropout=0.1, dtype="float32")
batch, bucket = 4 * mesh.dp_size, 2048
choices = Choices(micro_batch=batch // mesh.dp_size, sequence_parallel=tp > 1, zero=1, precision="float32",
                  bucket_bytes=bucket)
predicted = plan(Model.of(config), Mesh(dp=mesh.dp_size, tp=tp), choices)
stage = predicted.stages[0]
say("1. the plan (every rank of this mesh holds the same, but for ZeRO-1's padding):")
for name, figure in stage.memory.items():
    say(f"     {name:16s} {figure.value:>10,.0f} B   {figure.formula}")

# ---------------------------------------------------------------------------------------------------
# 2. The measurement: track_saved around the forward (what the loss keeps for backward), the parameters'
# bytes, ZeroOptimizer.state_bytes after the step, and the collective log of the whole step.
# ---------------------------------------------------------------------------------------------------
model = ParallelGPT(config, mesh, sequence_parallel=choices.sequence_parallel)
optimizer = ZeroOptimizer(AdamW(model.named_parameters()), mesh, bucket)
rng = numpy.random.default_rng(0)
ids, targets = rng.integers(0, 64, (16, batch)), rng.integers(0, 64, (16, batch))
with track_saved() as saved:
    model.loss(split_batch(ids, mesh), split_batch(targets, mesh))
with comm.log_collectives() as log:
    train_step(model, optimizer, ids, targets, mesh, max_norm=1.0)
measured_log = logged_by_group_op(log)  # {(group, op): (calls, payload bytes, ring bytes)}, like the plan's

# ---------------------------------------------------------------------------------------------------
# 3. Side by side, rank by rank.
# ---------------------------------------------------------------------------------------------------
rows = {"activations": (stage.memory["activations"].value, saved.total),
        "parameters": (stage.memory["parameters"].value, sum(p.data.nbytes for p in model.parameters())),
        "optimizer state": (stage.optimizer_state_of(mesh.dp.rank), optimizer.state_bytes())}
say("\n2-3. planned | measured, bytes per rank:")
each_rank("  ".join(f"{name} {p:,} | {m:,}" for name, (p, m) in rows.items()))
planned_log = by_group_op(stage.messages)
say("     sent per step (ring bytes), planned | measured, by group and collective:")
for key in sorted(set(planned_log) | set(measured_log)):
    p, m = planned_log.get(key, (0, 0, 0)), measured_log.get(key, (0, 0, 0))
    say(f"       {key[0]:>3s} {key[1]:15s} {p[0]:3d} × → {float(p[2]):>10,.0f} B | {m[0]:3d} × → {float(m[2]):>10,.0f} B")
equal = all(p == m for p, m in rows.values()) and planned_log == measured_log
unexplained = sum(abs(p - m) for p, m in rows.values()) + sum(
    abs(planned_log.get(k, (0, 0, 0))[2] - measured_log.get(k, (0, 0, 0))[2]) for k in set(planned_log) | set(measured_log))
unexplained = MPI.COMM_WORLD.allreduce(unexplained, op=MPI.MAX)  # the verdict quotes rank 0: make it the worst

# ---------------------------------------------------------------------------------------------------
# 4. Scaling up: the same planner, a 70B-class GPT (h = 8192, 80 layers, 64 heads, s = 4096) on 64 GPUs,
# tp 8 × pp 4 × dp 2, SP, selective recomputation, ZeRO-1, bf16 (mixed precision, fp32 master slices: measured
# byte for byte at small scale by tests/test_plan.py).
# ---------------------------------------------------------------------------------------------------
big = plan(Model(vocab=50304, seq_len=4096, hidden=8192, heads=64, layers=80, dropout=0.1), Mesh(dp=2, pp=4, tp=8),
           Choices(micro_batch=1, global_batch=64, sequence_parallel=True, recompute="selective", zero=1,
                   precision="bf16"))
say("\n4. scaled up (python -m minitp.plan --hidden 8192 --layers 80 --heads 64 --seq 4096 --tp 8 --pp 4 --dp 2 "
    "--sp --recompute selective --zero 1 --dtype bf16):\n")
say(table(big))
verdict(equal, f"planned == measured byte for byte (activations, parameters, optimizer state, every collective's "
               f"count and ring bytes), unexplained {float(unexplained):.0f} B, max error 0 on {world} "
               f"rank{'s' * (world > 1)}", f"planned != measured by {float(unexplained):,.0f} B")
