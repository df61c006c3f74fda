"""Where does a rank's block of a tensor sit in the serial tensor? Contiguous blocks, and the zigzag of
context parallelism.

A parallel model hands each rank a block of every serial activation; whatever must match the serial
model element by element -- a dropout mask, the position vectors, the causal mask -- asks where the
block's entries sit. One mechanism answers for every layout: a list of ``splits``, each

    (axis, index, parts)              along ``axis`` this is block ``index`` of ``parts`` equal blocks
    (axis, index, parts, "zigzag")    ... of 2·parts equal chunks, holding chunks index and 2·parts-1-index

Several entries on one axis nest, outermost first: context parallelism's cp split of the sequence,
then sequence parallelism's tp split of the rank's own tokens is ``((0, cp_rank, cp, "zigzag"),
(0, tp_rank, tp))``: tp block ``tp_rank`` of the tokens that cp rank ``cp_rank`` holds.

**Why zigzag.** Under the causal mask, token i attends i + 1 keys. Cut the sequence into cp contiguous
blocks and the last rank attends (2cp - 1) times the first rank's (query, key) pairs (for long blocks).
Cut it into 2·cp chunks and give rank r chunks r and 2cp - 1 - r: an early chunk and its mirror image
late chunk, so every rank attends (2cp - 1)c² + c(c + 1) pairs for chunks of c tokens -- the same for
every rank (Brandon et al. 2023, "Striped Attention", and zhuzilin's ring-flash-attention use this
placement).
"""
import numpy

CONTIGUOUS, ZIGZAG = "contiguous", "zigzag"
LAYOUTS = (CONTIGUOUS, ZIGZAG)


def runs(index, parts, total, layout=CONTIGUOUS):
    """The runs [start, stop) of global positions that block ``index`` of ``parts`` holds along an axis of
    length ``total``, in the block's own order: one run, or two under ``"zigzag"`` (chunks index and
    2·parts - 1 - index of 2·parts).

    ``ValueError`` when ``total`` does not split into ``parts`` blocks (or 2·``parts`` chunks)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    pieces = parts * (2 if layout == ZIGZAG else 1)
    if total % pieces:
        how = f"2·{parts} = {pieces} equal chunks (zigzag)" if layout == ZIGZAG else f"{parts} equal blocks"
        raise ValueError(f"a length of {total} cannot be cut into {how}: choose a length divisible by {pieces}")
    size = total // pieces
    if layout == CONTIGUOUS:
        return [(index * size, (index + 1) * size)]
    mirror = 2 * parts - 1 - index
    return [(index * size, (index + 1) * size), (mirror * size, (mirror + 1) * size)]


def positions(entries, length):
    """(the global length, the global position of each of the ``length`` entries of a block) along one
    axis, for that axis's ``entries`` ((index, parts) or (index, parts, layout), outermost first).

    Applied inside out: the innermost entry places the block among its siblings, the next one places
    that among its own, and so on. The positions are a numpy int64 array; ``None`` entries: the block
    is the whole axis."""
    where, total = numpy.arange(length), length
    for entry in reversed(entries):
        index, parts, layout = (tuple(entry) + (CONTIGUOUS,))[:3]
        total *= parts
        # the block's own order: the concatenation of its runs; where[i] is a position inside the block
        where = numpy.concatenate([numpy.arange(start, stop) for start, stop in runs(index, parts, total, layout)])[where]
    return total, where


def locate(splits, shape):
    """(global_shape, offset) of a block of ``shape`` placed by ``splits``: per axis, the global length,
    and the start of the block (an int) when it is one contiguous run, else the position of each entry
    (an array) -- what ``minitp.rng.keep_mask`` takes."""
    global_shape, offset = list(shape), [0] * len(shape)
    for axis in sorted({split[0] % len(shape) for split in splits}):
        entries = [split[1:] for split in splits if split[0] % len(shape) == axis]
        total, where = positions(entries, shape[axis])
        contiguous = len(where) == 0 or bool((numpy.diff(where) == 1).all())
        global_shape[axis], offset[axis] = total, (int(where[0]) if len(where) else 0) if contiguous else where
    return global_shape, offset
