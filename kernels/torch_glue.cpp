// Torch glue of the CUDA backend: tensor checks, allocation and the calls to the launchers of
// kernels/launchers.h. Compiled only when the extension is built (fastvq/ops/cuda/_build.py, or
// setup.py with FASTVQ_FORCE_BUILD=1). Includes no CUDA-specific torch header: the caller passes
// the current stream as an integer handle and has made x's device current.
#include <torch/extension.h>

#include <tuple>

#include "launchers.h"

namespace {

fastvq::DType dtype_of(const torch::Tensor& t, const char* name) {
  const auto type = t.scalar_type();
  TORCH_CHECK(type == torch::kFloat32 || type == torch::kFloat16 || type == torch::kBFloat16, name,
              " must be float32, float16 or bfloat16, got ", type);
  return type == torch::kFloat32 ? fastvq::DType::kFloat32
                                 : (type == torch::kFloat16 ? fastvq::DType::kFloat16 : fastvq::DType::kBFloat16);
}

void check_cuda(const torch::Tensor& t, const char* name, const torch::Tensor& x) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == x.device(), name, " must be on ", x.device(), ", got ", t.device());
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "fastvq CUDA ", op, " failed to launch: ", cudaGetErrorString(err));
}

// x (H, N, D), codebook (Hc, K, D) of x's dtype, bias (Hc, K) fp32 -> indices (H, N, k) int64,
// distances (H, N, k) fp32.
std::tuple<torch::Tensor, torch::Tensor> search(const torch::Tensor& x, const torch::Tensor& codebook,
                                                const torch::Tensor& bias, int64_t metric, int64_t precision, int64_t k,
                                                int64_t target_blocks, int64_t stream) {
  check_cuda(codebook, "codebook", x);
  check_cuda(bias, "bias", x);
  TORCH_CHECK(x.dim() == 3 && codebook.dim() == 3 && bias.dim() == 2, "expected x (H, N, D), codebook (Hc, K, D) ",
              "and bias (Hc, K)");
  TORCH_CHECK(codebook.scalar_type() == x.scalar_type(), "codebook must have x's dtype");
  TORCH_CHECK(bias.scalar_type() == torch::kFloat32 && bias.stride(1) == 1, "bias must be fp32 with unit stride");
  const int64_t heads = x.size(0), n_tokens = x.size(1), dim = x.size(2);
  const int64_t code_heads = codebook.size(0), n_codes = codebook.size(1);
  TORCH_CHECK((code_heads == 1 || code_heads == heads) && codebook.size(2) == dim && bias.size(0) == code_heads &&
                  bias.size(1) == n_codes, "shapes do not match: x ", x.sizes(), ", codebook ", codebook.sizes(),
              ", bias ", bias.sizes());
  TORCH_CHECK(k >= 1 && k <= fastvq::kMaxTopK && k <= n_codes, "k must be in [1, min(16, K)], got ", k);
  TORCH_CHECK(precision >= 0 && precision <= 3, "precision must be 0..3, got ", precision);
  TORCH_CHECK(metric >= 0 && metric <= 2, "metric must be 0..2, got ", metric);
  fastvq::SearchArgs args{x.data_ptr(), codebook.data_ptr(), bias.data_ptr<float>(), dtype_of(x, "x"),
                          heads, n_tokens, n_codes, dim,
                          x.stride(0), x.stride(1), x.stride(2),
                          code_heads == 1 ? 0 : codebook.stride(0), codebook.stride(1), codebook.stride(2),
                          code_heads == 1 ? 0 : bias.stride(0), static_cast<int>(metric), static_cast<int>(precision),
                          static_cast<int>(k)};
  auto indices = torch::empty({heads, n_tokens, k}, x.options().dtype(torch::kInt64));
  auto distances = torch::empty({heads, n_tokens, k}, x.options().dtype(torch::kFloat32));
  if (n_tokens == 0) return {indices, distances};
  const int64_t codes_per_split = fastvq::search_codes_per_split(args, static_cast<int>(target_blocks));
  const int64_t splits = (n_codes + codes_per_split - 1) / codes_per_split;
  const int64_t list = fastvq::search_list_size(static_cast<int>(k));
  auto partial_score = torch::empty({heads, splits, n_tokens, list}, x.options().dtype(torch::kFloat32));
  auto partial_index = torch::empty({heads, splits, n_tokens, list}, x.options().dtype(torch::kInt32));
  check_launch(fastvq::launch_search(args, codes_per_split, partial_score.data_ptr<float>(),
                                     partial_index.data_ptr<int32_t>(), indices.data_ptr<int64_t>(),
                                     distances.data_ptr<float>(), reinterpret_cast<cudaStream_t>(stream)),
               "search");
  return {indices, distances};
}

// x (H, N, D), indices (H, N) int64, mask (H, N) bool or None -> counts (H, K), sums (H, K, D) fp32.
std::tuple<torch::Tensor, torch::Tensor> code_stats(const torch::Tensor& x, const torch::Tensor& indices,
                                                    const c10::optional<torch::Tensor>& mask, int64_t num_codes,
                                                    int64_t stream) {
  check_cuda(indices, "indices", x);
  TORCH_CHECK(x.dim() == 3 && indices.dim() == 2 && indices.size(0) == x.size(0) && indices.size(1) == x.size(1),
              "expected x (H, N, D) and indices (H, N), got ", x.sizes(), " and ", indices.sizes());
  TORCH_CHECK(indices.scalar_type() == torch::kInt64, "indices must be int64");
  TORCH_CHECK(num_codes >= 1, "num_codes must be >= 1");
  const uint8_t* mask_ptr = nullptr;
  int64_t mask_stride_h = 0, mask_stride_n = 0;
  if (mask.has_value()) {
    check_cuda(*mask, "mask", x);
    TORCH_CHECK(mask->scalar_type() == torch::kBool && mask->sizes() == indices.sizes(), "mask must be bool (H, N)");
    mask_ptr = reinterpret_cast<const uint8_t*>(mask->data_ptr<bool>());
    mask_stride_h = mask->stride(0);
    mask_stride_n = mask->stride(1);
  }
  const int64_t heads = x.size(0), dim = x.size(2);
  fastvq::CodeStatsArgs args{x.data_ptr(), dtype_of(x, "x"), indices.data_ptr<int64_t>(), mask_ptr,
                             heads, x.size(1), num_codes, dim,
                             x.stride(0), x.stride(1), x.stride(2), indices.stride(0), indices.stride(1),
                             mask_stride_h, mask_stride_n};
  auto counts = torch::empty({heads, num_codes}, x.options().dtype(torch::kFloat32));
  auto sums = torch::empty({heads, num_codes, dim}, x.options().dtype(torch::kFloat32));
  const auto stream_handle = reinterpret_cast<cudaStream_t>(stream);
  const auto int64 = x.options().dtype(torch::kInt64);
  auto keys = torch::empty({heads * x.size(1)}, int64);
  check_launch(fastvq::launch_code_stats_keys(args, keys.data_ptr<int64_t>(), stream_handle), "code_stats");
  const auto [sorted_keys, order] = keys.sort(/*stable=*/c10::optional<bool>(true), /*dim=*/0);
  auto run_start = torch::zeros({heads * num_codes}, int64), run_end = torch::zeros({heads * num_codes}, int64);
  auto run_chunks = torch::empty({heads * num_codes}, int64);
  check_launch(fastvq::launch_code_stats_runs(args, sorted_keys.data_ptr<int64_t>(), order.data_ptr<int64_t>(),
                                              run_start.data_ptr<int64_t>(), run_end.data_ptr<int64_t>(),
                                              run_chunks.data_ptr<int64_t>(), counts.data_ptr<float>(),
                                              sums.data_ptr<float>(), stream_handle),
               "code_stats");
  const auto chunk_end = run_chunks.cumsum(0);
  auto partial = torch::empty({fastvq::code_stats_max_chunks(args), dim}, counts.options());
  check_launch(fastvq::launch_code_stats_long_runs(args, order.data_ptr<int64_t>(), run_start.data_ptr<int64_t>(),
                                                   run_end.data_ptr<int64_t>(), run_chunks.data_ptr<int64_t>(),
                                                   chunk_end.data_ptr<int64_t>(), partial.data_ptr<float>(),
                                                   sums.data_ptr<float>(), stream_handle),
               "code_stats");
  return {counts, sums};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastvq CUDA backend (kernels/): fused nearest-code search and deterministic code_stats";
  m.def("search", &search, "nearest / top-k codes: (indices (H, N, k) int64, distances (H, N, k) fp32)");
  m.def("code_stats", &code_stats, "per-code counts (H, K) and sums (H, K, D), fp32, deterministic");
}
