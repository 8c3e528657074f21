// Argument checks shared by minicirc_cpu.cpp and minicirc_cuda.cu: shapes, index dtypes, k and
// that the float inputs share one dtype - everything that reads only tensor metadata and holds
// on every device. Each backend keeps its own limits (supported dtypes, devices, CUDA's top-k
// bound) and the checks that read index data (crow values, column ids).
//
// Header-only LibTorch stable ABI (no Python.h, no ATen/c10): it keeps minicirc._C within
// Py_LIMITED_API and TORCH_TARGET_VERSION, and it compiles as host code under nvcc.
#pragma once

#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <cstdint>
#include <optional>
#include <string>

namespace minicirc {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

enum class Kind { ReLU = 0, JumpReLU = 1, TopK = 2 };

inline Kind parse_kind(const std::string& kind) {
  const bool known = kind == "relu" || kind == "jumprelu" || kind == "topk";
  STD_TORCH_CHECK(known, "sae_encode_sparse: unknown kind '", kind, "' (relu, jumprelu, topk)");
  return kind == "relu" ? Kind::ReLU : kind == "jumprelu" ? Kind::JumpReLU : Kind::TopK;
}

inline void check_same_dtype(const Tensor& t, ScalarType st, const char* name) {
  STD_TORCH_CHECK(t.scalar_type() == st, name, " must have the dtype of the other float inputs");
}

// sae_encode_sparse(x, W_enc, b_enc, b_dec, kind, threshold, k): returns the parsed kind.
inline Kind check_encode_args(const Tensor& x, const Tensor& W_enc, const Tensor& b_enc, const Tensor& b_dec,
                              const std::string& kind_name, const std::optional<Tensor>& threshold, int64_t k) {
  const Kind kind = parse_kind(kind_name);
  STD_TORCH_CHECK(x.dim() == 2 && W_enc.dim() == 2, "sae_encode_sparse: x (N, d) and W_enc (d, S)");
  STD_TORCH_CHECK(W_enc.size(0) == x.size(1), "sae_encode_sparse: W_enc must be (d_in, n_features)");
  const int64_t S = W_enc.size(1);
  STD_TORCH_CHECK(b_enc.dim() == 1 && b_enc.size(0) == S, "sae_encode_sparse: b_enc must be (n_features,)");
  STD_TORCH_CHECK(b_dec.dim() == 1 && b_dec.size(0) == x.size(1), "sae_encode_sparse: b_dec must be (d_in,)");
  STD_TORCH_CHECK(kind != Kind::JumpReLU || threshold.has_value(), "sae_encode_sparse: jumprelu needs threshold");
  STD_TORCH_CHECK(kind != Kind::TopK || k >= 0, "sae_encode_sparse: k must be >= 0");
  const ScalarType st = x.scalar_type();
  check_same_dtype(W_enc, st, "W_enc");
  check_same_dtype(b_enc, st, "b_enc");
  check_same_dtype(b_dec, st, "b_dec");
  if (kind == Kind::JumpReLU) {
    STD_TORCH_CHECK(threshold->dim() == 1 && threshold->size(0) == S,
                    "sae_encode_sparse: threshold must be (n_features,)");
    check_same_dtype(*threshold, st, "threshold");
  }
  return kind;
}

// One side (clean or patch) of feature_attribution: shapes and dtypes only; the crow values
// and column ids are validated by each backend where the data lives.
inline void check_rows_args(const Tensor& crow, const Tensor& col, const Tensor& val, int64_t N, ScalarType st,
                            const char* which, const char* val_name) {
  STD_TORCH_CHECK(crow.dim() == 1 && crow.size(0) == N + 1, "feature_attribution: ", which, " crow must be (N+1,)");
  STD_TORCH_CHECK(crow.scalar_type() == ScalarType::Long && col.scalar_type() == ScalarType::Long,
                  "feature_attribution: ", which, " crow/col must be int64");
  STD_TORCH_CHECK(col.dim() == 1 && val.dim() == 1 && col.size(0) == val.size(0),
                  "feature_attribution: ", which, " col and val must be 1-D of equal length");
  check_same_dtype(val, st, val_name);
}

// feature_attribution(g_x, W_dec, clean_crow, clean_col, clean_val, patch_crow, patch_col, patch_val).
inline void check_attribution_args(const Tensor& g_x, const Tensor& W_dec, const Tensor& clean_crow,
                                   const Tensor& clean_col, const Tensor& clean_val, const Tensor& patch_crow,
                                   const Tensor& patch_col, const Tensor& patch_val) {
  STD_TORCH_CHECK(g_x.dim() == 2 && W_dec.dim() == 2 && W_dec.size(1) == g_x.size(1),
                  "feature_attribution: g_x (N, d) and W_dec (n_features, d)");
  const ScalarType st = g_x.scalar_type();
  check_same_dtype(W_dec, st, "W_dec");
  const int64_t N = g_x.size(0);
  check_rows_args(clean_crow, clean_col, clean_val, N, st, "clean", "clean_val");
  check_rows_args(patch_crow, patch_col, patch_val, N, st, "patch", "patch_val");
}

}  // namespace minicirc
