"""A small GPT-2: token and position embeddings, a stack of transformer blocks, a final LayerNorm and the
language-model head.

    ids (s, b) --wte--> (s, b, h) + wpe(0..s-1) (s, 1, h) --drop--> blocks --ln_f--> --lm_head--> (s, b, v)

Token ids are (s, b), sequence first, like every activation in minitp. ``GPTConfig`` describes a model
once; ``GPT(config)`` builds it serially, ``minitp.parallel.ParallelGPT(config, mesh)`` builds the same
model from tensor-parallel layers, each rank only its shards.
"""

import dataclasses
import math

import numpy

from minitp import backend
from minitp.autograd import Tensor, no_grad
from minitp.nn import init
from minitp.nn.builders import SERIAL
from minitp.nn.layers import Embedding
from minitp.nn.module import Module, ModuleList
from minitp.nn.moe import check_moe
from minitp.nn.transformer import TransformerBlock

INIT_STD = 0.02
"""GPT-2's initial standard deviation for every weight matrix and embedding."""


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Everything that defines a GPT: its shapes, its dropout, its initial weights (``seed``) and dtype.

    ``ffn_hidden`` defaults to 4·hidden, ``attention_dropout`` to ``dropout``. ``recompute``: None,
    ``"selective"`` (the attention core re-run in backward) or ``"full"`` (each block re-run), for every
    block (Korthikanti et al. 2022; ``minitp.nn.recompute``) -- how the model runs, not what it is: a
    checkpoint does not compare it. ``experts`` > 0 makes every block's MLP a mixture of that many experts
    (``minitp.nn.moe.MoE``: ``top_k``, ``capacity_factor`` -- None: no drops --, ``aux_loss_coef``,
    ``z_loss_coef``); 0, the default, is the dense model, whose dictionary (and so checkpoint) leaves those
    fields out, as before they existed. Used by ``GPT``,
    ``ParallelGPT``, ``train_gpt.py`` and checkpoints (which store it and refuse another).
    ``ValueError`` for sizes that are not positive integers or heads that do not divide hidden.
    """

    vocab: int
    seq_len: int
    hidden: int
    heads: int
    layers: int
    ffn_hidden: int = None
    dropout: float = 0.0
    attention_dropout: float = None
    tie_embeddings: bool = False
    seed: int = 0
    dtype: str = "float32"
    recompute: str = None
    experts: int = 0
    top_k: int = 1
    capacity_factor: float = None
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0

    def __post_init__(self):
        # a frozen dataclass fills in its derived defaults through object.__setattr__
        object.__setattr__(self, "dtype", numpy.dtype(self.dtype).name)
        if self.ffn_hidden is None:
            object.__setattr__(self, "ffn_hidden", 4 * self.hidden)
        if self.attention_dropout is None:
            object.__setattr__(self, "attention_dropout", self.dropout)
        for name in ("vocab", "seq_len", "hidden", "heads", "layers", "ffn_hidden"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, numpy.integer)) or value < 1:
                raise ValueError(f"GPTConfig: {name} must be a positive integer, got {value!r}")
            object.__setattr__(self, name, int(value))  # a numpy integer becomes a plain one (JSON, repr)
        if self.hidden % self.heads:
            raise ValueError(f"GPTConfig: heads ({self.heads}) must divide hidden ({self.hidden})")
        if isinstance(self.experts, bool) or not isinstance(self.experts, (int, numpy.integer)) or self.experts < 0:
            raise ValueError(f"GPTConfig: experts must be 0 (a dense MLP) or a positive integer, got {self.experts!r}")
        if self.experts:
            check_moe(self.experts, self.top_k, self.capacity_factor, self.aux_loss_coef, self.z_loss_coef)
            if self.recompute == "full":  # the re-run block would make a second aux loss, outside the graph
                raise ValueError("GPTConfig: full recomputation of mixture-of-experts blocks is not built (the "
                                 "aux loss leaves the block beside its output); use recompute='selective' or None")

    def moe(self):
        """The ``MoE`` settings of every block, or None for the dense model."""
        if not self.experts:
            return None
        return {name: getattr(self, name) for name in MOE_FIELDS}

    def to_dict(self):
        found = dataclasses.asdict(self)
        if not self.experts:  # the dense model's dictionary is what it was before experts existed
            for name in MOE_FIELDS:
                del found[name]
        return found


MOE_FIELDS = ("experts", "top_k", "capacity_factor", "aux_loss_coef", "z_loss_coef")


class GPT(Module):
    """A GPT-2 language model over ``config.vocab`` tokens and contexts of at most ``config.seq_len``.

    Sublayers: ``wte`` (vocab, h) token embedding, ``wpe`` (seq_len, h) position embedding, ``drop``
    (embedding dropout), ``blocks`` (a ModuleList of ``layers`` TransformerBlocks), ``ln_f``, and
    ``lm_head`` (h -> vocab, no bias). With ``tie_embeddings`` there is no ``lm_head``: the logits
    are x @ wte.weightᵀ, reusing the token embedding (as GPT-2 does).

    Initialisation is GPT-2's (Radford et al. 2019): weights and embeddings N(0, 0.02²), biases 0,
    LayerNorm weight 1, and the two projections that write into the residual stream (``attention.proj``
    and ``mlp.fc2``) scaled by 1/sqrt(2·layers), since 2·layers of them add up along the stream. Each
    value is drawn once, where it lives (``minitp.nn.init``).

    ``layers``: where the layers come from (``minitp.nn.builders``); ``ParallelGPT`` passes the
    tensor-parallel ones.

    ``blocks``: the range of blocks this model holds (default: all of them) -- a pipeline stage's part
    (``minitp.pipeline``). The part holding block 0 also holds the embeddings (``first``), the part
    holding the last block the final LayerNorm and the head (``last``); with ``tie_embeddings`` a last
    part that is not the first holds its own copy of ``wte``. Nothing else is built: each part draws
    only its own layers, with the serial names and values.
    """

    def __init__(self, config, layers=SERIAL, blocks=None):
        super().__init__()
        self.config = config
        seed, dtype, h = config.seed, numpy.dtype(config.dtype), config.hidden
        self.vocab, self.seq_len, self.hidden, self.heads = config.vocab, config.seq_len, h, config.heads
        self.layers, self.tie_embeddings = config.layers, config.tie_embeddings
        self.builders = layers
        self.block_range = range(config.layers) if blocks is None else blocks
        self.first, self.last = 0 in self.block_range, config.layers - 1 in self.block_range
        residual_std = INIT_STD / math.sqrt(2 * config.layers)
        self.wte = self.wpe = self.drop = self.ln_f = self.lm_head = None  # the ends this part may not hold
        if self.first or (self.last and config.tie_embeddings):
            self.wte = layers.vocab_embedding(config.vocab, h, dtype=dtype, seed=init.derive_seed(seed, "wte"),
                                              std=INIT_STD, tag="wte")
            # the last part's copy of the tied table: norms and checkpoints count the first part's
            self.wte.weight.tied_copy = not self.first
        if self.first:
            # replicated on every rank: seq_len×h is small next to vocab×h
            self.wpe = Embedding(config.seq_len, h, dtype=dtype, seed=init.derive_seed(seed, "wpe"), std=INIT_STD)
            self.drop = layers.dropout(config.dropout, init.derive_seed(seed, "drop"))
        self.blocks = ModuleList(
            (TransformerBlock(h, config.heads, config.ffn_hidden, causal=True, dropout=config.dropout,
                              attention_dropout=config.attention_dropout, seed=init.derive_seed(seed, f"blocks.{i}"),
                              dtype=dtype, init_std=INIT_STD, output_std=residual_std, layers=layers,
                              recompute=config.recompute, moe=config.moe())
             for i in self.block_range), start=self.block_range.start)
        if self.last:
            self.ln_f = layers.norm(h, dtype=dtype, tag="ln_f")
            self.lm_head = None if config.tie_embeddings else layers.column_linear(
                h, config.vocab, bias=False, dtype=dtype, seed=init.derive_seed(seed, "lm_head"), std=INIT_STD,
                tag="lm_head")

    def forward(self, ids):
        """ids (s, b) integers -> logits (s, b, vocab); on a tensor-parallel rank (s, b, vocab/t), the
        columns of its vocabulary range. A part that is not ``first`` takes the hidden states (s, b, h)
        instead of ids, and one that is not ``last`` returns them."""
        x = self._embed(ids) if self.first else ids
        for block in self.blocks:
            x = block(x)
        if not self.last:
            return x
        x = self.ln_f(x)
        if self.lm_head is not None:
            return self.lm_head(x)  # (s, b, h) @ (h, v) = (s, b, v)
        return self.builders.tied_logits(x, self.wte.weight)  # (s, b, h) @ (h, v), the tied table

    def _embed(self, ids):
        ids = ids.data if isinstance(ids, Tensor) else ids
        seq = ids.shape[0]
        if seq > self.seq_len:
            raise ValueError(f"a sequence of {seq} tokens is longer than the model's seq_len {self.seq_len}")
        # (s, b, h) + (s, 1, h): every sequence in the batch gets the same position vectors (under
        # sequence parallelism, (s/t, b, h) + (s/t, 1, h): this rank's tokens and their positions; under
        # context parallelism the rank's s/cp tokens of the ids, at their positions)
        x = self.wte(self.builders.tokens(ids)) + self.builders.positions(self.wpe, seq)
        return self.drop(x)

    def loss(self, ids, targets):
        """Mean cross-entropy of the next-token predictions: ``targets`` (s, b) are the ids to predict (a
        last part that is not the first takes the hidden states instead of ``ids``); with experts, plus
        every MoE block's ``aux_loss``."""
        loss = self.builders.cross_entropy(self(ids), self.builders.tokens(targets))  # this rank's tokens' loss
        for block in self.blocks:  # a mixture of experts adds its load-balancing (and z) loss
            aux = getattr(block.mlp, "aux_loss", None)
            if aux is not None:
                loss = loss + aux
        return loss

    def generate(self, ids, steps, temperature=1.0, rng=None):
        """Extend ``ids`` (s, b) by ``steps`` tokens -> (s + steps, b), on ``ids``'s own host/device.

        Greedy (the most likely token) when ``rng`` is None or ``temperature`` is 0; otherwise each
        token is sampled from softmax(logits / temperature) with ``rng`` (a numpy Generator, on the
        host). Runs in eval mode (no dropout) without recording a graph; the mode is restored after.
        Only the last ``seq_len`` tokens are fed to the model: its positions stop there.
        """
        return generate_tokens(self, ids, steps, temperature, rng)

    def _next_logits(self, tokens):
        """The logits of the token after ``tokens`` (s, b), host ids: (b, vocab), float64 on the host."""
        context = backend.from_host(tokens[-self.seq_len:])
        return backend.to_host(self(context).data[-1]).astype(numpy.float64)

    def extra_repr(self):
        return ", ".join(f"{key}={value}" for key, value in self.config.to_dict().items())


def generate_tokens(model, ids, steps, temperature=1.0, rng=None):
    """The sampling loop of ``GPT.generate`` and ``ParallelGPT.generate``: extend ``ids`` (s, b) by
    ``steps`` tokens, each the argmax of the next token's logits or (with ``rng`` and a non-zero
    ``temperature``) drawn from softmax(logits / temperature).

    ``model._next_logits(tokens)`` is all that differs between the models: every token so far, (s, b)
    on the host, -> the logits of the next one, (b, vocab) float64 on the host. The tokens live on the
    host, where ``rng`` draws; the result goes back to ``ids``'s host/device.
    """
    ids = ids.data if isinstance(ids, Tensor) else ids
    tokens = numpy.asarray(backend.to_host(ids))
    if tokens.ndim != 2:
        raise ValueError(f"generate takes ids of shape (s, b), got {tokens.shape}")
    was_training = model.training
    model.eval()
    try:
        with no_grad():
            for _ in range(steps):
                logits = model._next_logits(tokens)
                if rng is None or temperature == 0:
                    following = logits.argmax(axis=-1)
                else:
                    scaled = logits / temperature
                    probs = numpy.exp(scaled - scaled.max(axis=-1, keepdims=True))
                    probs /= probs.sum(axis=-1, keepdims=True)
                    following = numpy.array([rng.choice(model.vocab, p=row) for row in probs])
                tokens = numpy.concatenate([tokens, following[None, :].astype(tokens.dtype)])
    finally:
        model.train(was_training)
    return backend.array_module(ids).asarray(tokens)
