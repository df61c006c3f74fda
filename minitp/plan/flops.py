"""How many floating-point operations does one step take? Narayanan et al. 2021 (arXiv 2104.04473), §5.1, eq. (3).

Derivation. A layer's forward has the GEMMs qkv (6bsh² flops: 2·s·b·h·3h), QKᵀ (2bs²h), ·V (2bs²h), proj
(2bsh²), fc1 and fc2 (16bsh² at f = 4h): 24bsh² + 4bs²h. The LM head adds 2bshV. A backward is twice its
forward (dX and dW), so a step without recomputation costs 3× the forward, and with full recomputation 4×
(the forward runs again in backward):

    F_full  = 96·B·s·l·h²·(1 + s/(6h) + V/(16lh))        (eq. 3: 4 × (24 + 4s/h)Bslh² + 3 × 2BshV)
    F_none  = 72·B·s·l·h²·(1 + s/(6h) + V/(12lh))        (3 × the same forward; the head is never recomputed)

(eq. 3's V/(16lh) is 6BshV/(96Bslh²): the head runs 3×, not 4×.) Selective recomputation re-runs only
QKᵀ and ·V (the attention core): F_none + 4Bs²hl. ``model_flops`` returns the three for B sequences.
"""


def narayanan_eq3(B, s, l, h, V):
    """Narayanan et al. 2021, eq. (3): flops per iteration with full activation recomputation."""
    return 96 * B * s * l * h * h * (1 + s / (6 * h) + V / (16 * l * h))


def model_flops(B, s, l, h, V, f=None):
    """{none, selective, full}: flops of a step of B sequences (any MLP width f; f = 4h is eq. 3's)."""
    f = 4 * h if f is None else f
    layer_forward = 2 * B * s * (3 * h * h + h * h + 2 * h * f) + 4 * B * s * s * h  # GEMMs + QKᵀ and ·V
    head_forward = 2 * B * s * h * V
    none = 3 * (l * layer_forward + head_forward)
    return {"none": none, "selective": none + l * 4 * B * s * s * h, "full": none + l * layer_forward}
