// CUDA kernels for minicirc's two ops (schemas are declared in minicirc_cpu.cpp).
//
// STATUS: compile-checked with nvcc 13.0 (scripts/check_cuda_compile.sh); it has not yet run on a
// GPU. tests/test_ops.py compares it with the torch reference wherever a GPU is present.
//
// Inputs: float32, bfloat16, float16 (accumulated in float32) and float64 (in float64).
//
// sae_encode_sparse
//   relu / jumprelu: a tiled GEMM (64x64 output tile, 16-deep k-slices in shared memory) whose
//   epilogue adds b_enc, applies the activation and compacts the tile's active entries with warp
//   ballots. Two launches: the first only counts actives per (row, 64-feature tile), a scan turns
//   the counts into write offsets, the second recomputes the tile and writes. The offsets follow
//   (row, tile) order, so every row comes out sorted by feature id with no atomics, and only the
//   (N, n_features/64) counts ever reach global memory, never the pre-activations. The price is
//   computing the GEMM twice.
//   topk: one block owns 16 rows and sweeps all feature tiles, keeping per row a candidate buffer
//   in shared memory (positive values above the row's running k-th largest); when it would
//   overflow, a warp bitonic sort cuts it back to k. Output goes to (N, k) scratch, then to rows.
// feature_attribution
//   count the union per row (and validate the rows), scan, write the merged ids and deltas (one
//   thread per row), then one warp per entry computes g_x[n] . W_dec[i] with coalesced loads.
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <torch/csrc/stable/c/shim.h>

#include "minicirc_checks.h"
#include "minicirc_rows.h"

#include <cub/device/device_scan.cuh>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <string>

namespace minicirc {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

#define MINICIRC_CUDA_CHECK(expr)                                                   \
  do {                                                                              \
    cudaError_t err_ = (expr);                                                      \
    STD_TORCH_CHECK(err_ == cudaSuccess, "CUDA error: ", cudaGetErrorString(err_)); \
  } while (0)

// ----------------------------------------------------------------------------- dtype plumbing

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_acc(typename Acc<T>::type v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }

// Calls f with a null pointer of the CUDA type matching `st` (the stable ABI has no
// AT_DISPATCH for device types, and the c10 half types are not needed here).
template <typename F>
void dispatch_float(ScalarType st, const char* name, F f) {
  switch (st) {
    case ScalarType::Float: return f(static_cast<float*>(nullptr));
    case ScalarType::Double: return f(static_cast<double*>(nullptr));
    case ScalarType::BFloat16: return f(static_cast<__nv_bfloat16*>(nullptr));
    case ScalarType::Half: return f(static_cast<__half*>(nullptr));
    default: STD_TORCH_CHECK(false, name, ": unsupported dtype on CUDA");
  }
}

cudaStream_t current_stream(const Tensor& t) {
  void* s = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(t.get_device_index(), &s));
  return static_cast<cudaStream_t>(s);
}

Tensor empty_on(const Tensor& like, std::initializer_list<int64_t> size, ScalarType st) {
  return torch::stable::empty(torch::headeronly::IntHeaderOnlyArrayRef(size), st, std::nullopt, like.device());
}

template <typename T>
const T* cptr(const Tensor& t) { return static_cast<const T*>(t.const_data_ptr()); }
template <typename T>
T* mptr(const Tensor& t) { return static_cast<T*>(t.mutable_data_ptr()); }

// out[i] = sum(in[0..i)) for i < n (exclusive scan); int64 throughout.
void exclusive_scan(const Tensor& like, const int64_t* in, int64_t* out, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  size_t bytes = 0;
  MINICIRC_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, bytes, in, out, n, stream));
  Tensor tmp = empty_on(like, {int64_t(bytes) + 1}, ScalarType::Byte);
  MINICIRC_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(tmp.mutable_data_ptr(), bytes, in, out, n, stream));
}

int64_t read_scalar(const int64_t* dev, cudaStream_t stream) {
  int64_t host = 0;
  MINICIRC_CUDA_CHECK(cudaMemcpyAsync(&host, dev, sizeof(int64_t), cudaMemcpyDeviceToHost, stream));
  MINICIRC_CUDA_CHECK(cudaStreamSynchronize(stream));
  return host;
}

// ----------------------------------------------------------------------------- GEMM tile

constexpr int kBN = 64, kBK = 16, kThreads = 256;

enum class Act { ReLU, JumpReLU, Raw };

// Computes the BM x 64 tile pre[m0.., n0..] = (x - b_dec) @ W_enc + b_enc, activated, into Ts
// (shared, row stride kBN + 1); entries outside the matrix are 0. Thread (ty, tx) of a 16 x 16
// grid owns rows ty + 16 i and columns tx + 16 j, so shared reads are broadcasts or consecutive.
template <typename T, int BM, Act ACT>
__device__ void compute_tile(const T* __restrict__ x, const T* __restrict__ W, const T* __restrict__ b_enc,
                             const T* __restrict__ b_dec, const T* __restrict__ theta, int64_t N, int64_t d,
                             int64_t S, int64_t m0, int64_t n0, typename Acc<T>::type* As,
                             typename Acc<T>::type* Bs, typename Acc<T>::type* Ts) {
  using A = typename Acc<T>::type;
  constexpr int RM = BM / 16;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  A acc[RM][4] = {};
  for (int64_t k0 = 0; k0 < d; k0 += kBK) {
    for (int e = tid; e < BM * kBK; e += kThreads) {  // As[kk][row], padded against bank conflicts
      const int row = e / kBK, kk = e % kBK;
      const int64_t m = m0 + row, kg = k0 + kk;
      As[kk * (BM + 1) + row] = (m < N && kg < d) ? to_acc(x[m * d + kg]) - to_acc(b_dec[kg]) : A(0);
    }
    for (int e = tid; e < kBK * kBN; e += kThreads) {
      const int kk = e / kBN, col = e % kBN;
      const int64_t kg = k0 + kk, n = n0 + col;
      Bs[kk * kBN + col] = (kg < d && n < S) ? to_acc(W[kg * S + n]) : A(0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      A a[RM], b[4];
#pragma unroll
      for (int i = 0; i < RM; ++i) a[i] = As[kk * (BM + 1) + ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = Bs[kk * kBN + tx + 16 * j];
#pragma unroll
      for (int i = 0; i < RM; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
    }
    __syncthreads();
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t n = n0 + tx + 16 * j;
    const A be = n < S ? to_acc(b_enc[n]) : A(0);
    const A th = (ACT == Act::JumpReLU && n < S) ? to_acc(theta[n]) : A(0);
#pragma unroll
    for (int i = 0; i < RM; ++i) {
      const int64_t m = m0 + ty + 16 * i;
      A v = acc[i][j] + be;
      if (ACT == Act::ReLU) v = v > A(0) ? v : A(0);
      if (ACT == Act::JumpReLU) v = v > th ? v : A(0);  // strict; f = pre where pre > theta
      if (ACT == Act::Raw) v = v > A(0) ? v : A(0);     // top-k only ever keeps positives
      Ts[(ty + 16 * i) * (kBN + 1) + tx + 16 * j] = (m < N && n < S) ? v : A(0);
    }
  }
  __syncthreads();
}

template <typename A, int BM>
struct TileSmem {
  // The k-slices and the output tile are never live at once, so they share storage.
  static constexpr int kSlices = kBK * (BM + 1) + kBK * kBN;
  static constexpr int kTile = BM * (kBN + 1);
  static constexpr int kElems = kSlices > kTile ? kSlices : kTile;
};

// COUNT: counts[m * n_tiles + tile] = actives in the tile's part of row m.
// WRITE: writes them at offsets[m * n_tiles + tile] in feature order.
template <typename T, Act ACT, bool WRITE>
__global__ void __launch_bounds__(kThreads) encode_tile_kernel(
    const T* __restrict__ x, const T* __restrict__ W, const T* __restrict__ b_enc, const T* __restrict__ b_dec,
    const T* __restrict__ theta, int64_t N, int64_t d, int64_t S, int64_t n_tiles, int64_t* __restrict__ counts,
    const int64_t* __restrict__ offsets, int64_t* __restrict__ out_col, T* __restrict__ out_val) {
  using A = typename Acc<T>::type;
  constexpr int BM = 64;
  __shared__ A smem[TileSmem<A, BM>::kElems];
  const int64_t tile = blockIdx.x, m0 = int64_t(blockIdx.y) * BM, n0 = tile * kBN;
  compute_tile<T, BM, ACT>(x, W, b_enc, b_dec, theta, N, d, S, m0, n0, smem, smem + kBK * (BM + 1), smem);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const unsigned lt = (1u << lane) - 1;
  for (int r = warp; r < BM; r += kThreads / 32) {
    const int64_t m = m0 + r;
    if (m >= N) break;
    int64_t pos = WRITE ? offsets[m * n_tiles + tile] : 0;
#pragma unroll
    for (int h = 0; h < kBN / 32; ++h) {
      const A v = smem[r * (kBN + 1) + h * 32 + lane];
      const unsigned mask = __ballot_sync(0xffffffffu, v != A(0));
      if (WRITE && v != A(0)) {
        const int64_t o = pos + __popc(mask & lt);
        out_col[o] = n0 + h * 32 + lane;
        out_val[o] = from_acc<T>(v);
      }
      pos += __popc(mask);
    }
    if (!WRITE && lane == 0) counts[m * n_tiles + tile] = pos;
  }
}

__global__ void tile_offsets_to_crow(const int64_t* counts, const int64_t* offsets, int64_t N, int64_t n_tiles,
                                     int64_t* crow) {
  const int64_t n = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n < N) crow[n] = offsets[n * n_tiles];
  if (n == N) crow[N] = N * n_tiles > 0 ? offsets[N * n_tiles - 1] + counts[N * n_tiles - 1] : 0;
}

// ----------------------------------------------------------------------------- top-k

constexpr int kTopkRows = 16;  // rows per block; 8 warps x 2 rows
constexpr int kTopkMaxK = 192;  // keeps the candidate buffers within 64 KB of shared memory

template <typename A>
struct Cand {
  A val;
  int idx;
};

// Sorts buf[0..cap) (cap a power of two) within one warp. ByVal: descending value, then
// ascending id (deterministic on ties); otherwise ascending id.
template <typename A, bool ByVal>
__device__ void warp_bitonic_sort(Cand<A>* buf, int cap, int lane) {
  for (int size = 2; size <= cap; size <<= 1) {
    for (int stride = size / 2; stride > 0; stride >>= 1) {
      for (int t = lane; t < cap / 2; t += 32) {
        const int i = 2 * stride * (t / stride) + (t % stride), l = i + stride;
        const Cand<A> a = buf[i], b = buf[l];
        const bool b_first = ByVal ? (b.val > a.val || (b.val == a.val && b.idx < a.idx)) : b.idx < a.idx;
        const bool a_first = ByVal ? (a.val > b.val || (a.val == b.val && a.idx < b.idx)) : a.idx < b.idx;
        if ((i & size) == 0 ? b_first : a_first) buf[i] = b, buf[l] = a;
      }
      __syncwarp();
    }
  }
}

// Keeps the k best of buf[0..cnt): sorts by value, pads the rest with sentinels.
template <typename A>
__device__ void shrink_to_k(Cand<A>* buf, int cap, int& cnt, int k, int lane) {
  for (int i = cnt + lane; i < cap; i += 32) buf[i] = Cand<A>{A(-1), INT_MAX};
  __syncwarp();
  warp_bitonic_sort<A, true>(buf, cap, lane);
  cnt = cnt < k ? cnt : k;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) encode_topk_kernel(
    const T* __restrict__ x, const T* __restrict__ W, const T* __restrict__ b_enc, const T* __restrict__ b_dec,
    int64_t N, int64_t d, int64_t S, int k, int cap, T* __restrict__ pad_val, int64_t* __restrict__ pad_idx,
    int64_t* __restrict__ row_count) {
  using A = typename Acc<T>::type;
  constexpr int BM = kTopkRows, kRowsPerWarp = BM / (kThreads / 32);
  __shared__ A smem[TileSmem<A, BM>::kElems];
  extern __shared__ unsigned char dyn[];
  Cand<A>* cands = reinterpret_cast<Cand<A>*>(dyn);  // BM buffers of `cap` entries
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t m0 = int64_t(blockIdx.x) * BM;
  // Warp-uniform per-row state: entries in the buffer, and the value a candidate must beat
  // (0 until k positives were seen, since top-k then relu never keeps a non-positive value).
  int cnt[kRowsPerWarp] = {};
  A thr[kRowsPerWarp] = {};
  for (int64_t n0 = 0; n0 < S; n0 += kBN) {
    compute_tile<T, BM, Act::Raw>(x, W, b_enc, b_dec, nullptr, N, d, S, m0, n0, smem, smem + kBK * (BM + 1), smem);
    for (int q = 0; q < kRowsPerWarp; ++q) {
      const int r = warp * kRowsPerWarp + q;
      Cand<A>* buf = cands + r * cap;
#pragma unroll
      for (int h = 0; h < kBN / 32; ++h) {
        const A v = smem[r * (kBN + 1) + h * 32 + lane];
        unsigned mask = __ballot_sync(0xffffffffu, v > thr[q]);
        if (cnt[q] + __popc(mask) > cap) {  // never true after a shrink: cap >= k + 32
          shrink_to_k(buf, cap, cnt[q], k, lane);
          if (cnt[q] == k) thr[q] = buf[k - 1].val;
          mask = __ballot_sync(0xffffffffu, v > thr[q]);
        }
        if (v > thr[q]) buf[cnt[q] + __popc(mask & ((1u << lane) - 1))] = Cand<A>{v, int(n0 + h * 32 + lane)};
        cnt[q] += __popc(mask);
        __syncwarp();
      }
    }
    __syncthreads();  // the next tile overwrites smem
  }
  for (int q = 0; q < kRowsPerWarp; ++q) {
    const int r = warp * kRowsPerWarp + q;
    const int64_t m = m0 + r;
    if (m >= N) break;
    Cand<A>* buf = cands + r * cap;
    shrink_to_k(buf, cap, cnt[q], k, lane);
    for (int i = cnt[q] + lane; i < cap; i += 32) buf[i].idx = INT_MAX;  // drop all but the k best
    __syncwarp();
    warp_bitonic_sort<A, false>(buf, cap, lane);  // rows come out sorted by feature id
    for (int i = lane; i < cnt[q]; i += 32) {
      pad_val[m * k + i] = from_acc<T>(buf[i].val);
      pad_idx[m * k + i] = buf[i].idx;
    }
    if (lane == 0) row_count[m] = cnt[q];
  }
}

template <typename T>
__global__ void padded_to_rows(const T* pad_val, const int64_t* pad_idx, const int64_t* crow, int64_t N, int k,
                               int64_t* col, T* val) {
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= N * k) return;
  const int64_t n = e / k, j = e % k;
  if (j < crow[n + 1] - crow[n]) {
    col[crow[n] + j] = pad_idx[e];
    val[crow[n] + j] = pad_val[e];
  }
}

// ----------------------------------------------------------------------------- encode host

template <typename T>
std::tuple<Tensor, Tensor, Tensor> encode_cuda_impl(const Tensor& x, const Tensor& W, const Tensor& b_enc,
                                                    const Tensor& b_dec, const Tensor* theta, Kind kind, int64_t k) {
  using A = typename Acc<T>::type;
  const int64_t N = x.size(0), d = x.size(1), S = W.size(1);
  cudaStream_t stream = current_stream(x);
  const T *xp = cptr<T>(x), *wp = cptr<T>(W), *bep = cptr<T>(b_enc), *bdp = cptr<T>(b_dec);
  const T* thp = theta ? cptr<T>(*theta) : nullptr;
  Tensor crow = empty_on(x, {N + 1}, ScalarType::Long);
  int64_t* crp = mptr<int64_t>(crow);
  const auto empty_result = [&]() {
    MINICIRC_CUDA_CHECK(cudaMemsetAsync(crp, 0, (N + 1) * sizeof(int64_t), stream));
    return std::make_tuple(crow, empty_on(x, {0}, ScalarType::Long), empty_on(x, {0}, x.scalar_type()));
  };

  if (kind == Kind::TopK) {
    const int kk = int(std::min<int64_t>(k, S));
    if (N == 0 || kk == 0) return empty_result();
    int cap = 64;
    while (cap < kk + kBN) cap <<= 1;
    const size_t dyn = size_t(kTopkRows) * cap * sizeof(Cand<A>);
    auto kernel = encode_topk_kernel<T>;
    MINICIRC_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(dyn)));
    Tensor pad_val = empty_on(x, {N, kk}, x.scalar_type());
    Tensor pad_idx = empty_on(x, {N, kk}, ScalarType::Long);
    Tensor count = empty_on(x, {N + 1}, ScalarType::Long);  // count[N] stays 0: scan gives crow[N]
    int64_t* cnp = mptr<int64_t>(count);
    MINICIRC_CUDA_CHECK(cudaMemsetAsync(cnp, 0, (N + 1) * sizeof(int64_t), stream));
    const unsigned blocks = unsigned((N + kTopkRows - 1) / kTopkRows);
    kernel<<<blocks, kThreads, dyn, stream>>>(xp, wp, bep, bdp, N, d, S, kk, cap, mptr<T>(pad_val),
                                              mptr<int64_t>(pad_idx), cnp);
    MINICIRC_CUDA_CHECK(cudaGetLastError());
    exclusive_scan(x, cnp, crp, N + 1, stream);
    const int64_t nnz = read_scalar(crp + N, stream);
    Tensor col = empty_on(x, {nnz}, ScalarType::Long);
    Tensor val = empty_on(x, {nnz}, x.scalar_type());
    const int64_t total = N * kk;
    padded_to_rows<T><<<unsigned((total + 255) / 256), 256, 0, stream>>>(
        cptr<T>(pad_val), cptr<int64_t>(pad_idx), crp, N, kk, mptr<int64_t>(col), mptr<T>(val));
    MINICIRC_CUDA_CHECK(cudaGetLastError());
    return {crow, col, val};
  }

  if (N == 0 || S == 0) return empty_result();
  const int64_t n_tiles = (S + kBN - 1) / kBN, L = N * n_tiles;
  Tensor counts = empty_on(x, {L}, ScalarType::Long);
  Tensor offsets = empty_on(x, {L}, ScalarType::Long);
  const dim3 grid(unsigned(n_tiles), unsigned((N + 63) / 64));
  STD_TORCH_CHECK((N + 63) / 64 <= 65535, "sae_encode_sparse (CUDA): at most 4194240 rows per call");
  int64_t *cp = mptr<int64_t>(counts), *op = mptr<int64_t>(offsets);
  const auto launch = [&](auto write, int64_t* col, T* val) {
    constexpr bool W_ = decltype(write)::value;
    if (kind == Kind::ReLU)
      encode_tile_kernel<T, Act::ReLU, W_><<<grid, kThreads, 0, stream>>>(xp, wp, bep, bdp, thp, N, d, S, n_tiles, cp, op, col, val);
    else
      encode_tile_kernel<T, Act::JumpReLU, W_><<<grid, kThreads, 0, stream>>>(xp, wp, bep, bdp, thp, N, d, S, n_tiles, cp, op, col, val);
    MINICIRC_CUDA_CHECK(cudaGetLastError());
  };
  launch(std::false_type{}, nullptr, nullptr);
  exclusive_scan(x, cp, op, L, stream);
  tile_offsets_to_crow<<<unsigned((N + 1 + 255) / 256), 256, 0, stream>>>(cp, op, N, n_tiles, crp);
  MINICIRC_CUDA_CHECK(cudaGetLastError());
  const int64_t nnz = read_scalar(crp + N, stream);
  Tensor col = empty_on(x, {nnz}, ScalarType::Long);
  Tensor val = empty_on(x, {nnz}, x.scalar_type());
  if (nnz > 0) launch(std::true_type{}, mptr<int64_t>(col), mptr<T>(val));
  return {crow, col, val};
}

void check_cuda_device(const Tensor& t, const Tensor& x, const char* name) {
  STD_TORCH_CHECK(t.is_cuda() && t.get_device_index() == x.get_device_index(), name, " must be on the CUDA device of x (g_x)");
}

std::tuple<Tensor, Tensor, Tensor> sae_encode_sparse_cuda(const Tensor& x_, const Tensor& W_enc_,
                                                          const Tensor& b_enc_, const Tensor& b_dec_,
                                                          std::string kind_, std::optional<Tensor> threshold,
                                                          int64_t k) {
  const Kind kind = check_encode_args(x_, W_enc_, b_enc_, b_dec_, kind_, threshold, k);
  const int64_t S = W_enc_.size(1);
  STD_TORCH_CHECK(kind != Kind::TopK || std::min<int64_t>(k, S) <= kTopkMaxK,
                  "sae_encode_sparse (CUDA): topk needs 0 <= k <= ", kTopkMaxK);
  STD_TORCH_CHECK(S < INT_MAX, "sae_encode_sparse (CUDA): n_features must fit in int32");
  for (const auto* t : {&W_enc_, &b_enc_, &b_dec_}) check_cuda_device(*t, x_, "W_enc/b_enc/b_dec");
  if (kind == Kind::JumpReLU) check_cuda_device(*threshold, x_, "threshold");
  torch::stable::accelerator::DeviceGuard guard(x_.get_device_index());
  const Tensor x = torch::stable::contiguous(x_), W = torch::stable::contiguous(W_enc_),
               be = torch::stable::contiguous(b_enc_), bd = torch::stable::contiguous(b_dec_);
  std::optional<Tensor> th;
  if (kind == Kind::JumpReLU) th = torch::stable::contiguous(*threshold);
  std::tuple<Tensor, Tensor, Tensor> out{x, x, x};
  dispatch_float(x.scalar_type(), "sae_encode_sparse", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    out = encode_cuda_impl<T>(x, W, be, bd, th ? &*th : nullptr, kind, k);
  });
  return out;
}

// ----------------------------------------------------------------------------- attribution

// Flags: 1 bad crow, 2 bad column ids. Bad rows are skipped so no out-of-range read happens.
__device__ bool row_range_ok(const int64_t* crow, int64_t n, int64_t nnz) {
  return crow[n] >= 0 && crow[n] <= crow[n + 1] && crow[n + 1] <= nnz;
}

__global__ void union_count_kernel(const int64_t* cc, const int64_t* ci, int64_t c_nnz, const int64_t* pc,
                                   const int64_t* pi, int64_t p_nnz, int64_t N, int64_t F, int64_t* count,
                                   int* flag) {
  const int64_t n = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n == 0 && (cc[0] != 0 || cc[N] != c_nnz || pc[0] != 0 || pc[N] != p_nnz)) atomicOr(flag, 1);
  if (n >= N) return;
  count[n] = 0;
  if (!row_range_ok(cc, n, c_nnz) || !row_range_ok(pc, n, p_nnz)) {
    atomicOr(flag, 1);
    return;
  }
  const int64_t cnt = union_size(cc, ci, pc, pi, n, F);
  if (cnt < 0) atomicOr(flag, 2);
  count[n] = cnt;
}

template <typename T>
__global__ void union_write_kernel(const int64_t* cc, const int64_t* ci, const T* cv, const int64_t* pc,
                                   const int64_t* pi, const T* pv, int64_t N, int64_t F, const int64_t* crow,
                                   int64_t* out_col, typename Acc<T>::type* delta) {
  using A = typename Acc<T>::type;
  const int64_t n = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= N) return;
  int64_t o = crow[n];
  merge_rows(cc, ci, pc, pi, n, F, [&](int64_t c, int64_t ia, int64_t ib) {
    out_col[o] = c;
    delta[o++] = (ib >= 0 ? to_acc(pv[ib]) : A(0)) - (ia >= 0 ? to_acc(cv[ia]) : A(0));
  });
}

// One warp per entry: the row of g_x and the decoder row are read with coalesced lane strides.
template <typename T>
__global__ void entry_dot_kernel(const T* __restrict__ g, const T* __restrict__ W, const int64_t* __restrict__ crow,
                                 const int64_t* __restrict__ col, const typename Acc<T>::type* __restrict__ delta,
                                 int64_t N, int64_t d, int64_t nnz, T* __restrict__ out) {
  using A = typename Acc<T>::type;
  const int lane = threadIdx.x % 32;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / 32);
  for (int64_t e = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32; e < nnz; e += warps) {
    int64_t lo = 0, hi = N;  // the row n with crow[n] <= e < crow[n + 1]
    while (hi - lo > 1) {
      const int64_t mid = (lo + hi) / 2;
      if (crow[mid] <= e) lo = mid; else hi = mid;
    }
    const T *gn = g + lo * d, *wi = W + col[e] * d;
    A acc = 0;
    for (int64_t j = lane; j < d; j += 32) acc += to_acc(gn[j]) * to_acc(wi[j]);
#pragma unroll
    for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) out[e] = from_acc<T>(acc * delta[e]);
  }
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor> attribution_cuda_impl(const Tensor& g, const Tensor& W, const Tensor& cc,
                                                         const Tensor& ci, const Tensor& cv, const Tensor& pc,
                                                         const Tensor& pi, const Tensor& pv) {
  using A = typename Acc<T>::type;
  const int64_t N = g.size(0), d = g.size(1), F = W.size(0);
  cudaStream_t stream = current_stream(g);
  Tensor crow = empty_on(g, {N + 1}, ScalarType::Long);
  Tensor count = empty_on(g, {N + 1}, ScalarType::Long);
  Tensor flag = empty_on(g, {1}, ScalarType::Int);
  int64_t *crp = mptr<int64_t>(crow), *cnp = mptr<int64_t>(count);
  MINICIRC_CUDA_CHECK(cudaMemsetAsync(cnp, 0, (N + 1) * sizeof(int64_t), stream));
  MINICIRC_CUDA_CHECK(cudaMemsetAsync(mptr<int>(flag), 0, sizeof(int), stream));
  const unsigned row_blocks = unsigned((N + 1 + 255) / 256);
  union_count_kernel<<<row_blocks, 256, 0, stream>>>(cptr<int64_t>(cc), cptr<int64_t>(ci), ci.size(0),
                                                     cptr<int64_t>(pc), cptr<int64_t>(pi), pi.size(0), N, F, cnp,
                                                     mptr<int>(flag));
  MINICIRC_CUDA_CHECK(cudaGetLastError());
  int host_flag = 0;
  MINICIRC_CUDA_CHECK(cudaMemcpyAsync(&host_flag, mptr<int>(flag), sizeof(int), cudaMemcpyDeviceToHost, stream));
  MINICIRC_CUDA_CHECK(cudaStreamSynchronize(stream));
  STD_TORCH_CHECK(!(host_flag & 1), "feature_attribution: crow must be non-decreasing and run from 0 to nnz");
  STD_TORCH_CHECK(!(host_flag & 2), "feature_attribution: column ids must lie in [0, n_features) and increase strictly within each row");
  exclusive_scan(g, cnp, crp, N + 1, stream);  // count[N] is 0, so crow[N] is the total
  const int64_t nnz = read_scalar(crp + N, stream);
  Tensor col = empty_on(g, {nnz}, ScalarType::Long);
  Tensor val = empty_on(g, {nnz}, g.scalar_type());
  if (nnz == 0) return {crow, col, val};
  Tensor delta = empty_on(g, {nnz}, sizeof(A) == 8 ? ScalarType::Double : ScalarType::Float);
  union_write_kernel<T><<<row_blocks, 256, 0, stream>>>(cptr<int64_t>(cc), cptr<int64_t>(ci), cptr<T>(cv),
                                                        cptr<int64_t>(pc), cptr<int64_t>(pi), cptr<T>(pv), N, F,
                                                        crp, mptr<int64_t>(col), mptr<A>(delta));
  MINICIRC_CUDA_CHECK(cudaGetLastError());
  const int64_t blocks = std::min<int64_t>((nnz + 7) / 8, 65535 * 8);
  entry_dot_kernel<T><<<unsigned(blocks), 256, 0, stream>>>(cptr<T>(g), cptr<T>(W), crp, cptr<int64_t>(col),
                                                            cptr<A>(delta), N, d, nnz, mptr<T>(val));
  MINICIRC_CUDA_CHECK(cudaGetLastError());
  return {crow, col, val};
}

std::tuple<Tensor, Tensor, Tensor> feature_attribution_cuda(
    const Tensor& g_x, const Tensor& W_dec, const Tensor& clean_crow, const Tensor& clean_col,
    const Tensor& clean_val, const Tensor& patch_crow, const Tensor& patch_col, const Tensor& patch_val) {
  check_attribution_args(g_x, W_dec, clean_crow, clean_col, clean_val, patch_crow, patch_col, patch_val);
  check_cuda_device(W_dec, g_x, "W_dec");
  check_cuda_device(clean_val, g_x, "clean_val");
  check_cuda_device(patch_val, g_x, "patch_val");
  for (const auto* t : {&clean_crow, &clean_col, &patch_crow, &patch_col}) check_cuda_device(*t, g_x, "crow/col");
  torch::stable::accelerator::DeviceGuard guard(g_x.get_device_index());
  const auto c = [](const Tensor& t) { return torch::stable::contiguous(t); };
  std::tuple<Tensor, Tensor, Tensor> out{g_x, g_x, g_x};
  dispatch_float(g_x.scalar_type(), "feature_attribution", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    out = attribution_cuda_impl<T>(c(g_x), c(W_dec), c(clean_crow), c(clean_col), c(clean_val), c(patch_crow),
                                   c(patch_col), c(patch_val));
  });
  return out;
}

STABLE_TORCH_LIBRARY_IMPL(minicirc, CUDA, m) {
  m.impl("sae_encode_sparse", TORCH_BOX(&sae_encode_sparse_cuda));
  m.impl("feature_attribution", TORCH_BOX(&feature_attribution_cuda));
}

}  // namespace minicirc
