"""Train a small character-level GPT with tensor, sequence and data parallelism -- and prove it is the
serial model's training, step for step.

    python tutorials/train_gpt.py                                        # one process
    mpirun -n 4 python tutorials/train_gpt.py --tp 2 --dp 2              # 2 replicas of 2 TP ranks
    mpirun -n 4 python tutorials/train_gpt.py --tp 4 --sequence-parallel
    mpirun -n 4 python tutorials/train_gpt.py --tp 2 --dp 2 --check      # losses == serial, float64
    mpirun -n 4 python tutorials/train_gpt.py --cp 2 --tp 2 --check      # the sequence split over 2 ranks too
    mpirun -n 4 python tutorials/train_gpt.py --tp 4 --steps 100 --save gpt.npz
    mpirun -n 2 python tutorials/train_gpt.py --tp 2 --load gpt.npz      # resume on another mesh
    mpirun -n 4 python tutorials/train_gpt.py --pp 2 --tp 2 --microbatches 4 --schedule 1f1b --check
    mpirun -n 4 python tutorials/train_gpt.py --tp 2 --dp 2 --zero 1 --overlap --trace trace.json
    mpirun -n 4 python tutorials/train_gpt.py --experts 4 --top-k 2 --ep 4 --capacity-factor 1.25 --check

The ranks form a (dp × tp) grid (``comm.init``; tp ranks contiguous). Each group of tp ranks holds one
copy of the model cut into shards -- the embedding and the LM head by vocabulary, attention by heads,
the MLP by columns then rows, and with ``--sequence-parallel`` the LayerNorms and dropouts by sequence.
With ``--cp C`` every activation is split along the sequence over C ranks as well, attention crossing
them by ring attention (``--cp-kind ring``, or ``zigzag``: its causal work balanced) or Ulysses
(``minitp.parallel.context.layers``); the mesh is then (dp × cp × tp).
The dp copies each take their slice of the batch, and after backward average their gradients with one
all-reduce. With ``--pp P`` each copy is cut into P pipeline stages of consecutive layers, and the
batch into ``--microbatches`` that flow through them by ``--schedule`` (minitp.pipeline;
tutorials/pipeline.py shows it step by step). The text is tutorials/data/corpus.txt, a frozen copy of
this repository's own README and tutorials: nothing is downloaded, and the figures the README quotes
for a run stay true however the README itself changes. Every collective runs in checked mode
(``minitp.comm.checks``: the ranks first compare what they pass, so that a mistake is an error, not a
wrong answer); ``--unchecked`` skips that for speed.

Read top to bottom: the data (1), the model and the mesh (2), one training step (3), the loop (4), the
check that the parallel run IS the serial run (5), and the command line (6). The options themselves,
and why each value they refuse is refused, are the sibling file tutorials/train_gpt_options.py.
"""
import hashlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy
from mpi4py import MPI

from minitp import backend, checkpoint, comm, pipeline, trace_report
from minitp.functional.precision import UNIT_ROUNDOFF
from minitp.nn import GPT, AdamW, GPTConfig
from minitp.nn.loss_scale import DynamicLossScaler
from minitp.nn.master_weights import MasterWeights
from minitp.nn.schedule import warmup_cosine
from minitp.parallel import AllReduceGradients, FullyShardedOptimizer, ParallelGPT, ZeroOptimizer
from minitp.training import Pipelined, train_step, whole_batch
from minitp.training.evaluate import evaluate_loss
from minitp.training.throughput import machine_gemm_rate, step_flops
from minitp.report import end_progress, progress, say

# the command line (section 6): this file's sibling, found because Python puts the folder of the script
# it runs first on sys.path
from train_gpt_options import check_args, check_args_of, fail, overridden_by_check, parse, validate

REPOSITORY = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------------------
# 1. The data: this repository's prose and code, one character per token.
#
# The text is a frozen copy of the README and the tutorials (tutorials/data/corpus.txt), not the files
# themselves: every edit of those would change the text, and with it the losses the README quotes.
# Rank 0 reads the file and broadcasts the text, so every rank trains on the same characters even if
# a file changes while the job starts (and no rank but 0 needs to see the files). The vocabulary is the
# set of characters, padded to a multiple of 8 -- Megatron pads its vocabulary the same way -- because
# the vocab-parallel embedding gives each of the t ranks V/t rows: with V a multiple of 8, any tp in
# {1, 2, 4, 8} divides it, and a checkpoint moves between those meshes. The padding ids never occur, so
# the model just learns to give them no probability.
# ---------------------------------------------------------------------------------------------------
VOCAB_MULTIPLE = 8
CORPUS = REPOSITORY / "tutorials" / "data" / "corpus.txt"
HELD_OUT = 0.1
"""The share of the text, at its END, that no training batch ever reads: the held-out loss measures what
the model learned about text it has not seen (on this small corpus a falling training loss with a rising
held-out loss is overfitting, invisible otherwise). The end rather than random windows: windows drawn
anywhere would overlap the training windows by all but a few characters."""


def split_held_out(data):
    """(training characters, held-out characters): the first 90% and the last 10% of ``data``."""
    cut = len(data) - int(len(data) * HELD_OUT)
    return data[:cut], data[cut:]


def read_corpus(comm=MPI.COMM_WORLD, path=None):
    """The text of ``path`` (unset: ``CORPUS``), as one string, the same on every rank. A file that
    cannot be read (missing, not UTF-8) raises the same ValueError on every rank: rank 0 broadcasts
    what went wrong instead of the text, so no rank waits for a text that never comes."""
    text, problem = None, None
    if comm.Get_rank() == 0:
        try:
            text = Path(path or CORPUS).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            problem = f"cannot read the text {path or CORPUS}: {type(error).__name__}: {error}"
    text, problem = comm.bcast((text, problem), root=0)
    if problem is not None:
        raise ValueError(problem)
    return text


def corpus_hash(text):
    """A short fingerprint of the training text, stored in checkpoints: resuming on another corpus is refused."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class Characters:
    """Characters <-> ids: id i is the i-th character in sorted order; ``vocab`` is padded up to a
    multiple of ``VOCAB_MULTIPLE``."""

    def __init__(self, text):
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}
        self.vocab = math.ceil(len(self.chars) / VOCAB_MULTIPLE) * VOCAB_MULTIPLE

    def encode(self, text):
        return numpy.array([self.index[c] for c in text], dtype=numpy.int64)

    def decode(self, ids):
        return "".join(self.chars[i] if i < len(self.chars) else "?" for i in ids)


def batch_at(data, step, batch, seq, seed=0):
    """The global batch of training step ``step``: ``batch`` random windows of seq + 1 characters,
    as ids (s, B) and targets (s, B) -- the next character at every position.

    A pure function of (seed, step): a run resumed from a checkpoint at step k draws the batches the
    uninterrupted run draws, whatever its mesh."""
    starts = numpy.random.default_rng([seed, step]).integers(0, len(data) - seq - 1, batch)
    windows = numpy.stack([data[start:start + seq + 1] for start in starts], axis=1)  # (s + 1, B)
    return windows[:-1], windows[1:]


# ---------------------------------------------------------------------------------------------------
# 2. The model on the mesh.
#
# A GPTConfig describes the model once. ParallelGPT is nn.GPT built from tensor-parallel layers: each
# rank draws only its shards of the serial GPT-2 initialisation (a weight's values are a function of the
# seed, its name and its index), so every mesh starts from the same weights and no rank ever holds the
# whole model.
# AdamW is built from named_parameters(): its state is keyed by the serial names, which is what lets a
# checkpoint hold it in serial shapes.
# --zero 1 shards that state over the dp replicas (ZeroOptimizer: each keeps 1/dp of it), --zero 2 the
# gradients too (each bucket reduce-scattered inside backward), --zero 3 the parameters too
# (FullyShardedOptimizer: each block gathered for its forward and its backward, then freed); --overlap
# reduces gradients during backward, bucket by bucket (AllReduceGradients' buckets, or ZeRO's own), and
# reduces each column-parallel layer's dX during its dA GEMM.
# ---------------------------------------------------------------------------------------------------


LOW_PRECISION = {"fp16": numpy.float16, "bf16": ml_dtypes.bfloat16}
"""--dtype's mixed-precision policies: the model's dtype; the optimizer keeps fp32 master weights and
moments (``MasterWeights``), and fp16 scales the loss (``DynamicLossScaler``: its gradients underflow;
bf16's exponent is fp32's, so its gradients do not)."""


def model_dtype(args):
    """The dtype the model's parameters, activations and gradients are in."""
    return LOW_PRECISION.get(args.dtype) or numpy.dtype(args.dtype).type


def build(args, vocab, mesh, dtype):
    """(model, optimizer, gradients): this rank's ParallelGPT (or PipelineGPT stage) on ``mesh``, or with
    ``mesh=None`` the serial nn.GPT; ``gradients`` the gradient synchronisation of plain data parallelism
    (None serially, and under ZeRO, whose optimizer is its own)."""
    config = GPTConfig(vocab=vocab, seq_len=args.seq, hidden=args.hidden, heads=args.heads, layers=args.layers,
                       dropout=args.dropout, seed=args.seed, tie_embeddings=args.tie_embeddings, dtype=dtype,
                       recompute=None if args.recompute == "none" else args.recompute,
                       **(dict(experts=args.experts, top_k=args.top_k, capacity_factor=args.capacity_factor,
                               aux_loss_coef=args.aux_loss_coef, z_loss_coef=args.z_loss_coef)
                          if getattr(args, "experts", 0) else {}))
    if mesh is None:
        model = GPT(config)
    else:
        context = args.cp_kind if mesh.cp_size > 1 else None
        if pipelined(args):  # this rank's stage: only its layers (refused if pp × chunks does not divide them)
            model = pipeline.PipelineGPT(config, mesh, args.sequence_parallel, args.virtual_stages, context,
                                         overlap=args.overlap)
        else:
            model = ParallelGPT(config, mesh, sequence_parallel=args.sequence_parallel, context_parallel=context,
                                overlap=args.overlap)
    optimizer = AdamW(model.named_parameters(), lr=args.lr, weight_decay=args.weight_decay)
    # mixed precision: fp32 master weights and moments beside the fp16/bf16 model -- of every parameter
    # (MasterWeights), or under ZeRO of this rank's slices only (master_dtype); the gradients reduced in
    # the model's dtype (Megatron's default) or, with --grad-reduce fp32, packed and reduced in fp32
    master = numpy.float32 if args.dtype in LOW_PRECISION else None
    reduce = numpy.float32 if args.grad_reduce == "fp32" else None
    if master is not None and not (mesh is not None and args.zero):
        optimizer = MasterWeights(optimizer, master)
    gradients, bucket_bytes = None, args.bucket_mb * 2 ** 20
    if mesh is not None and args.zero == 3:  # every parameter 1/dp per rank, gathered block by block
        optimizer = FullyShardedOptimizer(optimizer, model, mesh, overlap=args.overlap, master_dtype=master,
                                          reduce_dtype=reduce)
    elif mesh is not None and args.zero:  # reduce-scatters the gradients into the slices it updates
        optimizer = ZeroOptimizer(optimizer, mesh, bucket_bytes, overlap=args.overlap, stage=args.zero,
                                  master_dtype=master, reduce_dtype=reduce)
    elif mesh is not None:
        gradients = AllReduceGradients(model, mesh, bucket_bytes, overlap=args.overlap, reduce_dtype=reduce)
    return model, optimizer, gradients


def loss_scaler(args, scale=2.0 ** 15):
    """fp16's dynamic loss scaler, starting at ``scale`` (fp16's small gradients underflow; bf16's do
    not), else None."""
    return DynamicLossScaler(scale) if args.dtype == "fp16" else None


# ---------------------------------------------------------------------------------------------------
# 3. One training step (minitp.training.train_step), whatever the mesh:
#
#     ids, targets (s, B)  -> this replica's columns (s, B/dp); under --cp this rank's s/cp tokens of them
#     forward and backward: the whole slice at once (whole_batch), or with --pp / --microbatches m
#              microbatches through the stages by --schedule (Pipelined): the vocab-parallel embedding,
#              the TP(+SP) blocks, the column-parallel LM head and the vocab-parallel cross-entropy --
#              the loss without ever gathering the s×b×V logits
#     the gradients synchronised: the tied table summed over the pipeline's two ends, then averaged over
#              the replicas (dp, × cp) in flat buckets -- one collective per bucket, once per step, after
#              each parameter's last microbatch
#     clip by the global norm: split parameters' squares summed over tp, stages' over pp, each counted once
#     AdamW
#
# --zero 1: the buckets are reduce-scattered instead, clipped from the slices, AdamW updates this
# replica's slice and all-gathers the parameters (tutorials/zero.py). --overlap: the buckets' reductions
# start inside the last backward. The same function runs the serial nn.GPT (mesh=None).
# ---------------------------------------------------------------------------------------------------


def pipelined(args):
    """Stages or microbatches asked for: the model is a ``pipeline.PipelineGPT`` run by a schedule."""
    return args.pp > 1 or args.microbatches > 1


def train(model, optimizer, gradients, data, args, mesh, first_step=0, report=None, scaler=None):
    """Steps [first_step, args.steps) on the batches ``batch_at`` draws; returns their losses and their
    gradient norms (before clipping). ``scaler``: fp16's loss scaler (``loss_scaler``), or None. Each
    step's lr is set first: warmup, then cosine decay (``minitp.nn.schedule``), a function of the step
    alone, so a resumed run uses the uninterrupted run's lrs; ``optimizer.lr`` is AdamW's own, or ZeRO's,
    which is the wrapped AdamW's. ``report(step, loss, norm, seconds)`` is called after each step (on
    every rank). With ``--trace``, ``--trace-steps`` steps after the first are recorded into one timeline
    of every rank."""
    # the whole batch at once, or m microbatches through the stages by the schedule (the serial model of
    # the check takes the whole batch: the microbatches' masks are blocks of the step's one mask)
    forward_backward = Pipelined(args.schedule, args.microbatches) if mesh is not None and pipelined(args) \
        else whole_batch

    def steps(first, last):
        losses, norms = [], []
        for step in range(first, last):
            ids, targets = batch_at(data, step, args.batch, args.seq, args.seed)
            optimizer.lr = warmup_cosine(step, args.lr, args.lr_min, args.warmup, args.steps)
            started = time.perf_counter()
            loss, norm = train_step(model, optimizer, ids, targets, mesh, max_norm=args.max_norm,
                                    gradients=gradients, forward_backward=forward_backward, scaler=scaler)
            if scaler is not None and not math.isfinite(norm) and math.isfinite(loss):
                norm = SKIPPED  # an overflow: the scaler skipped the step and halved its scale
            losses.append(loss)
            norms.append(norm)
            if report is not None:
                report(step, loss, norm, time.perf_counter() - started)
        return losses, norms

    if not getattr(args, "trace", None):
        return steps(first_step, args.steps)
    # The first step warms up: leave it out when there are more. Clamped both ways, so that the three
    # ranges below are [first_step, args.steps) cut in order -- no step trained twice or skipped,
    # whatever --trace-steps says.
    begin = max(first_step, min(first_step + 1, args.steps - 1))
    end = max(begin, min(begin + args.trace_steps, args.steps))
    losses, norms = steps(first_step, begin)
    with comm.record_timeline(mesh, args.trace) as timeline:
        traced = steps(begin, end)
    if timeline.trace is not None:  # world rank 0
        say(f"traced steps {begin + 1}..{end} into {args.trace} (open it in https://ui.perfetto.dev):\n"
            + trace_report.table(trace_report.breakdown(timeline.trace)))
    rest = steps(end, args.steps)
    return losses + traced[0] + rest[0], norms + traced[1] + rest[1]


# ---------------------------------------------------------------------------------------------------
# 4. The run: train, log on rank 0, save, and write a little text.
# ---------------------------------------------------------------------------------------------------


SKIPPED = -1.0
"""The gradient norm ``train`` reports for a step that fp16's loss scaler skipped (an inf or NaN gradient)."""


class Diverged(ValueError):
    """A loss or gradient norm that is not finite: every later step would be NaN too, so ``run`` stops."""


@dataclass
class Training:
    """What ``setup`` prepares: the mesh, the text, the model and its optimizer, the step to start at."""
    mesh: object
    characters: Characters
    data: numpy.ndarray  # the training characters (``split_held_out``'s first part)
    held_out: numpy.ndarray  # the last HELD_OUT of them, never in a training batch
    model: object
    optimizer: object
    gradients: object
    first_step: int
    text: str
    scaler: object = None  # fp16's loss scaler, resumed with the checkpoint


def setup(args, mesh):
    """Read the text, build the model on ``mesh``, resume from ``--load``. A configuration that cannot
    work (a batch that dp does not divide, heads or vocabulary that tp does not divide, a checkpoint of
    another model, a bucket size <= 0, a trace path that cannot be written) raises the same ValueError on
    every rank, before any training. So does a model too big for memory."""
    comm.divide(args.batch, mesh.dp_size, "--batch (the global batch, split over the --dp replicas)")
    if args.sequence_parallel:
        comm.divide(args.seq, mesh.tp_size, "--seq (split over the --tp ranks by --sequence-parallel)")
    if pipelined(args):
        pipeline.check_step(mesh, args.batch, args.schedule, args.microbatches, args.virtual_stages)
    if args.save:
        checkpoint.check_writable(args.save, mesh)  # now, not after the training
    if not args.bucket_mb > 0:
        raise ValueError(f"--bucket-mb must be a positive size, not {args.bucket_mb}")
    if args.trace:
        comm.check_writable(args.trace, mesh.world.comm)
    text = read_corpus(mesh.world.comm, args.text)
    if len(text) <= args.seq + 1:
        raise ValueError(f"the text has {len(text)} characters: too few for windows of --seq {args.seq} + 1")
    characters = Characters(text)
    if characters.vocab % mesh.tp_size:  # the text chose the vocabulary: say which tp it allows
        allowed = [t for t in range(1, characters.vocab + 1) if characters.vocab % t == 0]
        raise ValueError(f"the vocabulary of this text is {len(characters.chars)} characters, padded to "
                         f"{characters.vocab}: --tp must divide it (the embedding and the LM head are split by "
                         f"vocabulary), tp ∈ {{{', '.join(map(str, allowed))}}}, not {mesh.tp_size}")
    try:
        model, optimizer, gradients = build(args, characters.vocab, mesh, model_dtype(args))
    except MemoryError as error:  # numpy refuses an impossible allocation at once, the same on every rank
        raise ValueError(f"the model does not fit in memory ({error}): make --hidden, --layers or --seq "
                         f"smaller, or split it over more --tp or --pp ranks") from None
    model.builders.tokens_here(args.seq)  # a --seq the mesh cannot split (SP, cp): ValueError now, on every rank
    first_step, scaler = 0, loss_scaler(args)
    if args.load:  # with fp16, the loss scale goes on where it stopped
        first_step = checkpoint.load(args.load, model, optimizer, mesh, metadata=metadata(characters, text),
                                     scaler=scaler)
        if first_step > args.steps:
            raise ValueError(f"the checkpoint {args.load} is at step {first_step}, beyond --steps {args.steps}: "
                             f"pass --steps larger than {first_step} to train on from there")
        if first_step == args.steps:  # a run that would train nothing, save the same weights and say nothing
            raise ValueError(f"the checkpoint {args.load} is at step {first_step} and --steps is {args.steps}: "
                             f"nothing to train; pass --steps larger than {first_step}")
    data, held_out = split_held_out(characters.encode(text))
    if len(data) <= args.seq + 1:
        raise ValueError(f"the text has {len(text)} characters, {len(data)} of them for training (the last "
                         f"{HELD_OUT:.0%} held out): too few for windows of --seq {args.seq} + 1")
    if args.eval_every and len(held_out) <= args.seq + 1:
        raise ValueError(f"the held-out last {HELD_OUT:.0%} of the text has {len(held_out)} characters: too few for "
                         f"windows of --seq {args.seq} + 1; pass a longer --text, a shorter --seq, or --eval-every 0")
    return Training(mesh, characters, data, held_out, model, optimizer, gradients, first_step, text, scaler)


def gpu_sharing(mesh):
    """A note for the banner when ranks share a GPU (MINITP_DEVICE=gpu, more ranks than GPUs on a
    machine), else None. Not a silent change of device: the user chose it, and at large sizes it wins."""
    if backend.device() != "gpu":
        return None
    import cupy
    places = mesh.world.comm.allgather((MPI.Get_processor_name(), cupy.cuda.Device().id))
    most = max(places.count(place) for place in places)
    if most == 1:
        return None
    return (f"note: {most} ranks share one GPU. They take turns on it, and small GEMMs leave it mostly idle: "
            f"measured on one H200 (issue 24), the tutorial's default model ran at 4,271 tokens/s on 4 ranks "
            f"sharing the GPU against 62,454 on 4 CPU ranks (15x slower) and 21,464 on 1 GPU rank; the large "
            f"model (--hidden 1024 --heads 16 --layers 4 --seq 512 --batch 16) ran at 46,925 tokens/s on 1 GPU "
            f"rank, 14,531 on 4 sharing it, 1,015 on 4 CPU ranks. Small models: run on the CPU (unset "
            f"MINITP_DEVICE); large ones: one rank per GPU")


def metadata(characters, text):
    """What a checkpoint must match besides the model: the vocabulary (which character each id is) and
    the corpus it was trained on."""
    return {"vocabulary": "".join(characters.chars), "corpus": corpus_hash(text)}


def run(args, training):
    mesh, characters, data = training.mesh, training.characters, training.data
    model, optimizer, first_step = training.model, training.optimizer, training.first_step
    parameters = sum(math.prod(p.shape) for p in model.parameters())
    source = args.text or CORPUS.relative_to(REPOSITORY)
    say(f"{mesh}\n{len(training.text):,} characters of {source}, vocabulary {len(characters.chars)} "
        f"(padded to {characters.vocab}); {args.layers} layers, hidden {args.hidden}, {args.heads} heads, "
        f"seq {args.seq}, global batch {args.batch} ({args.batch // mesh.dp_size} per replica), "
        f"{args.dtype}, dropout {args.dropout}, sequence_parallel={args.sequence_parallel}, zero={args.zero}, "
        f"overlap={args.overlap}"
        f"{f', context parallel: {args.cp_kind}' if mesh.cp_size > 1 else ''}"
        f"{f', {args.experts} experts, top-{args.top_k}, capacity factor {args.capacity_factor}' if args.experts else ''}; "
        f"{parameters:,} parameters per rank"
        + (f"; {args.schedule} schedule, {args.microbatches} microbatches" if pipelined(args) else ""))
    if args.load:
        say(f"resumed from {args.load} at step {first_step}")
    say(f"lr: warmup to {args.lr:g} over {args.warmup} steps, cosine decay to {args.lr_min:g} at step {args.steps}; "
        f"{len(data):,} characters for training, the last {len(training.held_out):,} held out"
        + (f" (their loss every {args.eval_every} steps, {args.eval_batches} batches)" if args.eval_every else ""))
    shared = gpu_sharing(mesh)
    if shared:
        say(shared)
    # MFU's denominator: every rank times a GEMM at once (minitp.training.throughput)
    gemm = machine_gemm_rate(numpy.dtype(model_dtype(args)), mesh.world.comm)
    flops = step_flops(args.batch, args.seq, args.layers, args.hidden, characters.vocab,
                       top_k=args.top_k if args.experts else 1)
    say(f"measured GEMM rate {gemm / 1e9:,.1f} GFLOP/s ({args.dtype}, all {mesh.world.size} ranks at once); "
        f"{flops / 1e9:,.2f} GFLOP of model flops per step (minitp.plan.flops, Narayanan et al. eq. 3)")

    tokens_per_step = args.seq * args.batch
    window = {"seconds": 0.0, "steps": 0, "loss": 0.0}
    held_out = [batch_at(training.held_out, i, args.batch, args.seq, args.seed)  # the same batches every time
                for i in range(args.eval_batches if args.eval_every else 0)]
    forward = dict(schedule=args.schedule, microbatches=args.microbatches) if pipelined(args) else {}

    def evaluate(step):
        losses = [evaluate_loss(model, ids, targets, mesh, **forward) for ids, targets in held_out]
        say(f"held-out loss {sum(losses) / len(losses):.4f} at step {step + 1}/{args.steps} "
            f"(mean of {len(losses)} fixed batches of the last {HELD_OUT:.0%} of the text)")

    def report(step, loss, norm, seconds):
        if not (math.isfinite(loss) and math.isfinite(norm)):  # the same on every rank: every rank stops
            raise Diverged(f"the loss is {loss} and the gradient norm {norm} at step {step + 1}: the training "
                           f"diverged (its weights are not saved); try a smaller --lr (now {args.lr}) or "
                           f"--weight-decay (now {args.weight_decay})")
        if norm == SKIPPED:
            window["skipped"] = window.get("skipped", 0) + 1
        window["seconds"] += seconds
        window["steps"] += 1
        window["loss"] += loss
        if (step + 1) % args.log_every == 0 or step == first_step or step + 1 == args.steps:
            # one batch's loss is noisy: print the mean since the last line
            speed = window["steps"] * tokens_per_step / window["seconds"]
            mfu = window["steps"] * flops / window["seconds"] / gemm
            mean = window["loss"] / window["steps"]
            end_progress()
            say(f"step {step + 1:4d}/{args.steps}  loss {mean:.4f} (mean of {window['steps']:3d})  "
                f"grad norm {norm:6.3f}  lr {optimizer.lr:.2e}  {speed:8,.0f} tokens/s  MFU {mfu:5.1%}"
                + (f"  ({window['skipped']} skipped by the loss scaler)" if window.get("skipped") else ""))
            window.update(seconds=0.0, steps=0, loss=0.0, skipped=0)
        else:  # a terminal sees every step on one line, rewritten (nothing when the output is a file)
            progress(f"step {step + 1:4d}/{args.steps}  loss {loss:.4f}  lr {optimizer.lr:.2e}")
        if args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
            end_progress()
            evaluate(step)
        if args.save and args.save_every and (step + 1) % args.save_every == 0:
            checkpoint.save(args.save, model, optimizer, mesh, step=step + 1,
                            metadata=metadata(characters, training.text), scaler=training.scaler)

    started = time.perf_counter()
    losses, _ = train(model, optimizer, training.gradients, data, args, mesh, first_step, report, training.scaler)
    elapsed = time.perf_counter() - started
    if losses:
        last = losses[-args.log_every:]
        say(f"trained steps {first_step + 1}..{args.steps} in {elapsed:.1f} s: loss {losses[0]:.4f} (first step) -> "
            f"{sum(last) / len(last):.4f} (mean of the last {len(last)}), "
            f"{len(losses) * tokens_per_step / elapsed:,.0f} tokens/s overall")
    if args.save:
        checkpoint.save(args.save, model, optimizer, mesh, step=args.steps, metadata=metadata(characters, training.text),
                        scaler=training.scaler)
        say(f"saved {args.save} (one file, serial parameter names: load it on any mesh)")
    if args.sample and mesh.pp_size > 1:
        say("(no sample: generating is written for the whole model on one stage; run --pp 1 to sample)")
    elif args.sample:
        # every rank of a tp group takes part (each step all-gathers the last position's logits); the
        # same seed on every rank draws the same characters
        prompt = characters.encode("The ")[:, None]  # (s, b=1)
        ids = model.generate(prompt, args.sample, temperature=args.temperature,
                             rng=numpy.random.default_rng(args.seed))
        say("sample:\n" + characters.decode(ids[:, 0].tolist()))
    return losses


# ---------------------------------------------------------------------------------------------------
# 5. The proof: the parallel run is the serial run.
#
# In float64 with dropout ON, train the same tiny GPT (check_args) for 10 steps on the mesh and serially
# (nn.GPT, the whole batch, on every rank), and compare the losses step by step. Everything that could
# differ is made not to: the weights start from the same serial initialisation; every dropout mask is a
# function of (seed, counter, global element index), and each rank passes the place of its block in the
# global tensor -- its heads, its sequence block under SP, its replica's batch columns under dp; the
# gradient averaged over dp is the global batch's; the global norm counts every parameter once. What
# remains is rounding: sums taken in another order, far below 1e-9.
#
# --dtype fp16 or bf16 --check runs both in that policy (an fp16/bf16 model, fp32 masters and moments,
# fp16's loss scale), and the bound is no longer 1e-9 but a few units of the low precision's roundoff
# u (2^-11 in fp16, 2^-8 in bf16: half the spacing of the numbers next to 1). Why, and how many:
#   - the runs differ only in the order of their sums that cross ranks: under tp each rank rounds its
#     partial product to the low precision before the all-reduce adds them (in it), and dp averages the
#     replicas' gradients in it. Reordering a sum of n terms moves it by at most (n-1)·u·Σ|terms|
#     (Higham, "Accuracy and Stability of Numerical Algorithms", §4.2): a few u of each activation and
#     gradient, n <= 4 ranks here;
#   - the loss is itself a low-precision number, rounded last: whatever differed before moves it by at
#     most one unit in its last place, <= 2u·|loss|, in each run (the dp mean of rounded losses, in
#     float64, can land between two of them);
#   - the weights that later steps compute with are the fp32 masters, moved by AdamW's update m/√v, in
#     which a gradient a few u off moves by ~lr·u: after 10 steps at lr <= 3e-3, ~3e-2·u of a weight,
#     far below one unit of the loss.
# One thing differs by design, not by rounding: where fp16's dynamic loss scaler overflows. A replica's
# loss is the mean over ITS tokens, so its backward values are dp × cp times the serial run's (the mean
# over all of them comes after, in the reduction): at S = 2^15 the check's dp 4 replicas overflow at
# step 1 where the serial run does not, skip it, and the two runs part ways. The check compares the
# arithmetic, so it starts both scalers at CHECK_LOSS_SCALE = 2^12, far from either overflow (its
# growth comes after 1,000 clean steps: the scale stays put); the scaler's own rules are proven in
# tests/test_mixed_precision.py, and a training run simply skips the steps it must.
# So: every step's loss within LOW_PRECISION_BOUND = 4 units of u·|serial loss| (the two runs' last
# roundings, doubled for the gradients' few u), and every gradient norm (summed in float64 from the
# unscaled fp32 gradients) within 4u of the serial one, relatively. A wrong mean (a sum over dp: norms
# twice as large), a mask from the wrong place (a loss moved by ~dropout·|loss|) or a missing reduction
# is orders of magnitude outside it; the float64 check above stays the exact proof.
# ---------------------------------------------------------------------------------------------------
CHECK_TOLERANCE = 1e-9
LOW_PRECISION_BOUND = 4
"""--check's bound in fp16/bf16, in units of u·|serial value| (the derivation above)."""
CHECK_LOSS_SCALE = 2.0 ** 12
"""Where --check's fp16 loss scalers start, both runs: far from either one's overflow (above)."""


@dataclass
class CheckResult:
    parallel: list  # the losses of the parallel run, step by step
    serial: list
    parallel_norms: list  # the gradient norms before clipping
    serial_norms: list
    unit: float = None  # u of the low-precision policy; None: float64, compared with CHECK_TOLERANCE

    @property
    def max_difference(self):
        """The largest difference of a loss, or of a gradient norm relative to the serial one: a norm
        catches what clipping would hide (gradients summed over dp instead of averaged are clipped back
        to the same size, and the losses barely move)."""
        losses = [abs(p - s) for p, s in zip(self.parallel, self.serial)]
        norms = [abs(p - s) / max(abs(s), 1e-300) for p, s in zip(self.parallel_norms, self.serial_norms)]
        return max(losses + norms)

    @property
    def worst_in_units(self):
        """In fp16/bf16: the largest difference of a loss or a norm, relative to the serial one, in units
        of u (the bound is ``LOW_PRECISION_BOUND``)."""
        pairs = list(zip(self.parallel, self.serial)) + list(zip(self.parallel_norms, self.serial_norms))
        return max(abs(p - s) / max(abs(s), 1e-300) for p, s in pairs) / self.unit

    @property
    def passed(self):
        if self.unit is None:
            return self.max_difference <= CHECK_TOLERANCE
        return self.worst_in_units <= LOW_PRECISION_BOUND


def check(args, mesh):
    """The losses and gradient norms of ``args.steps`` steps on ``mesh`` and serially, in float64 (or
    both in ``args.dtype``'s mixed-precision policy); the same on every rank."""
    text = read_corpus(mesh.world.comm, args.text)
    characters = Characters(text)
    data, _ = split_held_out(characters.encode(text))  # what the run trains on
    dtype = model_dtype(args)
    scale = CHECK_LOSS_SCALE  # fp16: far from overflow in either run (section 5)
    parallel = train(*build(args, characters.vocab, mesh, dtype), data, args, mesh, scaler=loss_scaler(args, scale))
    serial = train(*build(args, characters.vocab, None, dtype), data, args, None, scaler=loss_scaler(args, scale))
    unit = UNIT_ROUNDOFF[numpy.dtype(dtype)] if args.dtype in LOW_PRECISION else None  # u: 2^-11 fp16, 2^-8 bf16
    return CheckResult(parallel[0], serial[0], parallel[1], serial[1], unit)


def run_check(args, mesh, overridden=()):
    if overridden:
        say(f"--check sets {', '.join(overridden)} itself (a tiny model with dropout, in float64 or the --dtype "
            "fp16/bf16 policy): those options are ignored")
    result = check(args, mesh)  # the same on every rank: rank 0 says it
    context = f", context parallel: {args.cp_kind}" if mesh.cp_size > 1 else ""
    stages = (f", {args.schedule} schedule, {args.microbatches} microbatches, {args.virtual_stages} chunk(s) per "
              f"rank" if pipelined(args) else "")
    experts = (f", {args.experts} experts, top-{args.top_k}, capacity factor {args.capacity_factor}"
               if args.experts else "")
    precision = "float64" if result.unit is None else f"{args.dtype} (fp32 master weights and moments)"
    say(f"check: {mesh}, sequence_parallel={args.sequence_parallel}{context}{stages}{experts}, zero={args.zero}, "
        f"overlap={args.overlap}, {precision}, dropout {args.dropout}")
    say(" step   parallel loss        serial loss      |difference|   grad norm (parallel, serial)")
    for step, (p, s, pn, sn) in enumerate(zip(result.parallel, result.serial, result.parallel_norms,
                                              result.serial_norms), 1):
        say(f"{step:5d}  {p:.15f}  {s:.15f}  {abs(p - s):.1e}          {pn:.12f} {sn:.12f}")
    verdict = "OK" if result.passed else "FAIL"
    if result.unit is None:
        say(f"{verdict}: the largest difference from the serial run (losses, and gradient norms relative) is "
            f"{result.max_difference:.1e} (tolerance {CHECK_TOLERANCE:.0e})")
    else:
        say(f"{verdict}: the largest difference from the serial run in the same policy (losses and gradient "
            f"norms, relative) is {result.worst_in_units:.2f} u, u = 2^{round(math.log2(result.unit))} "
            f"(bound {LOW_PRECISION_BOUND} u: train_gpt.py section 5 derives it)")
    return result.passed


# ---------------------------------------------------------------------------------------------------
# 6. The command line: parse it, refuse what cannot work, then prove or train. The options, and why each
# value they refuse is refused, are tutorials/train_gpt_options.py.
# ---------------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse(argv)
    try:
        # errors of configuration are raised by every rank alike, before any training: rank 0 says why
        validate(args)
        mesh = comm.init(tp=args.tp, dp=args.dp, cp=args.cp, pp=args.pp, ep=args.ep,
                         checked=not args.unchecked)  # sizes ≠ ranks, ep not dividing dp: ValueError
        if args.check:
            proof = check_args_of(args, mesh.dp_size)  # the check's tiny model, on this mesh
            if pipelined(proof):
                pipeline.check_step(mesh, proof.batch, args.schedule, args.microbatches, args.virtual_stages)
            return 0 if run_check(proof, mesh, overridden_by_check(argv, args)) else 1
        prepared = setup(args, mesh)
    except (ValueError, OSError) as problem:
        return fail(problem)
    try:
        run(args, prepared)
    except (Diverged, MemoryError) as problem:  # the same loss, the same batch shapes on every rank
        return fail(f"out of memory: {problem}: make --batch, --seq, --hidden or --layers smaller"
                     if isinstance(problem, MemoryError) else problem)
    return 0


if __name__ == "__main__":
    sys.exit(main())
