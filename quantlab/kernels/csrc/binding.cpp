// PyTorch binding of gptq_gemv.cu: checks shapes, dtypes and devices, launches on the stream
// given by Python (torch.cuda.current_stream().cuda_stream), returns y as half. It includes no
// CUDA header, so it also compiles against a CPU build of PyTorch (checked by the tests).
#include <torch/extension.h>

typedef struct CUstream_st* cudaStream_t;
extern "C" int quantlab_gptq_gemv_int4(const void* x, const int32_t* qweight, const int32_t* qzeros,
                                        const void* scales, const int32_t* g_idx, float* y, int K,
                                        int N, int splits, cudaStream_t stream);

torch::Tensor gptq_gemv_int4(torch::Tensor x, torch::Tensor qweight, torch::Tensor qzeros,
                             torch::Tensor scales, torch::Tensor g_idx, int64_t splits,
                             int64_t stream) {
  for (const auto& t : {qweight, qzeros, scales, g_idx}) {
    TORCH_CHECK(t.is_cuda() && t.device() == x.device(),
                "gptq_gemv_int4: every tensor must be on x's CUDA device");
  }
  TORCH_CHECK(x.scalar_type() == torch::kHalf && scales.scalar_type() == torch::kHalf,
              "gptq_gemv_int4: x and scales must be float16");
  TORCH_CHECK(qweight.scalar_type() == torch::kInt && qzeros.scalar_type() == torch::kInt &&
                  g_idx.scalar_type() == torch::kInt,
              "gptq_gemv_int4: qweight, qzeros and g_idx must be int32");
  const int64_t K = qweight.size(0) * 8, N = qweight.size(1);
  TORCH_CHECK(x.numel() == K, "gptq_gemv_int4: x has ", x.numel(), " values, expected ", K);
  TORCH_CHECK(N % 8 == 0, "gptq_gemv_int4: N must be a multiple of 8");
  TORCH_CHECK(g_idx.numel() == K && scales.size(1) == N && qzeros.size(1) * 8 == N &&
                  scales.size(0) == qzeros.size(0),
              "gptq_gemv_int4: g_idx / scales / qzeros do not match qweight");
  auto y = torch::zeros({N}, x.options().dtype(torch::kFloat));
  auto xc = x.contiguous(), qw = qweight.contiguous(), qz = qzeros.contiguous();
  auto sc = scales.contiguous(), gi = g_idx.contiguous();
  const int rc = quantlab_gptq_gemv_int4(xc.data_ptr(), qw.data_ptr<int32_t>(),
                                         qz.data_ptr<int32_t>(), sc.data_ptr(),
                                         gi.data_ptr<int32_t>(), y.data_ptr<float>(), (int)K,
                                         (int)N, (int)splits,
                                         reinterpret_cast<cudaStream_t>(stream));
  TORCH_CHECK(rc == 0, "gptq_gemv_int4: CUDA error ", rc);
  return y.to(torch::kHalf);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gptq_gemv_int4", &gptq_gemv_int4, "int4 GPTQ dequant + GEMV (batch 1)");
}
