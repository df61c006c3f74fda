"""train_gpt.py's command line: what each option means, and why each value it refuses is refused.

train_gpt.py reads as the training; this file is its plumbing. ``parse`` reads the options, ``validate``
refuses every value that cannot work before any work (a ``ValueError`` naming the option, which
train_gpt.py's ``main`` ends with one ``error:`` line and status 2, said by rank 0: ``fail``), and the
rest sets up ``--check``. Every rank parses the same command line, so every rank refuses alike and no
rank is left waiting in a collective for one that stopped.

The options, by group:

  the mesh       --tp, --dp, --cp (--cp-kind), --pp (--microbatches, --schedule, --virtual-stages),
                 --sequence-parallel. dp × pp × cp × tp must be the number of ranks (``comm.init``
                 refuses another product); --dp unset fills what the others leave.
  the data       --text: any UTF-8 file (unset: tutorials/data/corpus.txt, frozen, so that the figures
                 the README quotes stay true).
  the model      --seq, --hidden, --heads, --layers, --dropout, --tie-embeddings, --recompute, --dtype
                 (float32, float64, or fp16 and bf16: mixed precision), --grad-reduce (the gradients
                 on the wire in the model's dtype, or fp32).
  experts        --experts (0: the dense MLP), --top-k, --capacity-factor (unset: no drops),
                 --aux-loss-coef, --z-loss-coef, and --ep: the experts spread over ep ranks carved out of
                 dp (ep must divide dp).
  the training   --steps, --batch (global: split over dp, then into microbatches), --lr, --weight-decay
                 (AdamW), --max-norm (clipping), --seed (the weights, the dropout masks and the batches);
                 --warmup and --lr-min: the lr ramps up linearly over --warmup steps, then decays along
                 a cosine to --lr-min at the last step (minitp.nn.schedule; --warmup 0 --lr-min = --lr:
                 a constant lr). --microbatches m at --pp 1 is gradient accumulation: the same step as
                 the whole batch (the microbatches' dropout masks are blocks of the step's one mask).
  held out       the last ``HELD_OUT`` (10%) of the text's characters are never in a training batch;
                 every --eval-every steps (0: never) the loss on --eval-batches fixed batches of them.
  data parallel  --zero 1|2|3 (ZeRO: the optimizer state, + the gradients, + the parameters sharded over
                 dp), --overlap (the gradients reduced during backward; stage 3 also prefetches the next
                 block's parameters), --bucket-mb (the size of the buckets they are reduced in).
  what is left   --log-every, --sample and --temperature (a text generated at the end), --save and
                 --save-every (a checkpoint, in serial names), --load (resume, on any mesh), --trace
                 and --trace-steps (a timeline of every rank).
  the proof      --check (train_gpt.py section 5), --unchecked (skip checked mode's test of shapes).

Why each refusal (``validate``) exists:

  * sizes and counts below 1 mean nothing (0 ranks, 0 layers), and some would run without saying so:
    --trace-steps -1 once trained a step twice, 0 wrote an empty trace;
  * --sample, --save-every and --seed below 0: numpy's generators take no negative seed (the run died
    at its first step), and a negative count means nothing; --sample above ``MAX_SAMPLE``: each
    character is one forward pass;
  * --dropout must be in [0, 1): at 1 nothing is kept;
  * --warmup must be in [0, --steps): a warmup as long as the run never trains at --lr; --lr-min in
    [0, --lr]: a floor above the peak would make the "decay" a rise; --eval-every >= 0 and
    --eval-batches >= 1 (0 batches would average nothing);
  * --lr, --weight-decay, --max-norm and --temperature must be finite and of the right sign: a NaN or
    inf poisons every weight at the first step; a negative --max-norm would ascend the gradient and 0
    zero it; lr × weight decay must stay below 1, since AdamW multiplies every weight by 1 - lr·wd each
    step, which would zero or flip them;
  * every combination of --dp, --pp, --cp, --tp, --sequence-parallel, --zero and --overlap runs (none
    is refused as "not built"); --heads must divide --hidden; --virtual-stages needs the
    interleaved schedule on 2 stages or more;
  * options that would be ignored in silence: --save-every without --save (it saved nothing), and with
    --check (which trains its own tiny model) --save, --load, --trace and --unchecked;
  * --text and --load must be files, so that a typo is an error before any collective;
  * --dtype fp16 and bf16 (mixed precision: the model in 2 bytes, fp32 master weights and moments; fp16
    also dynamic loss scaling) run on every mesh, with ZeRO, checkpoints and --check (in the policy,
    within a derived bound); --grad-reduce fp32 is refused for a float32/float64 model (nothing to widen);
  * experts: --top-k in [1, --experts] (each token picks k different experts), --capacity-factor > 0 (at
    0 every token is dropped), --ep dividing --experts (E/ep each) and only with experts; not built with
    experts: --pp/--microbatches (the aux loss would cross stages), --cp (its zigzag blocks are not one run
    of the capacity's token order), --recompute full (the aux loss leaves the block beside its output),
    --zero 1 with --ep > 1 (the experts reduce over expert-dp, ZeRO shards over dp), --save/--load with
    --ep > 1 (the checkpoint does not yet merge the experts over ep).

What depends on the mesh or on the text (a --batch that dp does not divide, a vocabulary that tp does
not divide, a checkpoint of another model, a path that cannot be written) is refused by train_gpt.py's
``setup``, after the mesh exists, the same way.
"""
import argparse
import math
import sys
from pathlib import Path

from mpi4py import MPI

from minitp import pipeline

DESCRIPTION = ("Train a small character-level GPT with tensor, sequence and data parallelism -- and prove it is the "
               "serial model's training, step for step.")
MAX_SAMPLE = 100_000  # one forward pass per character: already minutes

MIXED_PRECISION = ("fp16", "bf16")
"""--dtype's mixed-precision policies (a 2-byte model, fp32 masters and moments; train_gpt.LOW_PRECISION
maps each to its dtype): --grad-reduce fp32 is for them, and --check runs in them instead of float64."""


def parse(argv=None):
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # the mesh
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per model replica")
    parser.add_argument("--dp", type=int, default=None, help="data-parallel replicas (unset: ranks / tp)")
    parser.add_argument("--sequence-parallel", action="store_true", help="split LayerNorm and dropout by sequence")
    parser.add_argument("--cp", type=int, default=1, help="context-parallel ranks: every activation split by sequence")
    parser.add_argument("--cp-kind", choices=["ring", "zigzag", "ulysses"], default="zigzag",
                        help="how attention crosses the cp ranks: ring attention (zigzag: load-balanced) or Ulysses")
    parser.add_argument("--pp", type=int, default=1, help="pipeline stages per model replica")
    parser.add_argument("--microbatches", type=int, default=1, help="microbatches per step (through the stages)")
    parser.add_argument("--schedule", choices=pipeline.SCHEDULES, default="1f1b", help="the pipeline schedule")
    parser.add_argument("--virtual-stages", type=int, default=1, help="model chunks per rank (--schedule interleaved)")
    parser.add_argument("--ep", type=int, default=1,
                        help="expert-parallel ranks, carved out of dp: each holds experts/ep experts (needs --experts)")
    # the data, the model, the training
    parser.add_argument("--text", metavar="FILE",
                        help="train on this UTF-8 file (unset: tutorials/data/corpus.txt, the README and "
                             "tutorials, frozen)")
    parser.add_argument("--steps", type=int, default=500, help="training steps")
    parser.add_argument("--batch", type=int, default=16, help="global batch (split over dp)")
    parser.add_argument("--seq", type=int, default=64, help="context length")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size h")
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
    parser.add_argument("--layers", type=int, default=2, help="transformer layers")
    parser.add_argument("--dropout", type=float, default=0.0, help="dropout probability, in [0, 1)")
    parser.add_argument("--tie-embeddings", action="store_true", help="the LM head reuses the embedding")
    parser.add_argument("--recompute", choices=["none", "selective", "full"], default="none",
                        help="re-run in backward instead of keeping: the attention core (selective) or each block "
                             "(full); the same numbers, less activation memory (Korthikanti et al. 2022)")
    parser.add_argument("--experts", type=int, default=0, help="experts per MoE MLP (0: the dense MLP)")
    parser.add_argument("--top-k", type=int, default=1, help="experts per token (1: Switch, 2: Mixtral)")
    parser.add_argument("--capacity-factor", type=float, default=None,
                        help="each expert takes at most c·tokens·k/E (token, choice) pairs; unset: no drops")
    parser.add_argument("--aux-loss-coef", type=float, default=0.01, help="Switch's load-balancing loss coefficient")
    parser.add_argument("--z-loss-coef", type=float, default=0.0, help="the router z-loss coefficient (ST-MoE)")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW's learning rate")
    parser.add_argument("--warmup", type=int, default=None,
                        help="steps of linear warmup to --lr, then a cosine decay to --lr-min at the last step "
                             "(unset: a tenth of --steps)")
    parser.add_argument("--lr-min", type=float, default=None, help="the floor of the cosine decay (unset: --lr / 10)")
    parser.add_argument("--weight-decay", type=float, default=0.01, help="AdamW's decoupled weight decay")
    parser.add_argument("--max-norm", type=float, default=1.0, help="clip gradients to this global norm (> 0)")
    parser.add_argument("--dtype", choices=["float32", "float64", *MIXED_PRECISION], default="float32",
                        help="parameters and activations; fp16 and bf16: mixed precision (fp32 master weights and "
                             "moments; fp16 also dynamic loss scaling)")
    parser.add_argument("--grad-reduce", choices=["model", "fp32"], default="model",
                        help="the dtype the gradients cross the wire in: the model's (2 bytes an element under "
                             "fp16/bf16, as Megatron's default) or fp32 (4 bytes: sums rounded once, in fp32)")
    parser.add_argument("--seed", type=int, default=0, help="weights, dropout and batches")
    # what the run leaves: log lines, a sample, checkpoints
    parser.add_argument("--log-every", type=int, default=50, help="steps between log lines")
    parser.add_argument("--eval-every", type=int, default=100,
                        help="steps between losses on the held-out last 10%% of the text (0: never)")
    parser.add_argument("--eval-batches", type=int, default=4, help="fixed held-out batches per evaluation")
    parser.add_argument("--sample", type=int, default=200,
                        help=f"characters to generate at the end (0: none; at most {MAX_SAMPLE:,})")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0: greedy)")
    parser.add_argument("--save", metavar="PATH", help="write a checkpoint here at the end")
    parser.add_argument("--save-every", type=int, default=0, help="... and every this many steps (0: only at the end)")
    parser.add_argument("--load", metavar="PATH", help="resume from this checkpoint (saved on any mesh)")
    # data parallelism's memory and overlap, and the timeline that shows it
    parser.add_argument("--zero", type=int, choices=[0, 1, 2, 3], default=0,
                        help="ZeRO stage over the dp (× cp) replicas: 1 the optimizer state sharded, 2 also the "
                             "gradients (reduce-scattered during backward), 3 also the parameters (gathered per "
                             "block for its forward and again for its backward)")
    parser.add_argument("--overlap", action="store_true",
                        help="reduce gradients during backward, and each column-parallel dX during its dA GEMM")
    parser.add_argument("--bucket-mb", type=float, default=25.0, help="gradient bucket size, MiB")
    parser.add_argument("--trace", metavar="FILE", help="write a timeline of every rank (Chrome trace JSON)")
    parser.add_argument("--trace-steps", type=int, default=3, help="... of this many steps (after the first)")
    # checked mode, and the proof
    parser.add_argument("--unchecked", action="store_true",
                        help="skip checked mode's test, before every collective, that the ranks pass the same "
                             "shape and dtype (one small allgather each): a mistake it catches becomes garbage "
                             "or a hang instead of an error. It saves about 30%% of a step of the default model "
                             "at --tp 2 --dp 2 (12.5 instead of 8.8 steps/s, 4 ranks on 2 busy cores); nothing "
                             "at 1 rank")
    parser.add_argument("--check", action="store_true",
                        help="prove it: 10 steps in float64 with dropout, losses and gradient norms against serial "
                             "(with --dtype fp16/bf16: in that policy, within a derived bound)")
    args = parser.parse_args(argv)
    # the schedule's defaults follow --steps and --lr: a tenth of the run warms up (nanoGPT warms up over
    # 2,000 of 600,000 steps; a short tutorial run needs relatively more), the floor is --lr / 10 (nanoGPT's)
    if args.warmup is None:
        args.warmup = max(args.steps, 0) // 10
    if args.lr_min is None:
        args.lr_min = args.lr / 10
    return args


def validate(args):
    """Every value checked before any work: ``ValueError`` naming the option. The same on every rank,
    which all parse the same command line. Options that would be ignored in silence are refused too."""
    positive = ["tp", "cp", "pp", "ep", "microbatches", "virtual_stages", "steps", "batch", "seq", "hidden", "heads",
                "layers", "log_every", "trace_steps", "eval_batches"]
    for name in positive + (["dp"] if args.dp is not None else []):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, not {getattr(args, name)}")
    for name in ("sample", "save_every", "seed", "eval_every"):  # numpy's generators take no negative seed
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be 0 or more, not {getattr(args, name)}")
    if args.sample > MAX_SAMPLE:
        raise ValueError(f"--sample must be at most {MAX_SAMPLE:,} characters (each is one forward pass), "
                         f"not {args.sample:,}")
    if not 0 <= args.dropout < 1:
        raise ValueError(f"--dropout must be in [0, 1), not {args.dropout}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr must be a finite positive number, not {args.lr}")
    validate_schedule(args)
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        raise ValueError(f"--weight-decay must be a finite number >= 0, not {args.weight_decay}")
    if args.lr * args.weight_decay >= 1:
        raise ValueError(f"--lr × --weight-decay must be below 1, not {args.lr:g} × {args.weight_decay:g}: AdamW "
                         f"multiplies every weight by 1 - lr·wd each step, which would zero or flip them")
    if not (math.isfinite(args.max_norm) and args.max_norm > 0):
        raise ValueError(f"--max-norm must be a finite positive number (the largest gradient norm kept), "
                         f"not {args.max_norm}: a negative one would ascend the gradient, 0 would zero it")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ValueError(f"--temperature must be a finite number >= 0 (0: greedy), not {args.temperature}")
    if args.hidden % args.heads:
        raise ValueError(f"--heads {args.heads} must divide --hidden {args.hidden}")
    if args.zero == 3 and (args.pp > 1 or args.microbatches > 1):
        raise ValueError(f"--zero 3 with --pp {args.pp} / --microbatches {args.microbatches}: each block's gradient "
                         "is then the sum of m microbatches' parts, complete only after the m-th backward, so it "
                         "stays whole through the schedule (no 1/d gradient memory) or is reduce-scattered m times, "
                         "and each block is gathered 2m times; use --zero 1 or 2 with pipelines")
    if args.virtual_stages > 1 and not (args.schedule == "interleaved" and args.pp > 1):
        raise ValueError(f"--virtual-stages {args.virtual_stages} cuts each pipeline stage into chunks: it needs "
                         f"--schedule interleaved and --pp 2 or more")
    if args.save_every and not args.save:
        raise ValueError(f"--save-every {args.save_every} saves to the --save path: pass --save PATH too")
    if args.check and (args.save or args.load or args.trace or args.unchecked):
        raise ValueError("--check trains its own tiny model twice, checked, and saves, loads and traces nothing: "
                         "drop --save, --load, --trace and --unchecked, or run without --check")
    validate_experts(args)
    validate_precision(args)
    for name in ("text", "load"):
        path = getattr(args, name)
        if path is not None and not Path(path).is_file():
            raise ValueError(f"--{name} {path}: {'a directory, not a file' if Path(path).is_dir() else 'no such file'}")


def validate_schedule(args):
    """--warmup and --lr-min (``parse`` fills them when unset), by ``schedule.check_schedule``'s rules,
    named by option."""
    if not 0 <= args.warmup < args.steps:
        raise ValueError(f"--warmup must be in [0, --steps {args.steps}), not {args.warmup}: a warmup as long as "
                         "the run never trains at --lr")
    if not (math.isfinite(args.lr_min) and 0 <= args.lr_min <= args.lr):
        raise ValueError(f"--lr-min must be a finite number in [0, --lr {args.lr:g}], not {args.lr_min:g}: the "
                         "floor of the decay from --lr")


def validate_precision(args):
    """--grad-reduce fp32 only means something for a 2-byte model (fp16 and bf16 run on every mesh)."""
    if args.grad_reduce == "fp32" and args.dtype not in MIXED_PRECISION:
        raise ValueError(f"--grad-reduce fp32 is for a --dtype fp16 or bf16 model: a {args.dtype} model's gradients "
                         f"already cross in {args.dtype}")


def validate_experts(args):
    """The mixture-of-experts options (see the module docstring for why each refusal exists)."""
    if args.experts < 0:
        raise ValueError(f"--experts must be 0 (the dense MLP) or more, not {args.experts}")
    if not args.experts:
        if args.ep > 1:
            raise ValueError(f"--ep {args.ep} spreads experts over ranks: pass --experts too")
        return
    if not 1 <= args.top_k <= args.experts:
        raise ValueError(f"--top-k {args.top_k} must be in [1, --experts {args.experts}]: each token picks k "
                         "different experts")
    if args.capacity_factor is not None and not (math.isfinite(args.capacity_factor) and args.capacity_factor > 0):
        raise ValueError(f"--capacity-factor must be a positive number (unset: no drops), not {args.capacity_factor}: "
                         "at c <= 0 an expert has no slot and every token is dropped")
    for name in ("aux_loss_coef", "z_loss_coef"):
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) >= 0):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number >= 0, not {getattr(args, name)}")
    if args.experts % args.ep:
        raise ValueError(f"--ep {args.ep} must divide --experts {args.experts}: each ep rank holds experts/ep of them")
    refused = [(args.pp > 1 or args.microbatches > 1, "--pp/--microbatches (the aux loss would cross stages)"),
               (args.cp > 1, "--cp (its blocks are not one run of the capacity's token order)"),
               (args.recompute == "full", "--recompute full (the aux loss leaves the block beside its output)"),
               (args.zero and args.ep > 1, "--zero 1 with --ep > 1 (experts reduce over expert-dp, ZeRO shards over dp)"),
               ((args.save or args.load) and args.ep > 1, "--save/--load with --ep > 1 (the checkpoint does not "
                                                          "merge the experts over ep yet)")]
    for bad, what in refused:
        if bad:
            raise ValueError(f"--experts with {what}: not built")


def fail(problem):
    """The one line a failed run ends with, said by rank 0 (every rank has the same problem); status 2."""
    if MPI.COMM_WORLD.Get_rank() == 0:
        print(f"error: {problem}", file=sys.stderr)
    return 2


# ---------------------------------------------------------------------------------------------------
# --check's configuration: its own tiny model, on the mesh and the parallelism the command line asks for.
# ---------------------------------------------------------------------------------------------------


CHECK_OVERRIDES = dict(steps=10, seq=8, batch=4, hidden=16, heads=4, layers=2, dropout=0.1, lr=3e-3,
                       weight_decay=0.01, max_norm=0.5, seed=0, dtype="float64", bucket_mb=2 / 1024,
                       warmup=3, lr_min=3e-4, eval_every=0, eval_batches=1)
"""What ``--check`` sets, whatever the command line says: a tiny float64 model with dropout on, divisible
by tp <= 4 and dp <= 2; its 8 tokens by 2·cp zigzag chunks for cp <= 4 (s/cp by tp under SP), its 4
heads by cp·tp under Ulysses; with pipeline stages, a block per chunk (at least 2) and a batch that
dp × microbatches divides. The buckets are small (2 KiB), so that a step has several and ZeRO pads some.
The lr warms up and decays (every step's lr differs): a wrapper that kept its own lr (ZeRO) would differ."""


def check_args(tp=1, dp=1, sequence_parallel=False, tie_embeddings=False, text=None, cp=1, cp_kind="zigzag",
               pp=1, microbatches=1, schedule="1f1b", virtual_stages=1, zero=0, overlap=False, recompute="none",
               ep=1, experts=0, top_k=1, capacity_factor=None, aux_loss_coef=0.01, z_loss_coef=0.0, grad_reduce="model",
               **overrides):
    """The configuration of the check (``CHECK_OVERRIDES``, the pipeline's needs, then ``overrides``)."""
    pipeline_needs = dict(batch=math.lcm(CHECK_OVERRIDES["batch"], dp * microbatches),
                          layers=max(CHECK_OVERRIDES["layers"], pp * virtual_stages))
    return argparse.Namespace(tp=tp, dp=dp, cp=cp, cp_kind=cp_kind, sequence_parallel=sequence_parallel,
                              tie_embeddings=tie_embeddings, text=text, pp=pp, microbatches=microbatches,
                              schedule=schedule, virtual_stages=virtual_stages, zero=zero, overlap=overlap,
                              recompute=recompute, trace=None, ep=ep, experts=experts, top_k=top_k,
                              capacity_factor=capacity_factor, aux_loss_coef=aux_loss_coef, z_loss_coef=z_loss_coef,
                              grad_reduce=grad_reduce, **{**CHECK_OVERRIDES, **pipeline_needs, **overrides})


def check_args_of(args, dp):
    """``check_args`` for the command line ``args``: its mesh (with ``dp`` replicas, which ``--dp`` may
    leave unset), its parallelism and its text; ``CHECK_OVERRIDES`` for the rest."""
    return check_args(args.tp, dp, args.sequence_parallel, args.tie_embeddings, text=args.text, cp=args.cp,
                      cp_kind=args.cp_kind, pp=args.pp, microbatches=args.microbatches, schedule=args.schedule,
                      virtual_stages=args.virtual_stages, zero=args.zero, overlap=args.overlap,
                      recompute=args.recompute, ep=args.ep, experts=args.experts, top_k=args.top_k,
                      capacity_factor=args.capacity_factor, aux_loss_coef=args.aux_loss_coef,
                      z_loss_coef=args.z_loss_coef, grad_reduce=args.grad_reduce,
                      # a mixed-precision policy is checked in that policy, against its own derived bound
                      **({"dtype": args.dtype} if args.dtype in MIXED_PRECISION else {}))


def overridden_by_check(argv, args=None):
    """The options given on the command line that ``--check`` replaces with its own values (not --dtype
    fp16/bf16: the check runs in that policy)."""
    given = {word.split("=")[0][2:].replace("-", "_") for word in (argv or sys.argv[1:]) if word.startswith("--")}
    kept = {"dtype"} if args is not None and args.dtype in MIXED_PRECISION else set()
    return [f"--{name.replace('_', '-')}" for name in CHECK_OVERRIDES if name in given - kept]
