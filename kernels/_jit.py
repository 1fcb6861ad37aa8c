"""The one numba decorator every kernel uses.

cache=True keeps compiled code across processes; nogil=True lets the sphere threads run
kernels in parallel; fastmath stays off (it broke GELU in llm.c's history).
"""
import numba

kernel = numba.njit(cache=True, nogil=True, error_model="numpy")

# Small scalar helpers called inside kernel loops: inlined at numba's IR level so LLVM sees
# straight-line code it can vectorize (left to its own heuristics it may keep the call).
inline_kernel = numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")

# 'reassoc' lets LLVM vectorize a sum by splitting it into partial sums: nothing but the order
# of additions changes (no approximations, no finite-math assumptions), but the order is then
# LLVM's, and it differed between a kernel compiled fresh (inlined into a caller) and loaded
# from the cache. Training kernels sum in vecmath's fixed lane order instead (row_sum,
# row_dot_centered, row_dot); this is left to the prompt pass's softmax (kvattention's gemm way).
reduction_kernel = numba.njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc", "nsz"})
