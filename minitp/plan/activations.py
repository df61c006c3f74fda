"""How many bytes of activations does one rank keep for backward? Per layer, and at the two ends of the model.

**The paper.** Korthikanti et al. 2022 (arXiv 2205.05198), section 4 and table 2, per transformer layer
with 2-byte activations and 1-byte dropout masks (s sequence, b microbatch, h hidden, a heads, t tp):

    no parallelism                       sbh(34 + 5as/h)
    tensor parallelism (TP)              sbh(10 + 24/t + 5as/(ht))
    TP + sequence parallelism (SP)       sbh(34/t + 5as/(ht))
    TP + selective recomputation         sbh(10 + 24/t)
    TP + SP + selective recomputation    sbh(34/t)
    full recomputation                   2sbh

``korthikanti_table2`` is that table. With e bytes per activation and m per mask element the 34 is
16e + 2m and the 5 is 2e + m (attention 11sbh + 5as²b, MLP 19sbh, two LayerNorm inputs 4sbh, at e = 2).

**What minitp keeps** (``minitp.track_saved``; ``layer_bytes`` models it to the byte), and how it departs:

- each LayerNorm keeps its normalised input x̂ (the paper's input, e·sbh) *and* 1/std per token (e·sb):
  +2e·sb per layer, which the paper ignores (its count has no sb-sized terms);
- attention's Mul keeps the 0-d constant 1/√d: +e bytes per layer (not under selective recomputation);
- no dropout (p = 0): no masks (−2m·sbh and −m·as²b), and the probabilities are not copied by a dropout
  (−e·as²b): the paper assumes dropout on;
- the MLP width f is any ffn_hidden: the paper's 19sbh is e(sbh + 2·sbf) + m·sbh with f = 4h;
- full recomputation keeps the layer's input alone: e·sbh (e·sbh/t under SP, where the input is a
  sequence shard); the paper's 2sbh is e·sbh at e = 2, without SP.

Blockwise attention (minitp's default from s > 128 without context parallelism, ``Choices.attention``)
keeps no s×s array: in place of the softmax output, the dropout's mask and dropped probabilities and
the 1/√d constant it keeps the attention's output O (e·sbh/t) and one log-sum-exp per row (e·as·b/t).

Context parallelism (c ranks) gives each rank s/c of the queries; every sequence-sized term is s/c. Ring
attention (``RingAttention``) keeps q, k, v, its output (the proj input's memory) and one lse per row of
its a/t heads: no s×s block, no dropout mask (drawn again in backward). Ulysses keeps the plain core of
a/(t·c) heads over all s tokens ((a/t)·(s/c)·s scores; blockwise from s > 128). Measured.

A mixture of experts (``Model.experts``) keeps, in place of the MLP's fc1 input, GeLU input and fc2 input,
its router's, its gates' and its experts' arrays on the rows they got: ``plan.experts`` (exact from a
run's routing counts, else evenly spread, formula only).
"""
from minitp.plan.shapes import BLOCKWISE_ABOVE, ITEMSIZE

MASK = 1  # a dropout mask is a bool array: 1 byte per element (the paper's count)


def korthikanti_table2(s, b, h, a, t=1, sequence_parallel=False, recompute=None):
    """Korthikanti et al. 2022, table 2: activation bytes per layer at 2-byte activations, 1-byte masks."""
    if recompute == "full":
        return 2 * s * b * h
    if recompute == "selective":
        return s * b * h * (34 / t if sequence_parallel else 10 + 24 / t)
    if t == 1 and not sequence_parallel:
        return s * b * h * (34 + 5 * a * s / h)
    if sequence_parallel:
        return s * b * h * (34 / t + 5 * a * s / (h * t))
    return s * b * h * (10 + 24 / t + 5 * a * s / (h * t))


def _sizes(model, mesh, choices):
    s = choices.seq or model.seq_len
    local = s // mesh.cp  # this rank's tokens along the sequence
    sp_tokens = local // mesh.tp if choices.sequence_parallel else local  # LayerNorm, dropout: s/t under SP
    return s, local, sp_tokens


def element_bytes(choices):
    return ITEMSIZE[choices.precision]


def layer_terms(model, mesh, choices, b=None, layer=0):
    """{what is kept: bytes} for transformer layer ``layer`` on one rank, minitp's count (see the module doc;
    the layers differ only in a mixture of experts' routing, ``plan.experts``)."""
    e, t = element_bytes(choices), mesh.tp
    b = choices.micro_batch if b is None else b
    h, a, f = model.hidden, model.heads, model.ffn_hidden
    _, S, S_sp = _sizes(model, mesh, choices)
    keys = S  # the plain core on one rank: s/c queries against s/c keys at a time (c = 1: all s)
    dropout, attention_dropout = model.dropout > 0, model.attention_dropout > 0
    if choices.recompute == "full":
        return {"the layer's input, kept by full recomputation (e·sbh, /t under SP)": e * S_sp * b * h}
    terms = {
        "LayerNorm x̂, 2 per layer (the paper's 2 LayerNorm inputs)": 2 * e * S_sp * b * h,
        "LayerNorm 1/std per token, 2 per layer (minitp only: +2e·sb)": 2 * e * S_sp * b,
        "qkv input (replicated under TP, s/t under SP)": e * S_sp * b * h,
        "q, k, v (/t: the rank's heads)": 3 * e * S * b * h // t,
        "proj input (/t)": e * S * b * h // t,
    }
    if model.experts:
        # a MoE in place of the MLP keeps its router's input, its gates and its experts' rows (plan.experts)
        from minitp.plan.experts import activation_terms
        terms.update(activation_terms(model, mesh, choices, layer))
    else:
        terms["fc1 input (replicated under TP, s/t under SP)"] = e * S_sp * b * h
        terms["GeLU input and fc2 input (2·sbf/t)"] = 2 * e * S * b * f // t
    if dropout:
        terms["residual dropout masks, 2 per layer (1 byte each)"] = 2 * MASK * S_sp * b * h
    ring = mesh.cp > 1 and choices.cp_kind in ("ring", "zigzag")
    ulysses = mesh.cp > 1 and choices.cp_kind == "ulysses"
    if ulysses:
        keys = S * mesh.cp  # a/(t·c) heads × all s tokens: (a/t)·(s/c)·s scores, as many as a/t × s/c × s
    if choices.recompute != "selective" and ring:
        # ring attention (RingAttention) keeps q, k, v, O and the lse only: no s×s block, no dropout mask
        # (drawn again in backward), no 1/√d constant; O is the proj input's memory, counted above
        terms["ring attention's log-sum-exp per row (a/t heads)"] = e * (a // t) * S * b
    elif choices.recompute != "selective" and blockwise(mesh, choices, keys):
        # with one head on the rank, the proj input is a view of O (the transpose moves a length-1 axis):
        # track_saved counts that memory once, under the proj input above
        terms["blockwise attention's output O (/t)"] = e * S * b * h // t if a // t > 1 else 0
        terms["blockwise attention's log-sum-exp per row (a/t heads)"] = e * (a // t) * S * b
    elif choices.recompute != "selective":
        heads = a // t
        terms["softmax output (a/t heads' s×s scores; Ulysses: a/(tc) heads × s×s)"] = e * heads * S * keys * b
        if attention_dropout:
            terms["attention dropout mask and dropped probabilities"] = (e + MASK) * heads * S * keys * b
        terms["the 0-d constant 1/sqrt(d) kept by attention's Mul (minitp only: +e)"] = e
    return terms


def blockwise(mesh, choices, local_seq):
    """Whether the layer's attention runs blockwise: as asked, else minitp's default (F.attention on the
    CPU: s > 128 positions, every key on this rank -- ring attention and Ulysses under cp keep their own)."""
    if choices.attention is not None:
        return choices.attention == "blockwise"
    return (mesh.cp == 1 or choices.cp_kind == "ulysses") and local_seq > BLOCKWISE_ABOVE


def layer_bytes(model, mesh, choices, b=None, layer=0):
    """The bytes transformer layer ``layer`` keeps for backward on one rank (minitp's ``track_saved`` count)."""
    return sum(layer_terms(model, mesh, choices, b, layer).values())


def first_terms(model, mesh, choices, b=None):
    """{what: bytes} the embeddings keep (model chunk 0): the ids, the positions, the embedding dropout mask."""
    b = choices.micro_batch if b is None else b
    s, _, S_sp = _sizes(model, mesh, choices)
    tokens = s // mesh.cp
    terms = {"token ids (kept by the vocab-parallel lookup; int64)": choices.ids_itemsize * tokens * b,
             "position ids of this rank's tokens (int64)": choices.ids_itemsize * S_sp}
    if model.dropout > 0:
        terms["embedding dropout mask"] = MASK * S_sp * b * model.hidden
    return terms


def last_terms(model, mesh, choices, b=None):
    """{what: bytes} the final LayerNorm, the LM head and the vocab-parallel loss keep (the last chunk).

    The tied head under SP keeps the *gathered* input (all s tokens), the untied one its s/t shard (it
    gathers again in backward); ``minitp.track_saved`` also counts the tied table's transposed view (no new
    memory: it is the parameter)."""
    e, t = element_bytes(choices), mesh.tp
    b = choices.micro_batch if b is None else b
    h, V = model.hidden, model.vocab
    _, S, S_sp = _sizes(model, mesh, choices)
    terms = {"ln_f x̂ and 1/std": e * S_sp * b * (h + 1)}
    if model.tie_embeddings:
        terms["LM head input (tied: the gathered s tokens)"] = e * S * b * h
        terms["the tied table's transposed view (counted by track_saved; no new memory)"] = e * V // t * h
    else:
        terms["LM head input (s/t under SP: gathered again in backward)"] = e * S_sp * b * h
    terms["softmax of this rank's V/t logits, kept by the vocab-parallel loss"] = e * S * b * V // t
    terms["target ids (int64)"] = choices.ids_itemsize * S * b
    return terms


VIEW_TERM = "the tied table's transposed view (counted by track_saved; no new memory)"


def chunk_bytes(model, mesh, choices, chunk, b=None):
    """What one microbatch keeps for backward through model chunk ``chunk`` (``track_saved`` around its
    forward, as ``pipeline.StageRun.saved_bytes`` and ``ParallelGPT.loss`` measure it)."""
    from minitp.plan.parameters import chunk_layers
    blocks = chunk_layers(model, mesh.pp, mesh.virtual_stages, chunk)
    total = sum(layer_bytes(model, mesh, choices, b, i) for i in blocks)
    if 0 in blocks:
        total += sum(first_terms(model, mesh, choices, b).values())
    if model.layers - 1 in blocks:
        total += sum(last_terms(model, mesh, choices, b).values())
    return total
