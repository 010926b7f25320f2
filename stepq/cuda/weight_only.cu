// Weight-only Linear: packed low-bit weights x fp16 / fp32 activations, dequantised in registers.
//
// The weight is read in the exact layout stepq's quantize_weights stores (no repacking): one flat
// stream over the row-major [N, K] codes, element i = n*K + k, so a row need not start on a byte
// boundary (K odd, base-3 groups of 5 straddling rows):
//
//   FMT 8  int8 / uint8, one code per byte
//   FMT 4  4-bit, byte i/2, bits 4*(i%2).. (LSB first, two's complement when signed: ONNX INT4)
//   FMT 2  2-bit, byte i/4, bits 2*(i%4).. (ternary codes in 2 bits, or a 2-bit grid)
//   FMT 3  base-3 ternary, byte s = P[i/5], trit n = i%5: d = (((s*3^n) & 255)*3) >> 8, code d - 1
//          (division-free decode of s = ceil(c*256/243), see stepq/compiler/ternary_ops.py)
//
// Dequantisation as stepq::dequantize: w = (code - rint(z[g])) * s[g], g = n*sn + (gs ? k/gs : 0)
// (sn = 0 per tensor, 1 per output channel, ceil(K/gs) for groups of gs along K; any gs, the last
// group short).
//
// weight_only_gemv_*: one warp per output column n, MR activation rows per block row. Lane l owns the
// chunks c = l, l+32, l+64, ... of CH = 8 consecutive k; inside a chunk the products x*w are added in
// k order (fp32, each op rounded once), then a butterfly of shuffles (xor 16, 8, 4, 2, 1) sums the
// lanes, then the bias is added and the result rounded to the output type. emulate.py follows this
// order exactly, so kernel and emulation agree bit for bit.
// dequantize_weight_*: the dequantised [N, K] weight in the activation's type (the large-M path
// hands it to cuBLAS).

#define MR 8
#define CH 8

__device__ __constant__ int POW3[5] = {1, 3, 9, 27, 81};

template <int FMT, bool SIGNED>
__device__ __forceinline__ int code_at(const u8* __restrict__ p, i64 i) {
    if (FMT == 8) return SIGNED ? (int)(s8)p[i] : (int)p[i];
    if (FMT == 4) {
        const int c = (p[i >> 1] >> ((int)(i & 1) << 2)) & 15;
        return SIGNED ? c - ((c & 8) << 1) : c;
    }
    if (FMT == 2) {
        const int c = (p[i >> 2] >> ((int)(i & 3) << 1)) & 3;
        return SIGNED ? c - ((c & 2) << 1) : c;
    }
    const i64 b = i / 5;
    const int n = (int)(i - b * 5);
    return ((((int)p[b] * POW3[n]) & 255) * 3 >> 8) - 1;
}

template <int FMT, bool SIGNED>
__device__ __forceinline__ float weight_at(const u8* __restrict__ p, const float* __restrict__ scale,
                                           const float* __restrict__ zero_point, int n, int k, int K, int sn,
                                           int gs) {
    const int g = n * sn + (gs ? k / gs : 0);
    const float q = (float)code_at<FMT, SIGNED>(p, (i64)n * K + k);
    return __fmul_rn(__fsub_rn(q, rintf(zero_point[g])), scale[g]);
}

template <int FMT, bool SIGNED, typename T>
__device__ void wo_gemv(const T* __restrict__ x, const u8* __restrict__ p, const float* __restrict__ scale,
                        const float* __restrict__ zero_point, const float* __restrict__ bias, int M, int N, int K,
                        int sn, int gs, T* __restrict__ y) {
    const int lane = threadIdx.x & 31;
    const int n = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (n >= N) return;
    const int m0 = blockIdx.y * MR;
    float acc[MR];
#pragma unroll
    for (int r = 0; r < MR; ++r) acc[r] = 0.0f;
    for (int k0 = lane * CH; k0 < K; k0 += 32 * CH) {
#pragma unroll
        for (int j = 0; j < CH; ++j) {
            const int k = k0 + j;
            if (k < K) {
                const float w = weight_at<FMT, SIGNED>(p, scale, zero_point, n, k, K, sn, gs);
#pragma unroll
                for (int r = 0; r < MR; ++r)
                    if (m0 + r < M) acc[r] = __fadd_rn(acc[r], __fmul_rn(load_f32(x, (i64)(m0 + r) * K + k), w));
            }
        }
    }
#pragma unroll
    for (int r = 0; r < MR; ++r)
        for (int off = 16; off > 0; off >>= 1) acc[r] = __fadd_rn(acc[r], __shfl_xor_sync(FULL_MASK, acc[r], off));
    if (lane == 0) {
#pragma unroll
        for (int r = 0; r < MR; ++r)
            if (m0 + r < M) store_f32(y, (i64)(m0 + r) * N + n, bias ? __fadd_rn(acc[r], bias[n]) : acc[r]);
    }
}

template <int FMT, bool SIGNED, typename T>
__device__ void wo_dequant(const u8* __restrict__ p, const float* __restrict__ scale,
                           const float* __restrict__ zero_point, int N, int K, int sn, int gs, T* __restrict__ w) {
    const i64 total = (i64)N * K;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < total; i += (i64)gridDim.x * blockDim.x) {
        const int n = (int)(i / K);
        const int k = (int)(i - (i64)n * K);
        store_f32(w, i, weight_at<FMT, SIGNED>(p, scale, zero_point, n, k, K, sn, gs));
    }
}

#define WO_KERNELS(NAME, FMT, SIGNED)                                                                        \
    extern "C" __global__ void weight_only_gemv_##NAME##_f32(const float* x, const u8* p, const float* s,      \
                                                             const float* z, const float* bias, int M, int N,  \
                                                             int K, int sn, int gs, float* y) {               \
        wo_gemv<FMT, SIGNED>(x, p, s, z, bias, M, N, K, sn, gs, y);                                           \
    }                                                                                                         \
    extern "C" __global__ void weight_only_gemv_##NAME##_f16(const f16* x, const u8* p, const float* s,        \
                                                             const float* z, const float* bias, int M, int N,  \
                                                             int K, int sn, int gs, f16* y) {                 \
        wo_gemv<FMT, SIGNED>(x, p, s, z, bias, M, N, K, sn, gs, y);                                           \
    }                                                                                                         \
    extern "C" __global__ void dequantize_weight_##NAME##_f32(const u8* p, const float* s, const float* z,     \
                                                              int N, int K, int sn, int gs, float* w) {       \
        wo_dequant<FMT, SIGNED>(p, s, z, N, K, sn, gs, w);                                                    \
    }                                                                                                         \
    extern "C" __global__ void dequantize_weight_##NAME##_f16(const u8* p, const float* s, const float* z,     \
                                                              int N, int K, int sn, int gs, f16* w) {         \
        wo_dequant<FMT, SIGNED>(p, s, z, N, K, sn, gs, w);                                                    \
    }

WO_KERNELS(s8, 8, true)
WO_KERNELS(u8, 8, false)
WO_KERNELS(s4, 4, true)
WO_KERNELS(u4, 4, false)
WO_KERNELS(s2, 2, true)
WO_KERNELS(u2, 2, false)
WO_KERNELS(base3, 3, true)
