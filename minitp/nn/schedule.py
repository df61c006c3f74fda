"""What learning rate does step t use? Linear warmup, then cosine decay to a floor (nanoGPT's ``get_lr``;
Loshchilov and Hutter 2017, "SGDR", without restarts).

    lr(t) = lr_max · (t + 1) / warmup                                       t < warmup
    lr(t) = lr_min + ½ (lr_max - lr_min) (1 + cos(π · (t - warmup) / (T - 1 - warmup)))    warmup <= t < T

for the steps t = 0 .. T-1 of a run of T steps: the first update already moves (lr_max / warmup, not 0),
the first decayed step is at lr_max, the midpoint of the decay at (lr_max + lr_min) / 2, and the LAST step
at lr_min exactly (a decay that only reaches the floor after the run would waste it).

Why warm up: Adam's first steps divide by a second moment estimated from one or two gradients, so every
weight moves by about lr whatever its gradient's size -- at a wide model's large lr that throws the
freshly initialised weights off and the loss RISES over the first steps (issue 24: h = 1024 at lr 3e-3).
A few steps at a small lr let the moments settle first. Why decay: the noise of the updates scales with
lr, so the loss keeps falling as lr shrinks at the end.

It is a pure function of the step, so a run resumed from a checkpoint at step k uses the lrs of the
uninterrupted run; the trainer sets it every step on the optimizer (``optimizer.lr``: AdamW's own, or
ZeRO's, which reads and writes the wrapped optimizer's).
"""
import math


def check_schedule(lr_max, lr_min, warmup, total):
    """``ValueError`` for a schedule that cannot be run: a floor outside [0, lr_max], a warmup that is
    negative or not shorter than the run (no step would be decayed -- or trained at full lr)."""
    if not 0 <= lr_min <= lr_max:
        raise ValueError(f"the floor lr_min must be in [0, lr_max = {lr_max:g}], not {lr_min:g}")
    if not 0 <= warmup < max(total, 1):
        raise ValueError(f"warmup must be in [0, {total}) steps (the run's length), not {warmup}")


def warmup_cosine(step, lr_max, lr_min, warmup, total):
    """lr(step) above, for step in [0, total)."""
    if step < warmup:
        return lr_max * (step + 1) / warmup
    decay_steps = total - 1 - warmup
    if decay_steps <= 0:  # one step after the warmup (or a one-step run): nothing to decay over
        return lr_max
    progress = min(1.0, (step - warmup) / decay_steps)
    return lr_min + 0.5 * (lr_max - lr_min) * (1 + math.cos(math.pi * progress))
