"""Weight gradients added straight into node zero's sum, in sphere order, from inside a sphere's pass.

A sphere's backward hands each weight matrix's gradient to a Sink (cllmd.reduction makes them):
mode ROW writes it into the sphere's own gradient row, which node zero commits later (as every
gradient was before); mode FIRST writes it likewise into a row that is the sum itself (the
micro-step's first sphere) and then says so; mode ADD waits until every lower sphere has put
its own gradient of that matrix into the sum, then adds its own, a tile of output rows at a
time through a scratch that stays in cache (the product into the tile, the tile into the sum),
and says so. Each element of the sum thus receives fl(sum + g) for the spheres' g in sphere
order, the same additions as committing whole rows: the tiles give the whole product's bits
(tested), and MKL's own beta = 1 would not (it starts its accumulators from c: measured, most
elements differ), so the product never accumulates onto the sum itself.

Shapes: sum [P] float32 (node zero's); turns [n + 1] int64: turns[m] = the position of the next
sphere to add matrix m, turns[n] != 0 once the micro-step is aborted; info [3] int64: the
sphere's position, its mode, and the nanoseconds it waited (added to). Turns are read with
acquire and written with release (llvm atomics), so a sum published is a sum seen.
"""
import ctypes
import ctypes.util

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from ._jit import inline_kernel, kernel
from .blas import gemm_bf16

ROW, FIRST, ADD = 0, 1, 2   # Sink modes (info[1])
TILE = (1 << 20) - 1        # scratch elements: below blas.STREAMING_CLEAR_MIN, so MKL clears a
                            # tile in cache; measured per 85M sphere's 48 weight gradients (one
                            # thread): 124 ms with 2 or 4 MiB tiles, 135 with 0.5 MiB, 160 for
                            # rows written whole and committed later
WAIT_SLEEP_US = 20          # a waiting sphere sleeps this long between looks

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
# fixed aliases, as cllmd.kernels.blas does for gemm: numba's cache stays valid across processes
llvm.add_symbol("cllmd_usleep", ctypes.cast(_libc.usleep, ctypes.c_void_p).value)
llvm.add_symbol("cllmd_clock_gettime", ctypes.cast(_libc.clock_gettime, ctypes.c_void_p).value)
_usleep = types.ExternalFunction("cllmd_usleep", types.int32(types.uint32))
_clock_gettime = types.ExternalFunction("cllmd_clock_gettime", types.int32(types.int32, types.voidptr))
CLOCK_MONOTONIC = 1


@intrinsic
def load_acquire(typingctx, array, i):
    """array[i] (int64) read with acquire ordering."""
    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        return builder.load_atomic(builder.gep(ary.data, [args[1]]), "acquire", 8)
    return types.int64(array, i), codegen


@intrinsic
def store_release(typingctx, array, i, value):
    """array[i] = value (int64) written with release ordering."""
    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        builder.store_atomic(args[2], builder.gep(ary.data, [args[1]]), "release", 8)
        return context.get_dummy_value()
    return types.void(array, i, types.int64), codegen


@inline_kernel
def _now_ns(ts):
    _clock_gettime(CLOCK_MONOTONIC, ts.ctypes)
    return ts[0] * 1000000000 + ts[1]


@kernel
def wait_turn(turns, m, info):
    """Waits until matrix m is this sphere's to add (True), or the micro-step was aborted (False)."""
    position = info[0]
    n = turns.size - 1
    if load_acquire(turns, m) >= position:
        return load_acquire(turns, n) == 0
    ts = np.zeros(2, np.int64)
    t0 = _now_ns(ts)
    while load_acquire(turns, m) < position and load_acquire(turns, n) == 0:
        _usleep(WAIT_SLEEP_US)
    info[2] += _now_ns(ts) - t0
    return load_acquire(turns, n) == 0


@kernel
def publish(turns, m, info):
    """Matrix m now holds this sphere's gradient: the next sphere's turn."""
    store_release(turns, m, info[0] + 1)


@kernel
def add_tile(out, tile):
    """out += tile, element by element (the commit's addition; both flat float32)."""
    for i in range(out.size):
        out[i] += tile[i]


@kernel
def weight_grad_h(dweight, at, inp_h, dout_h, sum_, turns, info, m, tile):
    """The weight gradient inp_h^T dout_h of matrix m (inp_h [N, K], dout_h [N, M] bfloat16,
    both rows contiguous) into the sink: dweight [K, M] (the row's view, flat offset at) in
    modes ROW and FIRST, else added in turn into sum_[at : at + K M] through tile (>= M
    elements; TILE for full speed), a block of rows at a time."""
    mode = info[1]
    if mode != ADD:
        gemm_bf16(True, False, 1.0, inp_h, dout_h, 0.0, dweight)
        if mode == FIRST:
            publish(turns, m, info)
        return
    K, M = dweight.shape
    if not wait_turn(turns, m, info):
        return  # aborted: the micro-step's sum is discarded
    rows = max(1, min(K, tile.size // M))
    for r0 in range(0, K, rows):
        r1 = min(r0 + rows, K)
        t = tile[:(r1 - r0) * M].reshape((r1 - r0, M))
        gemm_bf16(True, False, 1.0, inp_h[:, r0:r1], dout_h, 0.0, t)
        add_tile(sum_[at + r0 * M:at + r1 * M], t.reshape(-1))
    publish(turns, m, info)


@kernel
def add_zero_in_turn(sum_, at, size, turns, info, m):
    """A sphere with no gradient (every position masked): sum_[at:at + size] += 0 in turn, so
    the sum's bits are those of committing its zero row (-0 becomes +0), and the turn passes."""
    mode = info[1]
    if mode == ADD:
        if not wait_turn(turns, m, info):
            return
        z = np.float32(0.0)
        for i in range(at, at + size):
            sum_[i] += z
    if mode != ROW:
        publish(turns, m, info)


def weight_grad_h_ref(inp_h, dout_h, sum_block):
    """numpy reference of one ADD: sum_block (float32 [K, M]) += the product's float32 values
    (float64 product of the bfloat16 operands, rounded once: MKL's sums differ from it in
    their order only)."""
    from .bf16 import from_bf16_ref
    p = from_bf16_ref(inp_h).astype(np.float64).T @ from_bf16_ref(dout_h).astype(np.float64)
    sum_block += p.astype(np.float32)
