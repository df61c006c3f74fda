"""Which forwards and backwards does each pipeline stage run, and in what order? The three schedules.

A schedule is a *plan* per rank: the list of ``Action("F" or "B", microbatch, chunk)`` that the rank runs,
in time order. p stages, m microbatches; ``chunk`` is the rank's model chunk (always 0 without
interleaving). The plan says nothing about communication: each F of a stage but the first needs the
previous stage's output of that microbatch, each B but the last stage's the next stage's gradient;
the engine (``engine.py``) receives them as the plan asks.

- **AFAB** (all forward, all backward; GPipe, Huang et al. 2019): every microbatch forward, then every
  one backward. Simple, and every stage holds the activations of all m microbatches at once.
- **1F1B** (PipeDream-flush, Narayanan et al. 2021): stage r runs only ``min(p - r - 1, m)`` forwards
  ahead (the warm-up), then alternates one forward and one backward, then drains the backwards. The
  same bubble as AFAB, but stage r holds at most ``min(p - r, m)`` microbatches (stage 0: p).
- **Interleaved 1F1B** (Narayanan et al. 2021, section 2.2): each rank holds v chunks of layers, rank
  r's chunk k being the model's chunk k·p + r, so a microbatch passes every rank v times. Forwards go
  in groups of p microbatches per chunk (chunk 0 of microbatches 0..p-1, then chunk 1 of the same, ...),
  backwards likewise from the last chunk down. Each unit of work is 1/v of a stage, so the bubble
  shrinks v-fold: (p-1)/(v·m + p-1). As in Megatron-LM, m must be a multiple of p (the groups of p
  microbatches must be whole) -- refused otherwise.

The bubble, with unit costs, is (p-1)/(m+p-1) of the step for AFAB and 1F1B and (p-1)/(v·m+p-1)
interleaved: ``clock.py`` replays the plans and measures it.
"""
from collections import namedtuple


class Action(namedtuple("Action", "kind microbatch chunk")):
    """One unit of work: ``kind`` "F" (forward) or "B" (backward) of ``microbatch`` through the rank's
    model chunk ``chunk``. Printed "F3" -- or "F3b" for chunk 1 when there are chunks to tell apart."""

    def label(self, chunks=1):
        return f"{self.kind}{self.microbatch}" + (chr(ord("a") + self.chunk) if chunks > 1 else "")


SCHEDULES = ("afab", "1f1b", "interleaved")


def check(schedule, p, m, v=1):
    """``ValueError`` (the same on every rank: the same numbers) unless ``schedule`` can run p stages,
    m microbatches and v chunks per rank."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
    for name, value in (("pp (stages)", p), ("microbatches", m), ("virtual stages (chunks per rank)", v)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, not {value!r}")
    if schedule != "interleaved" and v != 1:
        raise ValueError(f"{v} chunks per rank need the interleaved schedule, not {schedule!r}")
    if schedule == "interleaved":
        if p < 2:
            raise ValueError("the interleaved schedule needs at least 2 pipeline stages (pp >= 2)")
        if m % p:
            raise ValueError(f"the interleaved schedule runs the microbatches in groups of pp = {p}: "
                             f"{m} microbatches is not a multiple of {p} (Megatron-LM asks the same); "
                             f"choose {p}, {2 * p}, {3 * p}, ...")


def afab(p, m, rank):
    """GPipe: F0 F1 ... F(m-1), then B0 B1 ... B(m-1) -- on every stage."""
    return [Action("F", i, 0) for i in range(m)] + [Action("B", i, 0) for i in range(m)]


def one_f_one_b(p, m, rank):
    """PipeDream-flush: ``min(p - rank - 1, m)`` forwards of warm-up, then one forward and one backward
    at a time, then the remaining backwards."""
    warmup = min(p - rank - 1, m)
    plan = [Action("F", i, 0) for i in range(warmup)]
    for i in range(m - warmup):
        plan += [Action("F", warmup + i, 0), Action("B", i, 0)]
    return plan + [Action("B", i, 0) for i in range(m - warmup, m)]


def interleaved(p, m, v, rank):
    """Megatron-LM's interleaved 1F1B: the k-th forward of this rank is microbatch ``group·p + k mod p``
    of chunk ``(k mod p·v) // p`` (groups of p microbatches, chunk by chunk); the k-th backward the
    same microbatch of chunk ``v - 1 - (k mod p·v) // p``. Warm-up: ``2(p - rank - 1) + (v - 1)·p``
    forwards (at most all v·m), then 1F1B, then the remaining backwards."""
    total = v * m

    def action(kind, k):
        group, within = divmod(k, p * v)
        chunk = within // p
        return Action(kind, group * p + within % p, chunk if kind == "F" else v - 1 - chunk)

    warmup = interleaved_warmup(p, m, v, rank)
    plan = [action("F", k) for k in range(warmup)]
    for k in range(total - warmup):
        plan += [action("F", warmup + k), action("B", k)]
    return plan + [action("B", k) for k in range(total - warmup, total)]


def interleaved_warmup(p, m, v, rank):
    """Forwards before the first backward on ``rank``: each later stage needs two fewer (its
    microbatch's forward arrives one step later and its gradient one step sooner), plus (v-1)·p so
    that the first backward's microbatch has passed all v chunks. Megatron-LM's count, but for one case:
    at m = p Megatron runs every forward first on every stage ("all warm-up"); here the count stays the
    formula's (all of them on the first stages only) -- the same bubble (the clock's replay measures it),
    fewer activations held on the later stages. tests/test_pipeline_schedules.py writes Megatron's count
    out and pins this one to it."""
    return min(2 * (p - rank - 1) + (v - 1) * p, v * m)


def plan(schedule, p, m, v, rank):
    """The actions of ``rank`` (its stage, 0..p-1) in time order; ``ValueError`` for a schedule that
    cannot run (``check``)."""
    check(schedule, p, m, v)
    if schedule == "afab":
        return afab(p, m, rank)
    if schedule == "1f1b":
        return one_f_one_b(p, m, rank)
    return interleaved(p, m, v, rank)


def peak_in_flight(actions):
    """The most microbatch-chunks whose forward has run and backward has not, at any point of ``actions``:
    how many sets of activations the rank holds at its peak."""
    held = peak = 0
    for action in actions:
        held += 1 if action.kind == "F" else -1
        peak = max(peak, held)
    return peak


def expected_in_flight(schedule, p, m, v, rank):
    """The papers' count of activations held at the peak on stage ``rank``: m for AFAB,
    min(p - rank, m) for 1F1B, and the warm-up plus one (at most v·m) interleaved."""
    if schedule == "afab":
        return m
    if schedule == "1f1b":
        return min(p - rank, m)
    return min(interleaved_warmup(p, m, v, rank) + 1, v * m)


def describe(actions, chunks=1):
    """"F0 F1 B0 F2 B1 B2": a plan in one line."""
    return " ".join(action.label(chunks) for action in actions)
