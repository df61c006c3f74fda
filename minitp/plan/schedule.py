"""How many microbatches does each pipeline stage hold at its peak, and how much of the step is bubble?

Narayanan et al. 2021 (arXiv 2104.04473), section 2.2: with p stages and m microbatches,

    AFAB (GPipe) and 1F1B       bubble share of the step (p - 1)/(m + p - 1)     (eq. of section 2.2.1:
                                                                                 bubble/ideal = (p - 1)/m)
    interleaved, v chunks       (p - 1)/(v·m + p - 1)                            (section 2.2.2: (p - 1)/(v·m))

and stage r holds m microbatches of activations under AFAB, min(p - r, m) under 1F1B (its warm-up plus
one). Interleaved, rank r runs min(2(p - r - 1) + (v - 1)p, v·m) forwards before its first backward
(Megatron-LM's warm-up; minitp keeps the formula's count at m = p too, see ``minitp.pipeline.schedules``)
and holds that plus one microbatch-chunk at its peak.

The chunks of one rank are not alike (chunk 0 of stage 0 holds the embeddings, the last chunk of the last
stage the head and the loss), so the peak in *bytes* of the interleaved schedule comes from replaying the
order of its forwards and backwards (``order``): the same order ``minitp.pipeline.schedules`` plans, which
the tests pin this replay to.
"""


def warmup(schedule, p, m, v, rank):
    """Forwards before the first backward on stage ``rank``."""
    if schedule == "afab":
        return m
    if schedule == "1f1b":
        return min(p - rank - 1, m)
    return min(2 * (p - rank - 1) + (v - 1) * p, v * m)


def held(schedule, p, m, v, rank):
    """Microbatch-chunks whose forward has run and backward has not, at the peak, on stage ``rank``."""
    if schedule == "afab":
        return m
    if schedule == "1f1b":
        return min(p - rank, m)
    return min(warmup(schedule, p, m, v, rank) + 1, v * m)


def order(schedule, p, m, v, rank):
    """("F" or "B", microbatch, chunk) in the order stage ``rank`` runs them (1F1B after the warm-up)."""
    if schedule == "afab":
        return [("F", i, 0) for i in range(m)] + [("B", i, 0) for i in range(m)]
    total = v * m if schedule == "interleaved" else m

    def action(kind, k):
        if schedule != "interleaved":
            return (kind, k, 0)
        group, within = divmod(k, p * v)
        chunk = within // p
        return (kind, group * p + within % p, chunk if kind == "F" else v - 1 - chunk)

    first = warmup(schedule, p, m, v, rank)
    found = [action("F", k) for k in range(first)]
    for k in range(total - first):
        found += [action("F", first + k), action("B", k)]
    return found + [action("B", k) for k in range(total - first, total)]


def peak_bytes(actions, bytes_of_chunk):
    """The most bytes held at once when each forward of chunk k keeps ``bytes_of_chunk(k)`` until its backward."""
    held_now = peak = 0
    for kind, _, chunk in actions:
        held_now += bytes_of_chunk(chunk) if kind == "F" else -bytes_of_chunk(chunk)
        peak = max(peak, held_now)
    return peak


def bubble(schedule, p, m, v=1):
    """The idle share of a step (Narayanan et al. 2021, section 2.2): (p-1)/(m+p-1), interleaved (p-1)/(v·m+p-1)."""
    chunks = v if schedule == "interleaved" else 1
    return (p - 1) / (chunks * m + p - 1)
