"""A small GPT-2: token and position embeddings, a stack of transformer blocks, a final LayerNorm and the
language-model head.

    ids (s, b) --wte--> (s, b, h) + wpe(0..s-1) (s, 1, h) --drop--> blocks --ln_f--> --lm_head--> (s, b, v)

Token ids are (s, b), sequence first, like every activation in minitp.
"""
import math

import numpy

from minitp import backend
from minitp import functional as F
from minitp.autograd import Tensor, no_grad
from minitp.nn import init
from minitp.nn.layers import Dropout, Embedding, LayerNorm, Linear
from minitp.nn.module import Module, ModuleList
from minitp.nn.transformer import TransformerBlock

INIT_STD = 0.02
"""GPT-2's initial standard deviation for every weight matrix and embedding."""


class GPT(Module):
    """A GPT-2 language model over ``vocab`` tokens and contexts of at most ``seq_len`` tokens.

    Sublayers: ``wte`` (vocab, h) token embedding, ``wpe`` (seq_len, h) position embedding, ``drop``
    (embedding dropout), ``blocks`` (a ModuleList of ``layers`` TransformerBlocks), ``ln_f``, and
    ``lm_head`` (Linear h -> vocab, no bias). With ``tie_embeddings`` there is no ``lm_head``: the logits
    are x @ wte.weight^T, reusing the token embedding (as GPT-2 does).

    Initialisation is GPT-2's (Radford et al. 2019): weights and embeddings N(0, 0.02^2), biases 0,
    LayerNorm weight 1, and the two projections that write into the residual stream (``attention.proj``
    and ``mlp.fc2``) scaled by 1/sqrt(2 * layers), since 2 * layers of them add up along the stream.
    ``attention_dropout`` defaults to ``dropout``.
    """

    def __init__(self, vocab, seq_len, hidden, heads, layers, ffn_hidden=None, dropout=0.0, seed=0,
                 tie_embeddings=False, attention_dropout=None, dtype=numpy.float32):
        super().__init__()
        self.vocab, self.seq_len, self.hidden, self.heads, self.layers = vocab, seq_len, hidden, heads, layers
        attention_dropout = dropout if attention_dropout is None else attention_dropout
        self.wte = Embedding(vocab, hidden, dtype=dtype, seed=init.derive_seed(seed, "wte"))
        self.wpe = Embedding(seq_len, hidden, dtype=dtype, seed=init.derive_seed(seed, "wpe"))
        self.drop = Dropout(dropout, seed=init.derive_seed(seed, "drop"))
        self.blocks = ModuleList(
            TransformerBlock(hidden, heads, ffn_hidden, causal=True, dropout=dropout,
                             attention_dropout=attention_dropout, seed=init.derive_seed(seed, f"blocks.{i}"),
                             dtype=dtype)
            for i in range(layers))
        self.ln_f = LayerNorm(hidden, dtype=dtype)
        self.tie_embeddings = tie_embeddings
        self.lm_head = None if tie_embeddings else Linear(hidden, vocab, bias=False, dtype=dtype)
        self._init_gpt2(numpy.random.default_rng(init.derive_seed(seed, "init")))

    def _init_gpt2(self, rng):
        residual_std = INIT_STD / math.sqrt(2 * self.layers)
        for name, module in self.named_modules():
            if isinstance(module, (Linear, Embedding)):
                writes_residual = name.endswith(("attention.proj", "mlp.fc2"))
                std = residual_std if writes_residual else INIT_STD
                module.weight.data[...] = init.normal(module.weight.shape, std, rng, module.weight.dtype)
            if isinstance(module, Linear) and module.bias is not None:
                module.bias.data[...] = 0

    def forward(self, ids):
        """ids (s, b) integers -> logits (s, b, vocab)."""
        seq = ids.shape[0]
        if seq > self.seq_len:
            raise ValueError(f"a sequence of {seq} tokens is longer than the model's seq_len {self.seq_len}")
        xp = backend.array_module(self.wpe.weight.data)
        # (s, b, h) + (s, 1, h): every sequence in the batch gets the same position vectors
        x = self.wte(ids) + self.wpe(xp.arange(seq)[:, None])
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        if self.lm_head is not None:
            return self.lm_head(x)  # (s, b, h) @ (h, v) = (s, b, v)
        return F.matmul(x, F.transpose(self.wte.weight))  # (s, b, h) @ (h, v), the tied table

    def loss(self, ids, targets):
        """Mean cross-entropy of the next-token predictions: ``targets`` (s, b) are the ids to predict."""
        return F.cross_entropy(self(ids), targets)

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
