"""One-pass GPU kernels for elementwise chains: bias + GeLU, dropout's counter hash, AdamW's update.
Each computes its definition's formula (named beside it) in the same order of operations."""
import numpy

from minitp.kernels import compiled

_SQRT_2_OVER_PI = 0.7978845608028654  # sqrt(2/pi)
_GELU_CUBIC = 0.044715

# -- bias + GeLU (tanh form): minitp.functional.activations.GeLU ------------------------------------
# y = z sigma(2u), u = c (z + k z^3), z = x + b; dy/dz = sigma (1 + (1 - sigma) z (2c + 6ck z^2)).
# sigma(2u) = 1 / (1 + e^(-2u)): for very negative z e^(-2u) is inf and y -0, its limit (as in numpy).

_GELU_PRE = f"""
    const T c = {_SQRT_2_OVER_PI!r}, k = {_GELU_CUBIC!r};
    T z = x + b;
    T sigma = 1 / (1 + exp(-2 * c * z * (1 + k * z * z)));
"""


def _gelu_forward(cupy, ctype):
    return cupy.ElementwiseKernel("T x, T b", "T y", _GELU_PRE + "y = z * sigma;", "minitp_bias_gelu_forward")


def _gelu_backward(cupy, ctype):
    body = _GELU_PRE + f"dx = g * sigma * (1 + (1 - sigma) * z * (2 * c + {6 * _GELU_CUBIC!r} * c * z * z));"
    return cupy.ElementwiseKernel("T x, T b, T g", "T dx", body, "minitp_bias_gelu_backward")


def bias_gelu_forward(x, bias=None):
    """GeLU(x + bias) (tanh form) in one pass; ``bias`` (h,) broadcast over x's last axis, or None."""
    b = x.dtype.type(0) if bias is None else bias
    return compiled("bias_gelu_forward", x.dtype, _gelu_forward)(x, b)


def bias_gelu_backward(x, grad, bias=None):
    """d GeLU(x + bias) / dx times ``grad``, in one pass (the bias's gradient is its sum over rows)."""
    b = x.dtype.type(0) if bias is None else bias
    return compiled("bias_gelu_backward", x.dtype, _gelu_backward)(x, b, grad)


# -- dropout's keep mask: minitp.rng.keep_mask ------------------------------------------------------
# keep iff the top 32 bits of splitmix64(index * golden + key) are >= round(p 2^32): rng._hash_into and
# rng._splitmix64_in_place, nine passes over uint64 arrays in numpy, here one.

def _keep(cupy, ctype):
    return cupy.ElementwiseKernel(
        "uint64 index, uint64 key, uint64 threshold", "bool keep",
        """
        unsigned long long z = index * 0x9E3779B97F4A7C15ull + key;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        keep = (z >> 32) >= threshold;
        """, "minitp_dropout_keep")


def keep_mask(index, key, threshold):
    """The bool keep mask of the elements at global flat ``index`` (uint64 array) for stream ``key``."""
    return compiled("dropout_keep", "float32", lambda cupy, _: _keep(cupy, None))(
        index, numpy.uint64(key), numpy.uint64(threshold))


# -- AdamW: minitp.nn.optim.AdamW._update -------------------------------------------------------------
# p *= 1 - lr wd; m = beta1 m + (1 - beta1) g; v = beta2 v + (1 - beta2) g g;
# p -= (m lr/c1) / (sqrt(v)/sqrt(c2) + eps), c_i = 1 - beta_i^t: torch's folding of the bias correction.

def _adamw(cupy, ctype):
    return cupy.ElementwiseKernel(
        "T g, T decay, T beta1, T one_minus_beta1, T beta2, T one_minus_beta2, T step, T sqrt_c2, T eps",
        "T p, T m, T v",
        """
        p = p * decay;
        m = m * beta1 + g * one_minus_beta1;
        v = v * beta2 + g * one_minus_beta2 * g;
        p = p - (m * step) / (sqrt(v) / sqrt_c2 + eps);
        """, "minitp_adamw")


def adamw(param, grad, exp_avg, exp_avg_sq, lr, betas, eps, weight_decay, step):
    """One AdamW update of ``param``, ``exp_avg``, ``exp_avg_sq`` in place, at step number ``step``."""
    beta1, beta2 = betas
    t = param.dtype.type
    scalars = [t(1 - lr * weight_decay if weight_decay else 1), t(beta1), t(1 - beta1), t(beta2), t(1 - beta2),
               t(lr / (1 - beta1 ** step)), t((1 - beta2 ** step) ** 0.5), t(eps)]
    compiled("adamw", param.dtype, _adamw)(grad, *scalars, param, exp_avg, exp_avg_sq)
