"""Attention without the s×s matrix: the dense core and FlashAttention's blockwise algorithm side by side.

    python tutorials/blockwise_attention.py

The dense core (``minitp.functional.attention_core``) is the readable definition: scores = q kᵀ/√d, the
causal mask, softmax, dropout, @ v -- and every op keeps its (b, a, s, s) array for backward. Blockwise
attention (``minitp.functional.blockwise_attention``; Dao et al. 2022) computes the same numbers one
(query block, key block) pair at a time, keeping only q, k, v, the output O and one log-sum-exp per row.
Ring attention (``minitp.parallel.context.ring``) is the same loop with the key blocks on other ranks:
both call ``minitp.functional.online_softmax``'s attend, merge and attend_backward.
"""
import numpy

from minitp import Tensor, track_saved
from minitp import functional as F
from minitp.functional.blockwise_attention import block_pairs
from minitp.functional.online_softmax import attend, merge
from minitp.nn import Dropout
from minitp.report import say, verdict
from minitp.testing import max_error

rng = numpy.random.default_rng(0)
b, a, s, d = 2, 4, 512, 16
q, k, v = (rng.standard_normal((b, a, s, d)) for _ in range(3))
upstream = rng.standard_normal((b, a, s, d))

# ---------------------------------------------------------------------------------------------------
# 1. Two blocks of keys merge exactly. Attend a query row to the first half of the keys: a normalised
# output O_1 and lse_1 = log Σ e^(score). To the second half: O_2, lse_2. Since e^lse is each half's share
# of the softmax denominator, lse = log(e^lse_1 + e^lse_2) and O = e^(lse_1 - lse) O_1 + e^(lse_2 - lse) O_2.
# ---------------------------------------------------------------------------------------------------
say("1. two halves of the keys, attended alone and merged by their log-sum-exps (one query row):")
scaled = q[0, 0, -1:] * d ** -0.5  # the last query: it sees every key
out, lse = attend(scaled, k[0, 0, :s // 2], v[0, 0, :s // 2])
merge(out, lse, *attend(scaled, k[0, 0, s // 2:], v[0, 0, s // 2:]))
scores = scaled @ k[0, 0].T
probs = numpy.exp(scores - scores.max()) / numpy.exp(scores - scores.max()).sum()
merge_error = max_error(out, probs @ v[0, 0])
say(f"   merged vs softmax over all keys: {merge_error:.1e}")

# ---------------------------------------------------------------------------------------------------
# 2. The whole core, both ways, forward and backward, and what each keeps.
# ---------------------------------------------------------------------------------------------------
say(f"\n2. causal attention at s={s}, b={b}, a={a}, d={d}, float64, both ways:")
pairs = block_pairs(s, 128, causal=True)
say(f"   blockwise, blocks of 128: {sum(len(keys) for _, keys in pairs)} of {len(pairs) ** 2} block pairs "
    "computed (those above the diagonal are wholly in the future: skipped)")
results, kept = {}, {}
for kind in ("dense", "blockwise"):
    leaves = [Tensor(x, requires_grad=True) for x in (q, k, v)]
    with track_saved() as saved:
        output = F.attention(*leaves, True, None, kind=kind)
    output.backward(upstream)
    results[kind], kept[kind] = [output.data] + [leaf.grad for leaf in leaves], saved.total
    say(f"   {kind:9s} keeps {saved.total:>12,} B for backward: {saved.by_op}")
errors = [max_error(x, y) for x, y in zip(results["blockwise"], results["dense"])]
say(f"   blockwise vs dense: output {errors[0]:.1e}, dq {errors[1]:.1e}, dk {errors[2]:.1e}, dv {errors[3]:.1e}")
# the formulas, e = 8 bytes in float64, h = a·d: dense keeps q, k, v, the s×s probabilities and 1/√d;
# blockwise keeps q, k, v, O and one log-sum-exp per row
formula = {"dense": 8 * (3 * s * b * a * d + a * s * s * b) + 8, "blockwise": 8 * (4 * s * b * a * d + a * s * b)}
say(f"   dense keeps e(3sbh + as²b) + e = {formula['dense']:,} B; blockwise e(4sbh + asb) = {formula['blockwise']:,} B")

# ---------------------------------------------------------------------------------------------------
# 3. Dropout: the mask is a function of each element's global (batch, head, query, key) index, so the
# blockwise core draws exactly the dense core's mask block by block -- and again in backward, keeping none.
# ---------------------------------------------------------------------------------------------------
outputs = []
for kind in ("dense", "blockwise"):
    outputs.append(F.attention(*(Tensor(x) for x in (q, k, v)), True, Dropout(0.1, seed=3), kind=kind).data)
dropout_error = max_error(outputs[1], outputs[0])
say(f"\n3. with attention dropout 0.1: blockwise vs dense {dropout_error:.1e} (the same mask elements)")
say("\nminitp's default (F.attention, default_kind): blockwise for causal attention longer than 128 positions")
say("on the CPU, where it measured faster (benchmarks/attention.py); the dense core otherwise")
worst = max(errors + [merge_error, dropout_error])
verdict(worst <= 1e-12 and kept == formula,
        f"blockwise attention == dense attention (max error {worst:.1e}, output and gradients, dropout "
        f"included; the bytes kept == their formulas)", f"errors {worst:.1e}, kept {kept} vs formulas {formula}")
