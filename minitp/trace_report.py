"""What does a trace say? Per rank: time computing, communicating and idle, how much communication was
hidden behind computation, a pipeline stage's measured bubble beside the formula's, and a picture of the
timeline (text for a terminal, PNG for a page).

Reads the Chrome trace that ``comm.record_timeline`` writes (``load(path)``, or the dict itself). For each
rank, inside its training steps (the "step" spans; the whole trace if it has none):

    C  compute        the union of the op spans, minus the time blocked in a collective or on a pipeline
                      neighbour (an op such as f's backward holds a blocking all-reduce: that time is
                      communication)
    M  communication  the union of the blocking collectives (context parallelism's exchanges included),
                      the waits and the non-blocking collectives in flight. Not a pipeline's receives:
                      a rank blocked in a receive is waiting for its neighbour to get there, idle -- the
                      bubble below counts that time. (Nor its sends in flight: posted, they cost nothing
                      until waited for, and their spans end when the send is first *seen* complete.)

    compute        |C|
    communication  |M − C|      communication nothing was computed behind: exposed
    idle           step − |C ∪ M|              (the three add up to the step)
    overlap        |M ∩ C| / |M|               the share of communication hidden behind compute
    dp hidden      the overlap of the data-parallel reductions alone (the collectives tagged
                   "gradients": the buckets): the share of their time hidden behind compute

**The pipeline bubble, measured.** Each stage's run of its schedule is a "pipeline" span
(``pipeline.engine.run``), whose arguments say p, m, v and the world ranks of the stage's pipeline. For
each step, the pipeline's schedule window W runs from the earliest start to the latest end of its
stages' "pipeline" spans (the k-th span of each, for step k). A stage r waits, in W:

    blocked        in a receive ("recv") or a send's wait ("wait send") inside its own run R_r, and
    outside R_r    before its run starts and after it ends while the others still run (stage p-1 of
                   1F1B is done with its last backward p-1 backwards before stage 0; whatever it does
                   then -- the loss's broadcast, its gradients' reduction -- the schedule left it that
                   time, and a reduction there fills the bubble rather than shrinking it)

    bubble_r  =  (|W − R_r| + |P2P_r ∩ R_r|) / |W|        summed over the steps, numerator and denominator

the share of the pipeline's schedule this stage spends waiting for a neighbour. Everything else in W is
the stage's work: its F and B compute, and the framework's own time between ops (time that is no
neighbour's fault). The denominator is the schedule, not the whole step, because the formula's is: the
optimizer and the gradients' synchronisation after it are no part of the (m + p - 1) slots ("bubble
ms" gives the wait itself, to set against the step). In the formula's idealised pipeline -- every stage
takes t_F per forward and t_B per backward of a microbatch, nothing else costs anything --
W = (m + p - 1)(t_F + t_B) and each stage works m(t_F + t_B) of it, so bubble_r = (p - 1)/(m + p - 1)
on every stage for AFAB and 1F1B; with v chunks per rank, each taking a v-th of the time,
(p - 1)/(v·m + p - 1): the "bubble formula" column (``pipeline.clock.bubble_formula``). A measurement
differs from it by what the idealisation leaves out: stages of unequal cost (the first holds the
embedding, the last the head and the loss), the transfer time inside a receive, a slow rank or a noisy
machine (each stage's wait shows where).

A trace with receives but no "pipeline" span (a hand-made one) takes W = R_r = the step: the bubble is
then the share of the step blocked in receives, and there is no formula.

The table's columns: rank, step ms, compute ms, exposed comm ms, idle ms, comm hidden (overlap), bubble
(measured), bubble formula, bubble ms ("waited of W"), dp hidden; "—" where a rank has none.

``tag="gradients"`` restricts M to the collectives whose tag contains it (the data-parallel reductions)
-- the question "were the gradient reductions hidden?" -- while C stays every op.

The times are the trace's, in microseconds; shown in milliseconds.
"""
import json
from dataclasses import dataclass

COLLECTIVE = ("comm", "inflight")
BLOCKING = ("comm", "p2p")
WAITING = ("p2p",)
"""Blocked on a pipeline neighbour: a receive, or a wait for a send."""
GRADIENTS = "gradients"
"""The tag of the data-parallel reductions (``parallel.data.buckets``): what "dp hidden" measures."""


def load(path):
    with open(path) as file:
        return json.load(file)


# -- sets of intervals ------------------------------------------------------------------------------


def union(intervals):
    """Sorted, disjoint intervals covering the same time as ``intervals`` [(start, end)]."""
    merged = []
    for start, end in sorted(i for i in intervals if i[1] > i[0]):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [tuple(i) for i in merged]


def intersect(a, b):
    """The intersection of two unions (sorted, disjoint)."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def subtract(a, b):
    """``a`` minus ``b`` (both unions)."""
    out = []
    for start, end in a:
        for cut_start, cut_end in b:
            if cut_end <= start or cut_start >= end:
                continue
            if cut_start > start:
                out.append((start, cut_start))
            start = max(start, cut_end)
            if start >= end:
                break
        if start < end:
            out.append((start, end))
    return out


def length(intervals):
    return sum(end - start for start, end in intervals)


# -- per rank ---------------------------------------------------------------------------------------


@dataclass
class RankTime:
    """One rank's step time, split; times in microseconds."""
    rank: int
    name: str
    step: float
    compute: float
    communication: float
    idle: float
    overlap: float
    """|M ∩ C| / |M|, or None without communication"""
    hidden: float
    """|M ∩ C|"""
    bubble: float = None
    """the measured pipeline bubble (see the module docstring), or None for a rank with no receive"""
    formula: float = None
    """(p - 1)/(v·m + p - 1) for the rank's pipeline, or None"""
    waiting: float = None
    """the bubble's numerator: time waiting for a neighbour, in the pipeline's windows"""
    window: float = None
    """the bubble's denominator: the pipeline's schedule windows |W|, summed over the steps"""
    gradients_hidden: float = None
    """the share of the "gradients" collectives' time hidden behind compute, or None without them"""


def spans_by_rank(trace):
    """{pid: (process name, [(category, start, end, name, args)])} from the trace's "X" events."""
    ranks = {}
    for event in trace["traceEvents"]:
        if event["ph"] == "M" and event["name"] == "process_name":
            ranks.setdefault(event["pid"], [event["args"]["name"], []])[0] = event["args"]["name"]
        elif event["ph"] == "X":
            entry = ranks.setdefault(event["pid"], [f"rank {event['pid']}", []])
            entry[1].append((event.get("cat", ""), event["ts"], event["ts"] + event["dur"], event["name"],
                             event.get("args", {})))
    return {pid: tuple(entry) for pid, entry in sorted(ranks.items())}


def sets(spans, tag=None):
    """(window W, compute C, communication M, collectives only) of one rank's spans, each a union."""
    def pick(categories, tagged=False):
        return union([(s, e) for c, s, e, _, args in spans if c in categories
                      and (not tagged or tag is None or tag in str(args.get("tag", "")))])
    window = union([(s, e) for c, s, e, name, _ in spans if c == "phase" and name == "step"])
    if not window:
        window = [(min(s for _, s, _, _, _ in spans), max(e for _, _, e, _, _ in spans))] if spans else []
    compute = intersect(subtract(pick(("compute",)), pick(BLOCKING)), window)
    communication = intersect(pick(COLLECTIVE, tagged=True), window)
    collectives = intersect(pick(COLLECTIVE, tagged=True), window)
    return window, compute, communication, collectives


def pipeline_runs(ranks):
    """{pid: [(start, end, args), ...]}: each rank's "pipeline" spans (its runs of a schedule), in order."""
    return {pid: sorted((s, e, args) for c, s, e, name, args in spans if c == "phase" and name == "pipeline")
            for pid, (_, spans) in ranks.items()}


def bubble(pid, ranks, runs=None):
    """(waiting, window, formula) of rank ``pid``'s pipeline bubble (see the module docstring), times in
    µs summed over its runs; None for a rank that never waited in a receive or ran a schedule."""
    runs = pipeline_runs(ranks) if runs is None else runs
    spans = ranks[pid][1]
    blocked = union([(s, e) for c, s, e, _, _ in spans if c in WAITING])
    if not runs[pid]:
        if not blocked:
            return None
        window = union([(s, e) for c, s, e, name, _ in spans if c == "phase" and name == "step"])
        if not window:
            window = [(min(s for _, s, _, _, _ in spans), max(e for _, _, e, _, _ in spans))]
        return length(intersect(blocked, window)), length(window), None
    waiting = total = 0.0
    for k, (start, end, args) in enumerate(runs[pid]):
        theirs = [runs[other][k] for other in args.get("ranks", [pid]) if other in runs and len(runs[other]) > k]
        first, last = min(s for s, _, _ in theirs), max(e for _, e, _ in theirs)
        waiting += (last - first) - (end - start) + length(intersect(blocked, [(start, end)]))
        total += last - first
    args = runs[pid][-1][2]
    p, m, v = args.get("stages"), args.get("microbatches"), args.get("chunks", 1)
    formula = (p - 1) / (v * m + p - 1) if p and m else None
    return waiting, total, formula


def breakdown(trace, tag=None):
    """A ``RankTime`` per rank (see the module docstring)."""
    rows = []
    ranks = spans_by_rank(trace)
    runs = pipeline_runs(ranks)
    for pid, (name, spans) in ranks.items():
        window, compute, communication, collectives = sets(spans, tag)
        step = length(window)
        busy = union(compute + communication)
        hidden = length(intersect(communication, compute))
        row = RankTime(pid, name, step, length(compute), length(communication) - hidden,
                       step - length(busy), hidden / length(communication) if communication else None, hidden)
        waited = bubble(pid, ranks, runs)
        if waited is not None and waited[1] > 0:
            row.waiting, row.window, row.formula = waited
            row.bubble = row.waiting / row.window
        gradients = sets(spans, GRADIENTS)[2]
        if gradients:
            row.gradients_hidden = length(intersect(gradients, compute)) / length(gradients)
        rows.append(row)
    return rows


def table(rows):
    """A markdown table of ``breakdown``'s rows, in milliseconds."""
    def share(value):
        return "—" if value is None else f"{100 * value:.0f}%"
    lines = ["| rank | step ms | compute ms | exposed comm ms | idle ms | comm hidden | bubble | bubble formula "
             "| bubble ms | dp hidden |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        waiting = "—" if row.waiting is None else f"{row.waiting / 1e3:.1f} of {row.window / 1e3:.1f}"
        lines.append(f"| {row.name} | {row.step / 1e3:.1f} | {row.compute / 1e3:.1f} | {row.communication / 1e3:.1f} "
                     f"| {row.idle / 1e3:.1f} | {share(row.overlap)} | {share(row.bubble)} | {share(row.formula)} "
                     f"| {waiting} | {share(row.gradients_hidden)} |")
    return "\n".join(lines)


# -- pictures ---------------------------------------------------------------------------------------

PHASE_LETTERS = {"forward": "F", "backward": "B", "optimizer": "O"}


def _span_of(trace, step=None):
    """(start, end) of the ``step``-th "step" span (all of them when None) over every rank."""
    starts, ends = [], []
    for _, spans in spans_by_rank(trace).values():
        steps = sorted((s, e) for c, s, e, name, _ in spans if c == "phase" and name == "step")
        if step is not None and steps:
            steps = steps[step:step + 1]
        chosen = steps or [(s, e) for _, s, e, _, _ in spans]
        starts += [s for s, _ in chosen]
        ends += [e for _, e in chosen]
    return min(starts), max(ends)


def text_timeline(trace, width=72, step=None, tag=None):
    """Three rows of ``width`` characters per rank over one step (``step``: which; default all):

        phases   F forward, B backward, O optimizer; on a pipeline stage, its microbatches' F and B
        compute  █ where an op computes (most of the column)
        comm     ▓ blocked in a collective, ░ waiting for a pipeline neighbour (a receive, a send's
                 wait), ─ a collective in flight while the rank computes
    """
    first, last = _span_of(trace, step)
    scale = (last - first) / width
    lines = [f"one column = {scale / 1e3:.2f} ms"]
    for _, (name, spans) in spans_by_rank(trace).items():
        _, compute, communication, _ = sets(spans, tag)
        blocked = intersect(union([(s, e) for c, s, e, _, _ in spans if c in BLOCKING]), communication)
        waiting = union([(s, e) for c, s, e, _, _ in spans if c in WAITING])
        # a pipeline stage's microbatches first: within one "pipeline" phase, they say more
        phases = [(s, e, n[0]) for c, s, e, n, _ in spans if c == "microbatch"]
        phases += [(s, e, PHASE_LETTERS[n]) for c, s, e, n, _ in spans if c == "phase" and n in PHASE_LETTERS]
        rows = {"phases": [], "compute": [], "comm": []}
        for column in range(width):
            cell = [(first + column * scale, first + (column + 1) * scale)]
            letter = next((mark for s, e, mark in phases if s < cell[0][1] and e > cell[0][0]), " ")
            rows["phases"].append(letter)
            rows["compute"].append("█" if length(intersect(compute, cell)) >= scale / 2 else " ")
            if length(intersect(blocked, cell)) >= scale / 2:
                rows["comm"].append("▓")
            elif length(intersect(waiting, cell)) >= scale / 2:
                rows["comm"].append("░")
            elif length(intersect(communication, cell)) > 0:
                rows["comm"].append("─")
            else:
                rows["comm"].append(" ")
        lines.append(name)
        lines += [f"  {row:8s}|{''.join(cells)}|" for row, cells in rows.items()]
    return "\n".join(lines)


def plot(trace, path, step=None, title=None, tag=None):
    """Draw the timeline of one step (``step``; default all) as a PNG at ``path``: per rank, a thin row
    of phases (forward, backward, optimizer), then rows of compute, of blocking communication (grey
    where a pipeline stage waits for its neighbour) and of collectives in flight (those whose tag contains ``tag``). Needs matplotlib (the [bench] extra);
    returns ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first, last = _span_of(trace, step)
    ranks = spans_by_rank(trace)
    figure, axes = plt.subplots(figsize=(11, 1.3 + 0.8 * len(ranks)))
    rows = (("compute", "#4878d0", 2.0), ("blocked in a collective", "#d65f5f", 1.0),
            ("collective in flight", "#ee854a", 0.0), ("waiting for a pipeline neighbour", "#8c8c8c", 1.0))
    phase_colours = {"forward": "#b5d99c", "backward": "#f3d37a", "optimizer": "#c9b3e6"}
    labels, positions = [], []
    for row, (_, (name, spans)) in enumerate(reversed(list(ranks.items()))):
        base = 3.8 * row
        _, compute, _, _ = sets(spans, tag)
        blocked = union([(s, e) for c, s, e, _, _ in spans if c in BLOCKING and c not in WAITING])
        waiting = union([(s, e) for c, s, e, _, _ in spans if c in WAITING])
        inflight = union([(s, e) for c, s, e, _, args in spans if c == "inflight"
                          and (tag is None or tag in str(args.get("tag", "")))])
        for intervals, (label, colour, y) in zip((compute, blocked, inflight, waiting), rows):
            bars = [((s - first) / 1e3, (e - s) / 1e3) for s, e in intervals if e > first and s < last]
            axes.broken_barh(bars, (base + y, 0.8), color=colour, label=label if row == 0 else None)
        for phase, colour in phase_colours.items():
            # a pipeline stage's microbatches: "F 3" in the forward's colour, "B 3" in the backward's
            bars = [((s - first) / 1e3, (e - s) / 1e3) for c, s, e, n, _ in spans if e > first and s < last and (
                    (c == "phase" and n == phase) or (c == "microbatch" and n[0] == PHASE_LETTERS[phase]))]
            axes.broken_barh(bars, (base + 2.9, 0.35), color=colour, label=phase if row == 0 else None,
                             edgecolor="white", linewidth=0.3)
        labels.append(name)
        positions.append(base + 1.5)
    axes.set_yticks(positions)
    axes.set_yticklabels(labels)
    axes.set_xlim(0, (last - first) / 1e3)
    axes.set_xlabel("ms")
    axes.set_title(title or "timeline")
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18 - 0.1 / len(ranks)), fontsize=8, ncol=6, frameon=False)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
