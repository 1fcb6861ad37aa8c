"""Weight gradients added straight into node zero's sum, in sphere order, from inside a sphere's pass.

A sphere's backward hands each weight matrix's gradient to a sink (cllmd.reduction makes them):
mode ROW writes it into the sphere's own gradient row, which node zero commits later (as every
gradient was before); mode FIRST writes it likewise into a row that is the sum itself (the
micro-step's first sphere) and then says so; mode ADD waits until every lower sphere has put
its own gradient of that matrix into the sum, then adds its own, a tile of output rows at a
time through a scratch that stays in cache (the product into the tile, the tile into the sum),
and says so. Each element of the sum thus receives fl(sum + g) for the spheres' g in sphere
order, the same additions as committing whole rows: the tiles give the whole product's bits
(tested), and MKL's own beta = 1 would not (it starts its accumulators from c: measured, most
elements differ), so the product never accumulates onto the sum itself.

A sphere in mode ADD waits for its turn at most about as long as its own product takes (on a
loaded machine the lower sphere's thread may be off the CPU for long): then it writes the
matrix into its row, as mode ROW, and adds it from there once the turn comes (flush_deferred:
after each later matrix, at the end of its pass, or else at its commit, where the turn has
come), the same additions.

Shapes: sum [P] float32 (node zero's); ranges [n, 2] (start, stop) in sum of the n sink
matrices; turns [n + 1] int64: turns[m] = the position of the next sphere to add matrix m,
turns[n] != 0 once the micro-step is aborted; info [4 + n] int64: the sphere's position, its
mode, the nanoseconds it waited (added to), the matrices it deferred (counted), then per
matrix PENDING, DEFERRED or ADDED. Turns are read with acquire and written with release (llvm
atomics), so a sum published is a sum seen.
"""
import ctypes
import ctypes.util

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from . import blas
from ._jit import inline_kernel, kernel
from .blas import aligned_u16, gemm_bf16, gemm_bf16_packed, pack_bf16

ROW, FIRST, ADD = 0, 1, 2   # sink modes (info[1])
PENDING, DEFERRED, ADDED = 0, 1, 2  # a matrix's state in info[4 + m] (mode ADD)
INFO = 4                    # info's fields before the per-matrix states
TILE = (1 << 20) - 1        # scratch elements: below blas.STREAMING_CLEAR_MIN, so MKL clears a
                            # tile in cache; measured per 85M sphere's 48 weight gradients (one
                            # thread): 124 ms with 2 or 4 MiB tiles, 135 with 0.5 MiB, 160 for
                            # rows written whole and committed later
WAIT_SLEEP_US = 20          # a waiting sphere sleeps this long between looks
DEFER_FLOPS_PER_NS = 500    # and defers the matrix to its row after about the time of its own
DEFER_MIN_NS = 50_000       # product at 500 GFLOP/s (a lower sphere that runs is done with it
                            # by then: 2.4 ms for 85M's 768 x 3072 gradient), at least 50 us

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
def wait_turn(turns, m, info, limit_ns):
    """Waits until matrix m is this sphere's to add (1), the micro-step was aborted (0), or
    limit_ns nanoseconds passed (-1; limit_ns < 0: no limit)."""
    position = info[0]
    n = turns.size - 1
    if load_acquire(turns, m) >= position:
        return 1 if load_acquire(turns, n) == 0 else 0
    ts = np.zeros(2, np.int64)
    t0 = _now_ns(ts)
    t = t0
    while load_acquire(turns, m) < position and load_acquire(turns, n) == 0:
        if 0 <= limit_ns < t - t0:
            break
        _usleep(WAIT_SLEEP_US)
        t = _now_ns(ts)
    info[2] += _now_ns(ts) - t0
    if load_acquire(turns, n) != 0:
        return 0
    return 1 if load_acquire(turns, m) >= position else -1


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
def flush_deferred(row, sum_, turns, info, ranges):
    """Adds the matrices this sphere deferred to its row whose turn has come (each in turn:
    sum_ += row over its range) and passes the turn on; returns how many are still waiting."""
    left = 0
    if info[1] != ADD or info[3] == 0 or load_acquire(turns, turns.size - 1) != 0:
        return left
    for k in range(ranges.shape[0]):
        if info[INFO + k] != DEFERRED:
            continue
        if load_acquire(turns, k) < info[0]:
            left += 1
            continue
        add_tile(sum_[ranges[k, 0]:ranges[k, 1]], row[ranges[k, 0]:ranges[k, 1]])
        info[INFO + k] = ADDED
        publish(turns, k, info)
    return left


@kernel
def tile_rows(K, M, tile_size):
    """Rows of a [K, M] weight gradient that one tile of tile_size elements takes."""
    return max(1, min(K, tile_size // M))


def tile_pack_size(K: int, M: int, N: int, tile_size: int = TILE) -> int:
    """uint16 elements of the tile_p scratch weight_grad_h packs an [N, M] gradient into for a
    [K, M] weight gradient (64-byte alignment included)."""
    return blas.pack_bf16_size(int(tile_rows(K, M, tile_size)), M, N) + blas.PACK_ALIGN


@kernel
def weight_grad_h(row, at, K, M, inp_h, dout_h, sum_, turns, info, ranges, m, tile, tile_p):
    """The weight gradient inp_h^T dout_h [K, M] of sink matrix m (inp_h [N, K], dout_h
    [N, M] bfloat16, rows contiguous) at flat offset at: into row in modes ROW and FIRST, else
    added in turn into sum_ through tile (>= M elements; TILE for full speed), a block of
    rows at a time, or deferred to row when the turn is late (see the module). tile_p: uint16
    scratch of at least tile_pack_size(K, M, N) elements, or empty: dout_h is then packed into
    it once (blas.pack_bf16) for the blocks' products, which otherwise each repack it (the same
    bits; measured per 85M layer 9.6 -> 8.3 ms for the four gradients)."""
    mode = info[1]
    dweight = row[at:at + K * M].reshape((K, M))
    if mode != ADD:
        gemm_bf16(True, False, 1.0, inp_h, dout_h, 0.0, dweight)
        if mode == FIRST:
            publish(turns, m, info)
        return
    flush_deferred(row, sum_, turns, info, ranges)
    turn = wait_turn(turns, m, info, max(DEFER_MIN_NS, 2 * inp_h.shape[0] * K * M // DEFER_FLOPS_PER_NS))
    if turn == 0:
        return  # aborted: the micro-step's sum is discarded
    if turn < 0:
        gemm_bf16(True, False, 1.0, inp_h, dout_h, 0.0, dweight)
        info[INFO + m] = DEFERRED
        info[3] += 1
        return
    rows = tile_rows(K, M, tile.size)
    packed = aligned_u16(tile_p)
    if tile_p.size:
        pack_bf16(packed, rows, False, dout_h)
    for r0 in range(0, K, rows):
        r1 = min(r0 + rows, K)
        t = tile[:(r1 - r0) * M].reshape((r1 - r0, M))
        if tile_p.size:
            gemm_bf16_packed(True, 1.0, inp_h[:, r0:r1], packed, 0.0, t)
        else:
            gemm_bf16(True, False, 1.0, inp_h[:, r0:r1], dout_h, 0.0, t)
        add_tile(sum_[at + r0 * M:at + r1 * M], t.reshape(-1))
    info[INFO + m] = ADDED
    publish(turns, m, info)


@kernel
def add_zero_in_turn(sum_, at, size, turns, info, m):
    """A sphere with no gradient (every position masked): sum_[at:at + size] += 0 in turn, so
    the sum's bits are those of committing its zero row (-0 becomes +0), and the turn passes."""
    mode = info[1]
    if mode == ADD:
        if wait_turn(turns, m, info, -1) != 1:
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
