"""One GPT-2 transformer layer: pre-LayerNorm attention and MLP, each added back to the residual stream.

    x = x + attention(ln1(x))      the attention's last op is its residual dropout
    x = x + mlp(ln2(x))            and so is the MLP's

The residual dropouts live inside ``attention`` and ``mlp`` (as in Megatron, where they belong to the
layer's output), so the block itself is just the two residual additions.

``recompute`` (Korthikanti et al. 2022, section 5; see ``minitp.nn.recompute``): ``"selective"``
recomputes the attention core in backward, ``"full"`` keeps only the block's input and re-runs the whole
layer in backward.
"""
import functools

import numpy

from minitp.nn import init
from minitp.nn.attention import MultiHeadAttention
from minitp.nn.builders import SERIAL
from minitp.nn.mlp import MLP
from minitp.nn.moe import MoE
from minitp.nn.module import Module
from minitp.nn.recompute import RECOMPUTE_CHOICES, check_recompute, recompute


class TransformerBlock(Module):
    """(s, b, h) -> (s, b, h). Sublayers: ``ln1``, ``attention``, ``ln2``, ``mlp``.

    Each sublayer, and so each of its dropouts, gets a seed derived from ``seed`` and its name.
    ``recompute``: None, ``"selective"`` (passed to the attention) or ``"full"``. ``init_std`` and
    ``output_std`` go to the attention and the MLP (``output_std`` to the projections that write into
    the residual stream). ``layers``: where the layers come from (``minitp.nn.builders``). ``moe``: the
    settings of a ``minitp.nn.moe.MoE`` (experts, top_k, ...) to use instead of the MLP (None: the MLP).
    """

    recompute = None

    def __init__(self, hidden, heads, ffn_hidden=None, causal=True, dropout=0.0, attention_dropout=0.0,
                 seed=0, dtype=numpy.float32, recompute=None, init_std=None, output_std=None, layers=SERIAL,
                 moe=None):
        super().__init__()
        self.recompute = check_recompute(recompute, RECOMPUTE_CHOICES, type(self).__name__)
        std = dict(init_std=init_std, output_std=output_std)
        self.ln1 = layers.norm(hidden, dtype=dtype, tag="ln1")
        self.attention = MultiHeadAttention(hidden, heads, causal=causal, attention_dropout=attention_dropout,
                                            dropout=dropout, seed=init.derive_seed(seed, "attention"), dtype=dtype,
                                            recompute="selective" if recompute == "selective" else None,
                                            layers=layers, **std)
        self.ln2 = layers.norm(hidden, dtype=dtype, tag="ln2")
        # moe: {experts, top_k, capacity_factor, aux_loss_coef, z_loss_coef}: a mixture of expert MLPs instead
        mlp = MLP if moe is None else functools.partial(MoE, **moe)
        self.mlp = mlp(hidden, ffn_hidden=ffn_hidden, dropout=dropout, seed=init.derive_seed(seed, "mlp"), dtype=dtype,
                       layers=layers, **std)

    def forward(self, x):
        if self.recompute == "full":
            return recompute(self._layer, x, modules=[self])  # keep x alone; the layer runs again in backward
        return self._layer(x)

    def _layer(self, x):
        x = x + self.attention(self.ln1(x))
        return x + self.mlp(self.ln2(x))
