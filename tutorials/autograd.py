"""The engine at work: a tiny MLP learns to imitate another one, on one process, in a few seconds.

    python tutorials/autograd.py

Everything minitp does in parallel later rests on what this file shows serially: tensors that remember
how they were made, a backward pass that walks that record in reverse, layers that own their weights,
an optimizer that uses the gradients, and a finite-difference check that proves the gradients right.
Read it top to bottom; every printed line is explained just above the code that prints it.
"""
import sys

import numpy

from minitp import backend, nn, no_grad, track_saved
from minitp.autograd import Tensor
from minitp.testing import gradcheck

# ---------------------------------------------------------------------------------------------------
# 1. A tensor remembers where it came from.
#
# A Tensor wraps a plain numpy array (a CuPy array on a GPU: the same code runs on both). When an op
# such as * or .sum() runs on a tensor that requires grad, the result records the op -- a Function --
# and the inputs it was given. Calling .backward() on a scalar walks those records from the last op to
# the first, and each Function turns the gradient of its output into gradients of its inputs: that
# is the chain rule, applied one op at a time. Here y = sum(x * x), so dy/dx = 2x.
# ---------------------------------------------------------------------------------------------------
x = Tensor(backend.xp.asarray([1.0, -2.0, 3.0]), requires_grad=True)
y = (x * x).sum()
y.backward()
print(f"1. y = sum(x*x) = {y.item():.1f}; dy/dx = {backend.to_host(x.grad)} (expected 2x = [2, -4, 6])")

# ---------------------------------------------------------------------------------------------------
# 2. Layers are Modules that own Parameters.
#
# minitp.nn.MLP is the transformer's MLP block: fc1 (h -> ffn), GeLU, fc2 (ffn -> h). Its weights are
# Parameters, registered by name when the layer assigns them, so named_parameters() finds all of them.
# Activations are laid out (s, b, h): sequence, batch, hidden -- the layout of the Megatron papers,
# chosen so that a sequence shard is a contiguous block. Linear weights are (in, out): y = x @ W + b.
#
# The task: a "teacher" MLP with fixed random weights defines the function to learn, and a "student"
# MLP, started from other random weights, learns to imitate it from fresh random inputs each step.
# ---------------------------------------------------------------------------------------------------
seq, batch, hidden, ffn_hidden = 8, 4, 16, 64
teacher = nn.MLP(hidden, ffn_hidden, seed=1)
student = nn.MLP(hidden, ffn_hidden, seed=2)
print("2. the student's parameters: "
      + ", ".join(f"{name} {p.shape}" for name, p in student.named_parameters()))

# ---------------------------------------------------------------------------------------------------
# 3. Training: forward, backward, step.
#
# The loss is the mean squared difference, written with ordinary ops: the engine needs no special
# loss function to differentiate it. Each step:
#   - zero_grad() forgets the last step's gradients (backward adds into .grad, it does not overwrite),
#   - loss.backward() fills p.grad for every parameter the loss depends on,
#   - AdamW updates each parameter from its gradient, with weight decay applied to the weight itself
#     ("decoupled", as in Loshchilov and Hutter's AdamW) rather than added to the gradient.
# The teacher's output is computed without recording a graph: no gradient ever flows into it.
# ---------------------------------------------------------------------------------------------------
rng = numpy.random.default_rng(0)
optimizer = nn.AdamW(student.parameters(), lr=3e-3, weight_decay=0.01)


def batch_of_inputs():
    return Tensor(backend.from_host(rng.standard_normal((seq, batch, hidden)).astype(numpy.float32)))


def mse(prediction, target):
    return ((prediction - target) ** 2).mean()


losses = []
print("3. training the student with AdamW:")
for step in range(1, 151):
    inputs = batch_of_inputs()
    with no_grad():
        target = teacher(inputs)
    loss = mse(student(inputs), target)
    student.zero_grad()
    loss.backward()
    optimizer.step()
    losses.append(loss.item())
    if step == 1 or step % 30 == 0:
        print(f"   step {step:3d}  loss {loss.item():.5f}")

# ---------------------------------------------------------------------------------------------------
# 4. What backward costs: the activations each op keeps.
#
# To compute its input gradients, an op must keep some of its forward inputs or outputs until backward
# runs: a matmul keeps its input (dW = x^T dy), GeLU keeps its input, dropout keeps its mask. These
# saved activations, not the weights, fill a GPU's memory in large-model training, and they are what
# Korthikanti et al. (2022) shrink with sequence parallelism. The engine counts them per op.
# Per token the MLP keeps fc1's input (h numbers), GeLU's input (4h) and fc2's input (4h): 9h numbers.
# With 2-byte numbers that is 18 of the 19 bytes per token and hidden unit that the paper counts for
# the MLP block; the 19th is the dropout mask, and dropout is off here.
# ---------------------------------------------------------------------------------------------------
with track_saved() as saved:
    student(batch_of_inputs())
per_token = saved.total / (seq * batch)
print(f"4. one forward of the student keeps {saved.total} bytes for backward "
      f"({per_token / (4 * hidden):.0f}h float32 numbers per token): {saved.by_op}")

# ---------------------------------------------------------------------------------------------------
# 5. Proving the gradients right: a finite-difference check.
#
# For every entry of every input and weight, gradcheck nudges it by +-eps and measures how a random
# weighted sum of the layer's output moves: (L(w + eps) - L(w - eps)) / (2 eps) approximates dL/dw
# with an error of order eps^2. That needs float64 (in float32 the nudge drowns in rounding), so we
# build a float64 copy of one layer -- a LayerNorm with random scale and shift -- and compare.
# Every op and layer in minitp passes this check in its tests; sharded layers pass it across ranks.
# ---------------------------------------------------------------------------------------------------
check_rng = numpy.random.default_rng(1)
layer_norm = nn.LayerNorm(5, dtype=numpy.float64)
for p in layer_norm.parameters():
    p.data[...] = backend.from_host(check_rng.standard_normal(p.shape))
ln_input = Tensor(backend.from_host(check_rng.standard_normal((3, 2, 5))), requires_grad=True)
result = gradcheck(lambda *_: layer_norm(ln_input), [ln_input] + layer_norm.parameters())
print(f"5. LayerNorm {result}")

# ---------------------------------------------------------------------------------------------------
# The check that this tutorial did what it says: the loss fell, and the gradients are right.
# ---------------------------------------------------------------------------------------------------
first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
print(f"mean loss over the first 10 steps {first:.5f}, over the last 10 {last:.5f}")
if not last < 0.5 * first:
    sys.exit(f"FAILED: the loss did not go down enough ({first:.5f} -> {last:.5f})")
if not result.max_error <= 1e-6:
    sys.exit(f"FAILED: gradcheck error {result.max_error:.2e} > 1e-6")
print("OK: the loss went down and the gradients match finite differences")
