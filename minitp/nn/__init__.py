"""The serial layers and what they are made of: Module and Parameter, the layers of a GPT-2, optimizers.

Every layer takes its activations as (s, b, h), sequence first, and works in float32 or float64
(``dtype=``) on numpy or CuPy. These are the models every tensor-parallel layer in ``minitp.parallel``
is proven equal to.
"""
from minitp.nn.attention import MultiHeadAttention, attention_core
from minitp.nn.builders import SERIAL, SerialLayers
from minitp.nn.gpt import GPT, GPTConfig
from minitp.nn.init import derive_seed
from minitp.nn.layers import GELU, Dropout, Embedding, LayerNorm, Linear
from minitp.nn.mlp import MLP
from minitp.nn.module import Module, ModuleList, Parameter
from minitp.nn.optim import SGD, AdamW, Optimizer
from minitp.nn.recompute import recompute
from minitp.nn.transformer import TransformerBlock

__all__ = ["AdamW", "Dropout", "Embedding", "GELU", "GPT", "GPTConfig", "LayerNorm", "Linear", "MLP", "Module",
           "ModuleList", "MultiHeadAttention", "Optimizer", "Parameter", "SERIAL", "SGD", "SerialLayers",
           "TransformerBlock", "attention_core", "derive_seed", "recompute"]
