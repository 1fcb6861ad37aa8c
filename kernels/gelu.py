"""GELU with the tanh approximation (GPT-2's), forward and backward, with numpy references.

gelu(x) = 0.5 x (1 + tanh(k (x + 0.044715 x^3))), k = sqrt(2/pi). Shapes: any (flattened).
The formula and its derivative are written once (_gelu_and_derivative), for the working dtype
and a tanh; the kernels loop over it and the references apply it to whole arrays.
float32 evaluates tanh with a rational approximation (|error| < 4e-7, about 3 ulp) because it
vectorizes where libm's tanhf does not (~8x faster); float64, used for gradient checks, is exact.
gelu_forward_grad also returns gelu'(x), sharing the one tanh: the model keeps the derivative
instead of the pre-activation, and its backward is then one multiplication (the tanh is the
costly part, and the backward would otherwise evaluate it a second time).
"""
import math

import numpy as np
from numba import types
from numba.extending import overload

from ._jit import kernel
from .bf16 import bf16_of

GELU_K = math.sqrt(2.0 / math.pi)


@kernel
def tanh_f32(x):
    """tanh for float32 as a [13/6] minimax rational function on [-7.9053, 7.9053] (Eigen's)."""
    x = min(max(x, np.float32(-7.90531110763549805)), np.float32(7.90531110763549805))
    x2 = x * x
    p = np.float32(-2.76076847742355e-16)
    p = p * x2 + np.float32(2.00018790482477e-13)
    p = p * x2 + np.float32(-8.60467152213735e-11)
    p = p * x2 + np.float32(5.12229709037114e-08)
    p = p * x2 + np.float32(1.48572235717979e-05)
    p = p * x2 + np.float32(6.37261928875436e-04)
    p = p * x2 + np.float32(4.89352455891786e-03)
    q = np.float32(1.19825839466702e-06)
    q = q * x2 + np.float32(1.18534705686654e-04)
    q = q * x2 + np.float32(2.26843463243900e-03)
    q = q * x2 + np.float32(4.89352518554385e-03)
    return x * p / q


def _gelu_and_derivative(dt, tanh):
    """The formula, once: x -> (gelu(x), gelu'(x)) with constants of dtype dt (so float32 stays
    float32 inside kernels) and the given tanh; x a scalar in a kernel or an array in numpy."""
    k, a, three_a, half, one = dt(GELU_K), dt(0.044715), dt(3.0 * 0.044715), dt(0.5), dt(1.0)

    def gelu_and_derivative(x):
        th = tanh(k * (x + a * x * x * x))
        # d/dx: 0.5 (1 + th) + 0.5 x (1 - th^2) k (1 + 3 * 0.044715 x^2)
        return half * x * (one + th), half * (one + th) + half * x * (one - th * th) * k * (one + three_a * x * x)

    return gelu_and_derivative


def gelu_scalar(x):
    """(gelu(x), gelu'(x)) of one element, inside kernels (float32: the rational tanh)."""
    raise NotImplementedError("gelu_scalar runs inside numba kernels only")


@overload(gelu_scalar, inline="always")
def _gelu_scalar_impl(x):
    if x == types.float32:
        return _gelu_and_derivative(np.float32, tanh_f32)
    return _gelu_and_derivative(np.float64, np.tanh)


@kernel
def gelu_forward(out, inp):
    x_flat, o_flat = inp.reshape(-1), out.reshape(-1)
    for i in range(x_flat.size):
        o_flat[i] = gelu_scalar(x_flat[i])[0]


@kernel
def gelu_backward(dinp, inp, dout):
    # dinp may alias dout (each element is read before it is written)
    x_flat, d_flat, di_flat = inp.reshape(-1), dout.reshape(-1), dinp.reshape(-1)
    for i in range(x_flat.size):
        di_flat[i] = gelu_scalar(x_flat[i])[1] * d_flat[i]


@kernel
def gelu_forward_grad(out, dgelu, inp):
    """out = gelu(inp), dgelu = gelu'(inp); dgelu may alias inp (read before written)."""
    x_flat, o_flat, g_flat = inp.reshape(-1), out.reshape(-1), dgelu.reshape(-1)
    for i in range(x_flat.size):
        g, d = gelu_scalar(x_flat[i])
        o_flat[i] = g
        g_flat[i] = d


@kernel
def gelu_forward_grad_h(out_h, dgelu, inp):
    """gelu_forward_grad for the trainer's bfloat16 products: out_h (uint16) receives gelu(inp)
    rounded to bfloat16 (nearest even), the only form its consumer (a product) reads; dgelu =
    gelu'(inp) in float32. float32 inp only."""
    x_flat, o_flat, g_flat = inp.reshape(-1), out_h.reshape(-1), dgelu.reshape(-1)
    for i in range(x_flat.size):
        g, d = gelu_scalar(x_flat[i])
        o_flat[i] = bf16_of(g)
        g_flat[i] = d


@kernel
def gelu_backward_h(dinp_h, dbias, dout, dgelu):
    """The GELU backward fused with what follows it in the trainer's bfloat16 pass: d pre =
    dout * dgelu (dgelu = gelu'(pre), saved by the forward), rounded into dinp_h [N, M]
    (uint16) for the products, and summed over rows into dbias [M] (the preceding layer's bias
    gradient, =, float32, rows in order). dout, dgelu [N, M] float32."""
    N, M = dout.shape
    dbias[:] = 0.0
    for n in range(N):
        d, g, h = dout[n], dgelu[n], dinp_h[n]
        if n == 0:
            for j in range(M):
                x = d[j] * g[j]
                h[j] = bf16_of(x)
                dbias[j] = x
        else:
            for j in range(M):
                x = d[j] * g[j]
                h[j] = bf16_of(x)
                dbias[j] += x


@kernel
def mul_inplace(x, a):
    """x *= a element-wise: the GELU backward given the saved derivative a = gelu'(inp)."""
    x_flat, a_flat = x.reshape(-1), a.reshape(-1)
    for i in range(x_flat.size):
        x_flat[i] *= a_flat[i]


def _gelu_ref(inp):
    return _gelu_and_derivative(inp.dtype.type, np.tanh)(inp)


def gelu_forward_ref(out, inp):
    out[...] = _gelu_ref(inp)[0]


def gelu_backward_ref(dinp, inp, dout):
    dinp[...] = dout * _gelu_ref(inp)[1]


def gelu_forward_grad_ref(out, dgelu, inp):
    out[...], dgelu[...] = _gelu_ref(inp)


def mul_inplace_ref(x, a):
    x *= a
