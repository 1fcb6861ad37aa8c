"""GELU with the tanh approximation (GPT-2's), forward and backward, with numpy references.

gelu(x) = 0.5 x (1 + tanh(k (x + 0.044715 x^3))), k = sqrt(2/pi). Shapes: any (flattened).
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


@kernel
def _gelu_forward_f32(out, inp):
    x_flat = inp.reshape(-1)
    o_flat = out.reshape(-1)
    k = np.float32(GELU_K)
    for i in range(x_flat.size):
        x = x_flat[i]
        th = tanh_f32(k * (x + np.float32(0.044715) * x * x * x))
        o_flat[i] = np.float32(0.5) * x * (np.float32(1.0) + th)


@kernel
def _gelu_backward_f32(dinp, inp, dout):
    x_flat = inp.reshape(-1)
    d_flat = dout.reshape(-1)
    di_flat = dinp.reshape(-1)
    k = np.float32(GELU_K)
    half = np.float32(0.5)
    one = np.float32(1.0)
    for i in range(x_flat.size):
        x = x_flat[i]
        th = tanh_f32(k * (x + np.float32(0.044715) * x * x * x))
        grad = half * (one + th) + half * x * (one - th * th) * k * (one + np.float32(3.0 * 0.044715) * x * x)
        di_flat[i] = grad * d_flat[i]


@kernel
def _gelu_forward_exact(out, inp):
    x_flat = inp.reshape(-1)
    o_flat = out.reshape(-1)
    for i in range(x_flat.size):
        x = x_flat[i]
        o_flat[i] = 0.5 * x * (1.0 + np.tanh(GELU_K * (x + 0.044715 * x * x * x)))


@kernel
def _gelu_backward_exact(dinp, inp, dout):
    x_flat = inp.reshape(-1)
    d_flat = dout.reshape(-1)
    di_flat = dinp.reshape(-1)
    for i in range(x_flat.size):
        x = x_flat[i]
        th = np.tanh(GELU_K * (x + 0.044715 * x * x * x))
        grad = 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * GELU_K * (1.0 + 3.0 * 0.044715 * x * x)
        di_flat[i] = grad * d_flat[i]


@kernel
def _gelu_forward_grad_f32(out, dgelu, inp):
    x_flat = inp.reshape(-1)
    o_flat = out.reshape(-1)
    g_flat = dgelu.reshape(-1)
    k = np.float32(GELU_K)
    half = np.float32(0.5)
    one = np.float32(1.0)
    for i in range(x_flat.size):
        x = x_flat[i]
        th = tanh_f32(k * (x + np.float32(0.044715) * x * x * x))
        o_flat[i] = half * x * (one + th)
        g_flat[i] = half * (one + th) + half * x * (one - th * th) * k * (one + np.float32(3.0 * 0.044715) * x * x)


@kernel
def _gelu_forward_grad_exact(out, dgelu, inp):
    x_flat = inp.reshape(-1)
    o_flat = out.reshape(-1)
    g_flat = dgelu.reshape(-1)
    for i in range(x_flat.size):
        x = x_flat[i]
        th = np.tanh(GELU_K * (x + 0.044715 * x * x * x))
        o_flat[i] = 0.5 * x * (1.0 + th)
        g_flat[i] = 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * GELU_K * (1.0 + 3.0 * 0.044715 * x * x)


@kernel
def mul_inplace(x, a):
    """x *= a element-wise: the GELU backward given the saved derivative a = gelu'(inp)."""
    x_flat, a_flat = x.reshape(-1), a.reshape(-1)
    for i in range(x_flat.size):
        x_flat[i] *= a_flat[i]


# gelu_forward / gelu_backward / gelu_forward_grad pick the float32 or exact version by dtype,
# from Python and, through the overloads below, from inside other kernels (resolved when those
# compile).

def gelu_forward_grad(out, dgelu, inp):
    """out = gelu(inp), dgelu = gelu'(inp); dgelu may alias inp (read before written)."""
    (_gelu_forward_grad_f32 if inp.dtype == np.float32 else _gelu_forward_grad_exact)(out, dgelu, inp)

def gelu_forward(out, inp):
    (_gelu_forward_f32 if inp.dtype == np.float32 else _gelu_forward_exact)(out, inp)


def gelu_backward(dinp, inp, dout):
    # d/dx of the forward line: 0.5 (1 + th) + 0.5 x (1 - th^2) k (1 + 3 * 0.044715 x^2).
    # dinp may alias dout (each element is read before it is written).
    (_gelu_backward_f32 if inp.dtype == np.float32 else _gelu_backward_exact)(dinp, inp, dout)


@overload(gelu_forward)
def _gelu_forward_impl(out, inp):
    f = _gelu_forward_f32 if inp.dtype == types.float32 else _gelu_forward_exact
    return lambda out, inp: f(out, inp)


@overload(gelu_backward)
def _gelu_backward_impl(dinp, inp, dout):
    f = _gelu_backward_f32 if inp.dtype == types.float32 else _gelu_backward_exact
    return lambda dinp, inp, dout: f(dinp, inp, dout)


@overload(gelu_forward_grad)
def _gelu_forward_grad_impl(out, dgelu, inp):
    f = _gelu_forward_grad_f32 if inp.dtype == types.float32 else _gelu_forward_grad_exact
    return lambda out, dgelu, inp: f(out, dgelu, inp)


def gelu_forward_ref(out, inp):
    out[...] = 0.5 * inp * (1.0 + np.tanh(GELU_K * (inp + 0.044715 * inp**3)))


def gelu_backward_ref(dinp, inp, dout):
    th = np.tanh(GELU_K * (inp + 0.044715 * inp**3))
    dinp[...] = dout * (0.5 * (1.0 + th) + 0.5 * inp * (1.0 - th * th) * GELU_K * (1.0 + 3 * 0.044715 * inp**2))


def gelu_forward_grad_ref(out, dgelu, inp):
    th = np.tanh(GELU_K * (inp + 0.044715 * inp**3))
    deriv = 0.5 * (1.0 + th) + 0.5 * inp * (1.0 - th * th) * GELU_K * (1.0 + 3 * 0.044715 * inp**2)
    out[...] = 0.5 * inp * (1.0 + th)
    dgelu[...] = deriv


def mul_inplace_ref(x, a):
    x *= a
