// Activation quantization with the scale and zero point read on the device from a timestep table.
//
//   q[r, k] = clamp(rint(x[r, k] / s[t]) + rint(z[t]), qmin, qmax) - shift      k < K
//   q[r, k] = 0                                                                 K <= k < Kp
//
// t = index[0] (index = the graph's timestep index, on the device: no host synchronisation per
// step), s / z the quantizer's tables (one float per row). The rows of q are Kp bytes (K rounded
// up to 16, zero padded) so the GEMMs can read them as aligned 32-bit words. shift = 128 stores an
// unsigned grid [0, 255] as signed bytes (q - 128); the GEMM adds the shift back through its
// zero-point correction. x / s and rint follow stepq::quantize (IEEE division, half to even).

template <typename T>
__device__ void quantize_rows(const T* __restrict__ x, s8* __restrict__ q, i64 rows, int K, int Kp,
                              const float* __restrict__ scale, const float* __restrict__ zero_point,
                              const i64* __restrict__ index, int qmin, int qmax, int shift) {
    const i64 t = table_row(index);
    const float s = scale[t];
    const float z = rintf(zero_point[t]);
    const float lo = (float)qmin, hi = (float)qmax;
    const i64 n = rows * (i64)Kp;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const i64 r = i / Kp;
        const int k = (int)(i - r * Kp);
        int v = 0;
        if (k < K) {
            float f = __fadd_rn(rintf(__fdiv_rn(load_f32(x, r * K + k), s)), z);
            f = fminf(fmaxf(f, lo), hi);
            v = (int)f - shift;
        }
        q[i] = (s8)v;
    }
}

extern "C" __global__ void quantize_act_f32(const float* x, s8* q, i64 rows, int K, int Kp, const float* scale,
                                            const float* zero_point, const i64* index, int qmin, int qmax,
                                            int shift) {
    quantize_rows(x, q, rows, K, Kp, scale, zero_point, index, qmin, qmax, shift);
}

extern "C" __global__ void quantize_act_f16(const f16* x, s8* q, i64 rows, int K, int Kp, const float* scale,
                                            const float* zero_point, const i64* index, int qmin, int qmax,
                                            int shift) {
    quantize_rows(x, q, rows, K, Kp, scale, zero_point, index, qmin, qmax, shift);
}
