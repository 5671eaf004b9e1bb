// int4 GPTQ-layout dequantization fused with a batch-1 matrix-vector product, for sm_80 / sm_90.
//
//   y[n] = sum_k x[k] * scale[g_idx[k], n] * (code[k, n] - zero[g_idx[k], n])
//
// Layout (see quantlab/kernels/reference.py): qweight int32 (K/8, N), code of input k in word k/8
// at bits 4*(k%8); qzeros int32 (G, N/8), true zero points (v2), zero of column n at bits
// 4*(n%8) of word n/8; scales half (G, N); g_idx int32 (K). x half (K), y float (N), zeroed by
// the caller: blocks along K (split-K) add their partial sums with atomicAdd.
//
// One thread owns two adjacent output columns (one 8-byte load of two qweight words per step
// would need N even: the launcher checks N % 8 == 0). Threads of a warp read consecutive words of
// one qweight row, so every load of the weight stream is coalesced. The slice of x for the block
// is staged in shared memory as float. A thread keeps the scale and zero of its current group in
// registers and reloads them only when g_idx changes (every group_size rows without act-order).
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

constexpr int kThreads = 128;  // threads per block; each owns 2 columns -> 256 columns per block
constexpr int kMaxSlice = 4096;  // rows of K per block (x slice in shared memory: 16 KiB)

__global__ void gptq_gemv_int4(const __half* __restrict__ x, const int32_t* __restrict__ qweight,
                               const int32_t* __restrict__ qzeros, const __half* __restrict__ scales,
                               const int32_t* __restrict__ g_idx, float* __restrict__ y, int K,
                               int N, int slice) {
  __shared__ float xs[kMaxSlice];
  const int k_begin = blockIdx.y * slice;
  const int k_end = min(K, k_begin + slice);
  for (int k = k_begin + threadIdx.x; k < k_end; k += blockDim.x) {
    xs[k - k_begin] = __half2float(x[k]);
  }
  __syncthreads();
  const int n = (blockIdx.x * blockDim.x + threadIdx.x) * 2;
  if (n >= N) return;
  const int zshift = 4 * (n % 8);  // n is even, so n and n+1 share a qzeros word
  int group = -1;
  float s0 = 0.f, s1 = 0.f, z0 = 0.f, z1 = 0.f;
  float acc0 = 0.f, acc1 = 0.f;
  for (int k8 = k_begin; k8 < k_end; k8 += 8) {
    const int2 w = *reinterpret_cast<const int2*>(qweight + (size_t)(k8 / 8) * N + n);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int k = k8 + i;
      const int g = g_idx[k];
      if (g != group) {
        group = g;
        const __half2 s = *reinterpret_cast<const __half2*>(scales + (size_t)g * N + n);
        s0 = __low2float(s);
        s1 = __high2float(s);
        const uint32_t zw = (uint32_t)qzeros[(size_t)g * (N / 8) + n / 8];
        z0 = (float)((zw >> zshift) & 0xF);
        z1 = (float)((zw >> (zshift + 4)) & 0xF);
      }
      const float xv = xs[k - k_begin];
      acc0 += xv * (s0 * ((float)(((uint32_t)w.x >> (4 * i)) & 0xF) - z0));
      acc1 += xv * (s1 * ((float)(((uint32_t)w.y >> (4 * i)) & 0xF) - z1));
    }
  }
  atomicAdd(y + n, acc0);
  atomicAdd(y + n + 1, acc1);
}

}  // namespace

// Returns 0 on success, or a cudaError_t code. K % 8 == 0, N % 8 == 0 (checked by the caller).
extern "C" int quantlab_gptq_gemv_int4(const void* x, const int32_t* qweight, const int32_t* qzeros,
                                        const void* scales, const int32_t* g_idx, float* y, int K,
                                        int N, int splits, cudaStream_t stream) {
  int slice = (K + splits - 1) / splits;
  slice = (slice + 7) / 8 * 8;
  if (slice > kMaxSlice) slice = kMaxSlice;
  const dim3 grid((N / 2 + kThreads - 1) / kThreads, (K + slice - 1) / slice);
  gptq_gemv_int4<<<grid, kThreads, 0, stream>>>(
      static_cast<const __half*>(x), qweight, qzeros, static_cast<const __half*>(scales), g_idx, y,
      K, N, slice);
  return (int)cudaGetLastError();
}
