// Compressed rows ("rows", as minicirc/rows.py): crow int64 (N+1,), col int64 (nnz,), val (nnz,). Row n
// holds the features active on token n (f != 0), column ids strictly increasing.
//
// The walk over the union of two rows that feature_attribution's CPU kernel (minicirc_cpu.cpp) and CUDA
// kernels (minicirc_cuda.cu) share, written once. Plain C++ with no torch header: g++ compiles it as host
// code, nvcc as host and device code.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MINICIRC_HOST_DEVICE __host__ __device__
#else
#define MINICIRC_HOST_DEVICE
#endif

namespace minicirc {

// Walks row n of two row sets a and b (crow, col) in increasing id over the union of their ids, calling
// emit(c, ia, ib) with ia (ib) the index of id c in a's (b's) col and val, or -1 where that row lacks c.
// Returns false on an id outside [0, F) or not increasing, instead of throwing: it runs inside
// parallel_for, where exceptions must not cross the C shim, and in CUDA kernels. crow values must
// already be known to lie within col.
template <typename Emit>
MINICIRC_HOST_DEVICE inline bool merge_rows(const int64_t* a_crow, const int64_t* a_col, const int64_t* b_crow,
                                            const int64_t* b_col, int64_t n, int64_t F, Emit emit) {
  const int64_t a_end = a_crow[n + 1], b_end = b_crow[n + 1];
  int64_t i = a_crow[n], j = b_crow[n], last = -1;
  while (i < a_end || j < b_end) {
    const int64_t ca = i < a_end ? a_col[i] : F, cb = j < b_end ? b_col[j] : F;
    const int64_t c = ca < cb ? ca : cb;
    if (c < 0 || c >= F || c <= last) return false;
    emit(c, ca == c ? i : -1, cb == c ? j : -1);
    i += ca == c;
    j += cb == c;
    last = c;
  }
  return true;
}

// How many ids the union of row n of a and b holds (the row's length in feature_attribution's output),
// or -1 where merge_rows finds a bad id.
MINICIRC_HOST_DEVICE inline int64_t union_size(const int64_t* a_crow, const int64_t* a_col, const int64_t* b_crow,
                                               const int64_t* b_col, int64_t n, int64_t F) {
  int64_t count = 0;
  const bool ok = merge_rows(a_crow, a_col, b_crow, b_col, n, F, [&](int64_t, int64_t, int64_t) { ++count; });
  return ok ? count : -1;
}

}  // namespace minicirc
