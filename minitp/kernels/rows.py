"""Row-wise GPU kernels: LayerNorm, the scaled (causal) softmax and cross-entropy, forward and backward.

Each thread block takes one row (a token's h features, a query's keys, a token's vocabulary), its
``THREADS`` threads stride over the row, and the row's sums and maxima are reduced in shared memory --
one read of the row per reduction and one write of each output, where numpy makes a pass over the whole
array per operation of the formula. The formulas are the definitions' (named beside each kernel).
"""
import numpy

from minitp.kernels import compiled

THREADS = 256  # a power of two: the tree reductions halve it

_COMMON = r"""
typedef @T@ T;
#define NEG_INF (-__int_as_float(0x7f800000))
__device__ T block_sum(T value, T* shared) {
    shared[threadIdx.x] = value;
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half >>= 1) {
        if (threadIdx.x < half) shared[threadIdx.x] += shared[threadIdx.x + half];
        __syncthreads();
    }
    T total = shared[0];
    __syncthreads();  // the next reduction may overwrite shared[0]
    return total;
}
__device__ T block_max(T value, T* shared) {
    shared[threadIdx.x] = value;
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half >>= 1) {
        if (threadIdx.x < half && shared[threadIdx.x + half] > shared[threadIdx.x])
            shared[threadIdx.x] = shared[threadIdx.x + half];
        __syncthreads();
    }
    T top = shared[0];
    __syncthreads();
    return top;
}
"""

# LayerNorm (minitp.functional.normalization.LayerNorm): x_hat = (x - mean) / sqrt(var + eps),
# y = x_hat w + b; backward, d = g w: dx = (1/std)(d - mean(d) - x_hat mean(d x_hat)).
_LAYER_NORM = r"""
extern "C" __global__ void layer_norm_forward(const T* x, const T* w, const T* b, T* y, T* x_hat, T* rstd,
                                              int n, T eps) {
    __shared__ T shared[@THREADS@];
    long long row = blockIdx.x;
    const T* xr = x + row * n;
    T sum = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) sum += xr[i];
    T mean = block_sum(sum, shared) / n;
    T squares = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) { T c = xr[i] - mean; squares += c * c; }
    T r = 1 / sqrt(block_sum(squares, shared) / n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        T h = (xr[i] - mean) * r;
        x_hat[row * n + i] = h;
        y[row * n + i] = h * w[i] + b[i];
    }
    if (threadIdx.x == 0) rstd[row] = r;
}
extern "C" __global__ void layer_norm_backward(const T* g, const T* x_hat, const T* rstd, const T* w, T* dx, int n) {
    __shared__ T shared[@THREADS@];
    long long row = blockIdx.x;
    T sum_d = 0, sum_d_x_hat = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        T d = g[row * n + i] * w[i];
        sum_d += d;
        sum_d_x_hat += d * x_hat[row * n + i];
    }
    T mean_d = block_sum(sum_d, shared) / n;
    T mean_d_x_hat = block_sum(sum_d_x_hat, shared) / n;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        T d = g[row * n + i] * w[i];
        dx[row * n + i] = rstd[row] * (d - mean_d - x_hat[row * n + i] * mean_d_x_hat);
    }
}
"""

# Softmax of scale * x over each row (minitp.functional.activations.Softmax at scale 1; the dense
# attention's mul, causal mask and softmax at scale 1/sqrt(d)). Causal: row r is query r mod q_len, whose
# keys j > query + (k_len - q_len) get probability 0. Backward: dx = scale y (g - sum(g y)).
_SOFTMAX = r"""
extern "C" __global__ void softmax_forward(const T* x, T* y, int n, int q_len, int causal, T scale) {
    __shared__ T shared[@THREADS@];
    long long row = blockIdx.x;
    int keys = n;
    if (causal) { keys = (int)(row % q_len) + (n - q_len) + 1; if (keys > n) keys = n; }
    T top = NEG_INF;
    for (int i = threadIdx.x; i < keys; i += blockDim.x) { T s = x[row * n + i] * scale; if (s > top) top = s; }
    top = block_max(top, shared);
    T total = 0;
    for (int i = threadIdx.x; i < keys; i += blockDim.x) {
        T e = exp(x[row * n + i] * scale - top);
        y[row * n + i] = e;
        total += e;
    }
    total = block_sum(total, shared);
    for (int i = threadIdx.x; i < n; i += blockDim.x) y[row * n + i] = i < keys ? y[row * n + i] / total : 0;
}
extern "C" __global__ void softmax_backward(const T* y, const T* g, T* dx, int n, T scale) {
    __shared__ T shared[@THREADS@];
    long long row = blockIdx.x;
    T dot = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) dot += g[row * n + i] * y[row * n + i];
    dot = block_sum(dot, shared);
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        dx[row * n + i] = scale * y[row * n + i] * (g[row * n + i] - dot);
}
"""

# Cross-entropy forward (minitp.functional.loss.CrossEntropy): loss = log sum exp(x - m) - (x_t - m),
# and the softmax that backward turns into softmax - onehot.
_CROSS_ENTROPY = r"""
extern "C" __global__ void cross_entropy_forward(const T* x, const long long* targets, T* probs, T* losses, int n) {
    __shared__ T shared[@THREADS@];
    long long row = blockIdx.x;
    T top = NEG_INF;
    for (int i = threadIdx.x; i < n; i += blockDim.x) if (x[row * n + i] > top) top = x[row * n + i];
    top = block_max(top, shared);
    T total = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        T e = exp(x[row * n + i] - top);
        probs[row * n + i] = e;
        total += e;
    }
    total = block_sum(total, shared);
    for (int i = threadIdx.x; i < n; i += blockDim.x) probs[row * n + i] /= total;
    if (threadIdx.x == 0) losses[row] = log(total) - (x[row * n + targets[row]] - top);
}
"""


def _module(source, names):
    def build(cupy, ctype):
        code = (_COMMON + source).replace("@T@", ctype).replace("@THREADS@", str(THREADS))
        module = cupy.RawModule(code=code)
        return {name: module.get_function(name) for name in names}
    return build


def _launch(kernel, rows, *args):
    if rows:  # no rows: nothing to write
        kernel((rows,), (THREADS,), args)


def _rows(x):
    """x as contiguous (rows, n)."""
    import cupy
    x = cupy.ascontiguousarray(x)
    return x.reshape(-1, x.shape[-1])


def layer_norm_forward(x, weight, bias, eps):
    """(y, x_hat, rstd (..., 1)) of LayerNorm over x's last axis."""
    import cupy
    rows = _rows(x)
    n = rows.shape[1]
    y, x_hat = cupy.empty_like(rows), cupy.empty_like(rows)
    rstd = cupy.empty((rows.shape[0], 1), dtype=x.dtype)
    kernels = compiled("layer_norm", x.dtype, _module(_LAYER_NORM, ["layer_norm_forward", "layer_norm_backward"]))
    _launch(kernels["layer_norm_forward"], rows.shape[0], rows, cupy.ascontiguousarray(weight),
            cupy.ascontiguousarray(bias), y, x_hat, rstd, numpy.int32(n), x.dtype.type(eps))
    return y.reshape(x.shape), x_hat.reshape(x.shape), rstd.reshape(x.shape[:-1] + (1,))


def layer_norm_backward(grad, x_hat, rstd, weight):
    """dx of LayerNorm (the weight's and bias's gradients are column sums, left to the caller)."""
    import cupy
    g, h = _rows(grad), _rows(x_hat)
    dx = cupy.empty_like(g)
    kernels = compiled("layer_norm", grad.dtype, _module(_LAYER_NORM, ["layer_norm_forward", "layer_norm_backward"]))
    _launch(kernels["layer_norm_backward"], g.shape[0], g, h, cupy.ascontiguousarray(rstd),
            cupy.ascontiguousarray(weight), dx, numpy.int32(g.shape[1]))
    return dx.reshape(grad.shape)


def softmax_forward(x, scale=1.0, causal=False):
    """softmax(scale x) over the last axis; ``causal``: x is (..., q_len, k_len) scores, future keys 0."""
    import cupy
    rows = _rows(x)
    y = cupy.empty_like(rows)
    q_len = x.shape[-2] if causal else 1
    kernels = compiled("softmax", x.dtype, _module(_SOFTMAX, ["softmax_forward", "softmax_backward"]))
    _launch(kernels["softmax_forward"], rows.shape[0], rows, y, numpy.int32(rows.shape[1]), numpy.int32(q_len),
            numpy.int32(bool(causal)), x.dtype.type(scale))
    return y.reshape(x.shape)


def softmax_backward(y, grad, scale=1.0):
    """scale y (g - sum(g y)) over the last axis."""
    import cupy
    y_rows, g = _rows(y), _rows(grad)
    dx = cupy.empty_like(g)
    kernels = compiled("softmax", y.dtype, _module(_SOFTMAX, ["softmax_forward", "softmax_backward"]))
    _launch(kernels["softmax_backward"], g.shape[0], y_rows, g, dx, numpy.int32(g.shape[1]), y.dtype.type(scale))
    return dx.reshape(y.shape)


def cross_entropy_forward(logits, targets):
    """(per-token losses (...), softmax (..., v)) of logits against integer targets."""
    import cupy
    rows = _rows(logits)
    probs = cupy.empty_like(rows)
    losses = cupy.empty(rows.shape[0], dtype=logits.dtype)
    kernels = compiled("cross_entropy", logits.dtype, _module(_CROSS_ENTROPY, ["cross_entropy_forward"]))
    _launch(kernels["cross_entropy_forward"], rows.shape[0], rows,
            cupy.ascontiguousarray(targets.reshape(-1).astype(cupy.int64)), probs, losses, numpy.int32(rows.shape[1]))
    return losses.reshape(logits.shape[:-1]), probs.reshape(logits.shape)
