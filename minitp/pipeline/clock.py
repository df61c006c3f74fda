"""How long does each stage wait? The schedules replayed on a logical clock, and the bubble they leave.

Each rank runs its plan (``schedules.py``) in order; an action starts when the rank is free and its
input exists:

- F of microbatch i through model chunk c (c = k·p + r for rank r's chunk k) needs F of i through
  chunk c - 1 (on the previous rank) to have finished -- chunk 0 needs nothing;
- B of i through chunk c needs B of i through chunk c + 1 -- the last chunk needs its own F of i.

With unit costs (F = B = 1 per chunk) the replay is exact arithmetic. Every rank is busy 2·v·m units;
the rest of the step is the bubble. AFAB and 1F1B both take 2(m + p - 1) units, so each rank idles
(p - 1)/(m + p - 1) of the step; interleaved takes 2(v·m + p - 1) units of 1/v-stage chunks, idling
(p - 1)/(v·m + p - 1). A replay that cannot go on (every rank waiting) would be a deadlock of the real
run: the engine's receives wait for exactly these inputs, and its sends never wait.

``Timeline`` also holds the wall-clock times the engine measures, so both print and draw alike.
"""
from fractions import Fraction

from minitp.pipeline.schedules import plan as make_plan


class Timeline:
    """``rows[r]``: rank r's (start, end, Action) in time order, in units or seconds."""

    def __init__(self, rows, chunks=1):
        self.rows, self.chunks = rows, chunks

    @property
    def makespan(self):
        """The step's length: from the first start to the last end, over every rank."""
        return max(end for row in self.rows for _, end, _ in row) - min(start for row in self.rows for start, _, _ in row)

    def busy(self, rank):
        return sum(end - start for start, end, _ in self.rows[rank])

    def idle_fraction(self, rank):
        """The share of the step rank ``rank`` spends waiting: 1 - busy / makespan (a Fraction for
        integer or Fraction times, exact)."""
        busy, makespan = self.busy(rank), self.makespan
        if isinstance(busy, (int, Fraction)) and isinstance(makespan, (int, Fraction)):
            return 1 - Fraction(busy) / Fraction(makespan)
        return 1 - busy / makespan

    def text(self, unit=None, width=4):
        """One line per rank: each column is ``unit`` of time (default: the shortest action), an action's
        label in the columns it runs, ``·`` where the rank waits."""
        unit = unit or min(end - start for row in self.rows for start, end, _ in row)
        origin = min(start for row in self.rows for start, _, _ in row)
        columns = round(self.makespan / unit)
        lines = []
        for rank, row in enumerate(self.rows):
            cells = ["·".center(width)] * columns
            for start, end, action in row:
                first, last = round((start - origin) / unit), round((end - origin) / unit)
                for column in range(first, max(last, first + 1)):
                    cells[min(column, columns - 1)] = action.label(self.chunks).center(width)
            lines.append(f"stage {rank} |{''.join(cells)}|")
        return "\n".join(lines)


def replay(schedule, p, m, v=1, forward=1, backward=1):
    """The ``Timeline`` of ``schedule`` on p stages, m microbatches, v chunks per rank, each F costing
    ``forward`` and each B ``backward`` (exact with Fractions or integers). ``RuntimeError`` if the plans
    deadlock."""
    plans = [make_plan(schedule, p, m, v, rank) for rank in range(p)]
    last_chunk = p * v - 1
    done = {}  # (kind, microbatch, global chunk) -> finish time
    rows = [[] for _ in range(p)]
    position, free = [0] * p, [0] * p
    while any(position[r] < len(plans[r]) for r in range(p)):
        progressed = False
        for rank in range(p):
            while position[rank] < len(plans[rank]):
                action = plans[rank][position[rank]]
                chunk = action.chunk * p + rank
                if action.kind == "F":
                    needed = ("F", action.microbatch, chunk - 1) if chunk > 0 else None
                else:
                    needed = ("B", action.microbatch, chunk + 1) if chunk < last_chunk else ("F", action.microbatch, chunk)
                if needed is not None and needed not in done:
                    break  # this rank waits; the others may move on
                start = max(free[rank], done[needed] if needed is not None else 0)
                free[rank] = start + (forward if action.kind == "F" else backward)
                done[(action.kind, action.microbatch, chunk)] = free[rank]
                rows[rank].append((start, free[rank], action))
                position[rank] += 1
                progressed = True
        if not progressed:
            waiting = {rank: plans[rank][position[rank]] for rank in range(p) if position[rank] < len(plans[rank])}
            raise RuntimeError(f"{schedule} deadlocks at p={p}, m={m}, v={v}: every rank waits, {waiting}")
    return Timeline(rows, chunks=v)


def bubble_formula(schedule, p, m, v=1):
    """The papers' idle share of a step: (p - 1)/(m + p - 1), or (p - 1)/(v·m + p - 1) interleaved."""
    v = v if schedule == "interleaved" else 1
    return Fraction(p - 1, v * m + p - 1)
