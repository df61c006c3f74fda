"""What is being planned: the model's shapes, the mesh, and the choices -- three small frozen records.

Names follow the papers: s sequence, b microbatch, B global batch, h hidden, a heads, l layers, V vocabulary,
f the MLP's hidden width (4h in GPT-2), t tensor-parallel size, p pipeline stages, d data-parallel replicas,
c context-parallel size, v model chunks per pipeline rank (virtual stages), e bytes per activation element.

Nothing here imports minitp's model or MPI: ``Model.of(config)`` reads the fields of a ``GPTConfig`` (or any
object or mapping with the same names), so a plan can be made on a laptop for a model that only a cluster
could build.
"""
from dataclasses import dataclass, field, fields, replace

ITEMSIZE = {"float64": 8, "float32": 4, "bf16": 2, "fp16": 2}
"""Bytes per element of each precision. float32 and float64: one dtype for everything (parameters, gradients,
activations, optimizer state). bf16 and fp16: mixed precision as ``train_gpt.py --dtype bf16|fp16`` runs it --
the model, its gradients and activations in the 2-byte dtype (bf16: ``ml_dtypes.bfloat16``), fp32 master
weights and AdamW moments (``MasterWeights`` at ZeRO 0, ZeRO's ``master_dtype`` slices at stages 1-3), fp16's
loss scaler; measured byte for byte by tests/test_plan.py at ZeRO 0-3, with ``grad_reduce`` "model" and
"fp32", and through pipeline stages."""

MEASURED_PRECISIONS = ("float32", "float64", "bf16", "fp16")
GRAD_REDUCE = ("model", "fp32")
RECOMPUTE = (None, "selective", "full")
ATTENTION = (None, "dense", "blockwise")
BLOCKWISE_ABOVE = 128  # minitp.functional.blockwise_attention.BLOCK: F.attention's default from s > 128
SCHEDULES = ("afab", "1f1b", "interleaved")
CP_KINDS = ("ring", "zigzag", "ulysses")
FORMULA_ONLY = "formula only: not yet measured against minitp"


@dataclass(frozen=True)
class Model:
    """A GPT-2 as minitp builds it (``minitp.nn.GPT``): learned positions, pre-LayerNorm blocks, an MLP of
    width ``ffn_hidden`` (default 4h), an LM head of V columns (or the tied embedding table).

    ``experts`` > 0 replaces every MLP by that many expert MLPs with a top-``top_k`` router (``minitp.nn.moe``:
    its states per rank measured at ZeRO-0 without pipelines; its activations and all-to-alls measured from
    the routing counts of a run, ``Choices.routing``, else GShard's even spread, formula only;
    ``aux_loss_coef`` and ``z_loss_coef`` as ``GPTConfig``'s: the losses keep a few arrays).

    Not ``GPTConfig`` itself: that also says how a model runs (seed, dtype, recompute), which a plan takes
    from ``Choices``, and importing it imports the whole engine; ``Model.of`` copies the shared fields."""
    vocab: int
    seq_len: int
    hidden: int
    heads: int
    layers: int
    ffn_hidden: int = None
    dropout: float = 0.0
    attention_dropout: float = None
    tie_embeddings: bool = False
    experts: int = 0
    top_k: int = 1
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0

    def __post_init__(self):
        if self.ffn_hidden is None:
            object.__setattr__(self, "ffn_hidden", 4 * self.hidden)
        if self.attention_dropout is None:
            object.__setattr__(self, "attention_dropout", self.dropout)
        for name in ("vocab", "seq_len", "hidden", "heads", "layers", "ffn_hidden"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"plan: {name} must be a positive integer, got {value!r}")
        if self.hidden % self.heads:
            raise ValueError(f"plan: heads ({self.heads}) must divide hidden ({self.hidden})")
        if self.experts < 0 or (self.experts and not 1 <= self.top_k <= self.experts):
            raise ValueError(f"plan: experts {self.experts}, top_k {self.top_k}: need 0 experts, or 1 <= top_k <= experts")

    @classmethod
    def of(cls, config, **overrides):
        """The shapes of a ``minitp.nn.GPTConfig`` (or an object or mapping with its field names)."""
        get = config.get if isinstance(config, dict) else (lambda key, default=None: getattr(config, key, default))
        shared = {f.name: get(f.name) for f in fields(cls)}
        shared = {key: value for key, value in shared.items() if value is not None}
        return cls(**{**shared, **overrides})


@dataclass(frozen=True)
class Mesh:
    """The (dp, pp, cp, tp) mesh of ``minitp.comm.Mesh``, plus ep (expert-parallel size) and v
    (model chunks per pipeline rank, the interleaved schedule's virtual stages). World size dp·pp·cp·tp (the
    expert-parallel group is carved out of dp × cp, as in Megatron-core, so it adds no ranks)."""
    dp: int = 1
    pp: int = 1
    cp: int = 1
    tp: int = 1
    ep: int = 1
    virtual_stages: int = 1

    def __post_init__(self):
        for name in ("dp", "pp", "cp", "tp", "ep", "virtual_stages"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"plan: mesh {name} must be a positive integer, got {value!r}")

    @property
    def world(self):
        return self.dp * self.pp * self.cp * self.tp


@dataclass(frozen=True)
class Choices:
    """How the step runs.

    ``micro_batch`` b: sequences per microbatch per replica; ``global_batch`` B (default d·b: one microbatch
    per step); m = B/(d·b) microbatches. ``seq``: the batch's sequence length (default the model's seq_len).
    ``precision``: "float32"/"float64" (minitp: everything in that dtype) or "bf16"/"fp16" (mixed precision,
    fp32 master weights and Adam moments; measured at ZeRO 0-3 and on pipeline stages). ``grad_reduce`` (mixed
    precision): the gradients reduced in the model's dtype ("model": 2 bytes per element on the wire, minitp's
    default) or packed and reduced in fp32 ("fp32": ``reduce_dtype=numpy.float32``, 4 bytes). ``zero``: 0-3
    (minitp's stages; 3 with pp > 1 formula only).
    ``bucket_bytes``: the gradient buckets (minitp's default 25 MiB; ZeRO pads each to a multiple of d).
    ``ids_itemsize``: bytes of a token id (numpy's int64 on 64-bit Linux): the embedding and the loss keep
    the ids and targets for backward. ``attention``: "dense" (the paper's core, keeping the s×s scores),
    "blockwise" (O and one lse per row), or None: minitp's default on the CPU (``F.attention``: blockwise
    from s > 128 on a rank that holds every key, i.e. without context parallelism). ``routing``: the routing
counts a run observed -- per layer, one row per rank of one ep group of the kept (token, choice) pairs it
routed to each expert, one microbatch (``plan.experts.kept_counts``) -- and ``ep_rank``: which rank of that
group to plan; with them the experts' activations and all-to-alls are exact, without them evenly spread."""
    micro_batch: int = 1
    global_batch: int = None
    seq: int = None
    sequence_parallel: bool = False
    recompute: str = None
    zero: int = 0
    precision: str = "float32"
    grad_reduce: str = "model"
    schedule: str = "1f1b"
    cp_kind: str = "ring"
    bucket_bytes: int = 25 * 2 ** 20
    ids_itemsize: int = 8
    optimizer_buffers: int = 2  # AdamW: exp_avg and exp_avg_sq
    attention: str = None
    routing: tuple = None
    ep_rank: int = 0
    extras: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"plan: recompute must be one of {RECOMPUTE}, got {self.recompute!r}")
        if self.zero not in (0, 1, 2, 3):
            raise ValueError(f"plan: zero must be 0, 1, 2 or 3, got {self.zero!r}")
        if self.precision not in ITEMSIZE:
            raise ValueError(f"plan: precision must be one of {tuple(ITEMSIZE)}, got {self.precision!r}")
        if self.grad_reduce not in GRAD_REDUCE:
            raise ValueError(f"plan: grad_reduce must be one of {GRAD_REDUCE}, got {self.grad_reduce!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"plan: schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.cp_kind not in CP_KINDS:
            raise ValueError(f"plan: cp_kind must be one of {CP_KINDS}, got {self.cp_kind!r}")
        if self.attention not in ATTENTION:
            raise ValueError(f"plan: attention must be one of {ATTENTION}, got {self.attention!r}")

    @property
    def mixed(self):
        """bf16/fp16: 2-byte parameters, gradients and activations, fp32 master weights and moments."""
        return self.precision in ("bf16", "fp16")

    @property
    def grad_itemsize(self):
        """Bytes per element of the reduced gradients: on the wire, in the reduced buckets and ZeRO's slices
        (the model's dtype, or fp32 with ``grad_reduce="fp32"``; float32/float64 models reduce in their own)."""
        return 4 if self.mixed and self.grad_reduce == "fp32" else ITEMSIZE[self.precision]


def microbatches(mesh, choices):
    """m = B / (d·b): how many microbatches each replica runs per step."""
    per_replica = choices.micro_batch * mesh.dp
    B = choices.global_batch or per_replica
    if B % per_replica:
        raise ValueError(f"plan: the global batch {B} is not a multiple of dp × micro-batch = {per_replica}")
    return B // per_replica


def check(model, mesh, choices):
    """``ValueError`` for a combination that cannot be cut as asked (the divisibility minitp refuses too)."""
    t, c, p, v = mesh.tp, mesh.cp, mesh.pp, mesh.virtual_stages
    s = choices.seq or model.seq_len
    if s > model.seq_len:
        raise ValueError(f"plan: seq {s} is longer than the model's seq_len {model.seq_len}")
    for total, parts, what in ((model.heads, t, "heads over tp"), (model.vocab, t, "vocabulary over tp"),
                               (model.ffn_hidden, t, "ffn_hidden over tp"), (model.layers, p * v, "layers over pp × v")):
        if total % parts:
            raise ValueError(f"plan: {what}: {parts} does not divide {total}")
    cut = 2 * c if (c > 1 and choices.cp_kind == "zigzag") else c
    if s % cut:
        raise ValueError(f"plan: the sequence {s} does not split into {cut} blocks over cp")
    if choices.sequence_parallel and (s // c) % t:
        raise ValueError(f"plan: sequence parallelism splits s/c = {s // c} over tp = {t}")
    if c > 1 and choices.cp_kind == "ulysses" and (model.heads // t) % c:
        raise ValueError(f"plan: Ulysses needs cp = {c} to divide the heads per tp rank, {model.heads // t}")
    if choices.schedule == "interleaved" and p > 1 and microbatches(mesh, choices) % p:
        raise ValueError("plan: the interleaved schedule needs microbatches to be a multiple of pp")
    if v > 1 and choices.schedule != "interleaved":
        raise ValueError("plan: virtual stages need the interleaved schedule")
    if model.experts and model.experts % mesh.ep:
        raise ValueError(f"plan: ep = {mesh.ep} does not divide {model.experts} experts")
    if mesh.ep > 1 and (mesh.dp * c) % mesh.ep:
        raise ValueError(f"plan: ep = {mesh.ep} must divide dp × cp = {mesh.dp * c}")
    from minitp.plan.experts import check_routing
    check_routing(model, mesh, choices, microbatches(mesh, choices))


__all__ = ["Model", "Mesh", "Choices", "microbatches", "check", "replace", "ITEMSIZE", "FORMULA_ONLY", "GRAD_REDUCE"]
