// W8A8 Linear: int8 activations x int8 weights -> int32, fused per-channel scale, bias, fp16/fp32 out.
//
// A [M, Kp] int8: the quantized activation as quantize_act writes it (q - shift, rows zero padded to
// Kp, a multiple of 16). B [Np, Kp] int8: the weight, symmetric per output channel, rows zero
// padded (Np >= N). rowsum[n] = sum_k B[n, k]. With z = rint(zero_point[t]):
//
//   acc[m, n]  = sum_k A[m, k] * B[n, k]                                (exact int32)
//   accz[m, n] = acc[m, n] + (shift - z) * rowsum[n]  = sum_k (q[m, k] - z) * B[n, k]
//   y[m, n]    = float(accz) * (s_x[t] * s_w[n]) (+ bias[n])            (each op rounded once, fp32)
//
// w8a8_gemv_dp4a: one warp per output column n and MR rows per block row; the lanes stride K in
// 32-bit words (4 int8 each, dp4a) and a butterfly of shuffles sums them. Integer sums do not depend
// on the order, so any M is exact; it reads the weight once per MR rows (the small-batch path).
// w8a8_epilogue: the same epilogue over an int32 product computed elsewhere (the large-M path:
// cuBLASLt's int8 tensor-core GEMM through torch._int_mm, then this kernel).

#define MR 8

template <typename T>
__device__ __forceinline__ void w8a8_store(T* y, i64 m, int n, int N, int accz, float sxw, const float* bias) {
    float v = __fmul_rn(__int2float_rn(accz), sxw);
    if (bias) v = __fadd_rn(v, bias[n]);
    store_f32(y, m * N + n, v);
}

template <typename T>
__device__ void w8a8_gemv(const int* __restrict__ A, const int* __restrict__ B, const int* __restrict__ rowsum,
                          const float* __restrict__ w_scale, const float* __restrict__ bias,
                          const float* __restrict__ a_scale, const float* __restrict__ a_zero_point,
                          const i64* __restrict__ index, int shift, int M, int N, int Kw, T* __restrict__ y) {
    const int lane = threadIdx.x & 31;
    const int n = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (n >= N) return;  // the whole warp leaves together
    const int m0 = blockIdx.y * MR;
    int acc[MR];
#pragma unroll
    for (int r = 0; r < MR; ++r) acc[r] = 0;
    const int* b_row = B + (i64)n * Kw;
    for (int w = lane; w < Kw; w += 32) {
        const int b = b_row[w];
#pragma unroll
        for (int r = 0; r < MR; ++r)
            if (m0 + r < M) acc[r] = dp4a_s8(A[(i64)(m0 + r) * Kw + w], b, acc[r]);
    }
#pragma unroll
    for (int r = 0; r < MR; ++r)
        for (int off = 16; off > 0; off >>= 1) acc[r] += __shfl_xor_sync(FULL_MASK, acc[r], off);
    if (lane == 0) {
        const i64 t = table_row(index);
        const int corr = (shift - (int)rintf(a_zero_point[t])) * rowsum[n];
        const float sxw = __fmul_rn(a_scale[t], w_scale[n]);
#pragma unroll
        for (int r = 0; r < MR; ++r)
            if (m0 + r < M) w8a8_store(y, m0 + r, n, N, acc[r] + corr, sxw, bias);
    }
}

template <typename T>
__device__ void w8a8_epi(const int* __restrict__ acc, int ld, const int* __restrict__ rowsum,
                         const float* __restrict__ w_scale, const float* __restrict__ bias,
                         const float* __restrict__ a_scale, const float* __restrict__ a_zero_point,
                         const i64* __restrict__ index, int shift, int M, int N, T* __restrict__ y) {
    const i64 t = table_row(index);
    const int zc = shift - (int)rintf(a_zero_point[t]);
    const float sx = a_scale[t];
    const i64 total = (i64)M * N;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < total; i += (i64)gridDim.x * blockDim.x) {
        const i64 m = i / N;
        const int n = (int)(i - m * N);
        w8a8_store(y, m, n, N, acc[m * ld + n] + zc * rowsum[n], __fmul_rn(sx, w_scale[n]), bias);
    }
}

#define W8A8_ARGS const int *A, const int *B, const int *rowsum, const float *w_scale, const float *bias, \
    const float *a_scale, const float *a_zero_point, const i64 *index, int shift, int M, int N, int Kw
extern "C" __global__ void w8a8_gemv_dp4a_f32(W8A8_ARGS, float* y) {
    w8a8_gemv(A, B, rowsum, w_scale, bias, a_scale, a_zero_point, index, shift, M, N, Kw, y);
}
extern "C" __global__ void w8a8_gemv_dp4a_f16(W8A8_ARGS, f16* y) {
    w8a8_gemv(A, B, rowsum, w_scale, bias, a_scale, a_zero_point, index, shift, M, N, Kw, y);
}

#define EPI_ARGS const int *acc, int ld, const int *rowsum, const float *w_scale, const float *bias, \
    const float *a_scale, const float *a_zero_point, const i64 *index, int shift, int M, int N
extern "C" __global__ void w8a8_epilogue_f32(EPI_ARGS, float* y) {
    w8a8_epi(acc, ld, rowsum, w_scale, bias, a_scale, a_zero_point, index, shift, M, N, y);
}
extern "C" __global__ void w8a8_epilogue_f16(EPI_ARGS, f16* y) {
    w8a8_epi(acc, ld, rowsum, w_scale, bias, a_scale, a_zero_point, index, shift, M, N, y);
}
