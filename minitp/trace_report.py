"""What does a trace say? Per rank: time computing, communicating and idle, how much communication was
hidden behind computation, and a picture of the timeline (text for a terminal, PNG for a page).

Reads the Chrome trace that ``comm.record_timeline`` writes (``load(path)``, or the dict itself). For each
rank, inside its training steps (the "step" spans; the whole trace if it has none):

    C  compute        the union of the op spans, minus the time blocked in a collective (an op such as
                      f's backward holds a blocking all-reduce: that time is communication)
    M  communication  the union of the blocking collectives, the waits, the point-to-point transfers and
                      the non-blocking collectives in flight

    compute        |C|
    communication  |M − C|      communication nothing was computed behind: exposed
    idle           step − |C ∪ M|              (the three add up to the step)
    overlap        |M ∩ C| / |M|               the share of communication hidden behind compute
    bubble         (step − |C ∪ M_collectives|) / step, for ranks with point-to-point spans (pipeline
                   stages): the share of the step spent waiting for a neighbour or doing nothing

``tag="gradients"`` restricts M to the collectives whose tag contains it (the data-parallel reductions)
-- the question "were the gradient reductions hidden?" -- while C stays every op.

The times are the trace's, in microseconds; shown in milliseconds.
"""
import json
from dataclasses import dataclass

COLLECTIVE = ("comm", "inflight")
BLOCKING = ("comm", "p2p")


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
    communication = intersect(pick(COLLECTIVE + ("p2p",), tagged=True), window)
    collectives = intersect(pick(COLLECTIVE, tagged=True), window)
    return window, compute, communication, collectives


def breakdown(trace, tag=None):
    """A ``RankTime`` per rank (see the module docstring)."""
    rows = []
    for pid, (name, spans) in spans_by_rank(trace).items():
        window, compute, communication, collectives = sets(spans, tag)
        step = length(window)
        busy = union(compute + communication)
        hidden = length(intersect(communication, compute))
        has_p2p = any(c == "p2p" for c, *_ in spans)
        bubble = (step - length(union(compute + collectives))) / step if has_p2p and step else None
        rows.append(RankTime(pid, name, step, length(compute), length(communication) - hidden,
                             step - length(busy), hidden / length(communication) if communication else None,
                             hidden, bubble))
    return rows


def table(rows):
    """A markdown table of ``breakdown``'s rows, in milliseconds."""
    lines = ["| rank | step ms | compute ms | exposed comm ms | idle ms | comm hidden | bubble |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        overlap = "—" if row.overlap is None else f"{100 * row.overlap:.0f}%"
        bubble = "—" if row.bubble is None else f"{100 * row.bubble:.0f}%"
        lines.append(f"| {row.name} | {row.step / 1e3:.1f} | {row.compute / 1e3:.1f} | {row.communication / 1e3:.1f} "
                     f"| {row.idle / 1e3:.1f} | {overlap} | {bubble} |")
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

        phases   F forward, B backward, O optimizer
        compute  █ where an op computes (most of the column)
        comm     ▓ blocked in a collective, ─ a collective in flight while the rank computes
    """
    first, last = _span_of(trace, step)
    scale = (last - first) / width
    lines = [f"one column = {scale / 1e3:.2f} ms"]
    for _, (name, spans) in spans_by_rank(trace).items():
        _, compute, communication, _ = sets(spans, tag)
        blocked = intersect(union([(s, e) for c, s, e, _, _ in spans if c in BLOCKING]), communication)
        phases = [(s, e, PHASE_LETTERS[n]) for c, s, e, n, _ in spans if c == "phase" and n in PHASE_LETTERS]
        rows = {"phases": [], "compute": [], "comm": []}
        for column in range(width):
            cell = [(first + column * scale, first + (column + 1) * scale)]
            letter = next((mark for s, e, mark in phases if s < cell[0][1] and e > cell[0][0]), " ")
            rows["phases"].append(letter)
            rows["compute"].append("█" if length(intersect(compute, cell)) >= scale / 2 else " ")
            if length(intersect(blocked, cell)) >= scale / 2:
                rows["comm"].append("▓")
            elif length(intersect(communication, cell)) > 0:
                rows["comm"].append("─")
            else:
                rows["comm"].append(" ")
        lines.append(name)
        lines += [f"  {row:8s}|{''.join(cells)}|" for row, cells in rows.items()]
    return "\n".join(lines)


def plot(trace, path, step=None, title=None, tag=None):
    """Draw the timeline of one step (``step``; default all) as a PNG at ``path``: per rank, a thin row
    of phases (forward, backward, optimizer), then rows of compute, of blocking communication and of
    collectives in flight (those whose tag contains ``tag``). Needs matplotlib (the [bench] extra);
    returns ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first, last = _span_of(trace, step)
    ranks = spans_by_rank(trace)
    figure, axes = plt.subplots(figsize=(11, 1.3 + 0.8 * len(ranks)))
    rows = (("compute", "#4878d0", 2.0), ("blocked in a collective", "#d65f5f", 1.0),
            ("collective in flight", "#ee854a", 0.0))
    phase_colours = {"forward": "#b5d99c", "backward": "#f3d37a", "optimizer": "#c9b3e6"}
    labels, positions = [], []
    for row, (_, (name, spans)) in enumerate(reversed(list(ranks.items()))):
        base = 3.8 * row
        _, compute, _, _ = sets(spans, tag)
        blocked = union([(s, e) for c, s, e, _, _ in spans if c in BLOCKING])
        inflight = union([(s, e) for c, s, e, _, args in spans if c == "inflight"
                          and (tag is None or tag in str(args.get("tag", "")))])
        for intervals, (label, colour, y) in zip((compute, blocked, inflight), rows):
            bars = [((s - first) / 1e3, (e - s) / 1e3) for s, e in intervals if e > first and s < last]
            axes.broken_barh(bars, (base + y, 0.8), color=colour, label=label if row == 0 else None)
        for phase, colour in phase_colours.items():
            bars = [((s - first) / 1e3, (e - s) / 1e3) for c, s, e, n, _ in spans
                    if c == "phase" and n == phase and e > first and s < last]
            axes.broken_barh(bars, (base + 2.9, 0.35), color=colour, label=phase if row == 0 else None)
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
