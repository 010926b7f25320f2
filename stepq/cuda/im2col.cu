// im2col over quantized (int8) activations, so a Conv2d runs as the W8A8 GEMM.
//
// x [B, C, H, W] int8 (quantize_act's output, q - shift, contiguous). cols [M, Kp] int8 with
// M = B*OH*OW rows (m = (b*OH + oh)*OW + ow) and K = C*KH*KW columns (k = (c*KH + i)*KW + j, the
// order of the weight's [O, C, KH, KW] rows), zero padded to Kp. A tap outside the image reads the
// quantized zero, rint(z[t]) - shift: it stands for the real 0.0 the float convolution pads with,
// so it contributes (q - z) * w = 0 to the sum.

extern "C" __global__ void im2col_s8(const s8* __restrict__ x, s8* __restrict__ cols, int B, int C, int H, int W,
                                     int KH, int KW, int OH, int OW, int stride_h, int stride_w, int pad_h,
                                     int pad_w, int dil_h, int dil_w, int Kp, const float* __restrict__ zero_point,
                                     const i64* __restrict__ index, int shift) {
    const s8 zq = (s8)((int)rintf(zero_point[table_row(index)]) - shift);
    const int K = C * KH * KW;
    const i64 total = (i64)B * OH * OW * Kp;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < total; i += (i64)gridDim.x * blockDim.x) {
        const i64 m = i / Kp;
        const int k = (int)(i - m * Kp);
        s8 v = 0;
        if (k < K) {
            const int ow = (int)(m % OW);
            const int oh = (int)((m / OW) % OH);
            const int b = (int)(m / ((i64)OW * OH));
            const int j = k % KW;
            const int ki = (k / KW) % KH;
            const int c = k / (KW * KH);
            const int h = oh * stride_h - pad_h + ki * dil_h;
            const int w = ow * stride_w - pad_w + j * dil_w;
            v = (h >= 0 && h < H && w >= 0 && w < W) ? x[(((i64)b * C + c) * H + h) * W + w] : zq;
        }
        cols[i] = v;
    }
}
