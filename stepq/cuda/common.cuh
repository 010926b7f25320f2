// stepq CUDA kernels: shared definitions (prepended to every .cu by stepq.cuda.source).
//
// No header is included, so the sources compile with any NVRTC (bundled headers or not) and with
// nvcc. fp16 is carried as its 16 raw bits (unsigned short) and converted with PTX cvt; every
// floating-point operation the CPU emulation (stepq/cuda/emulate.py) mirrors is written with an
// explicit round-to-nearest intrinsic (__fmul_rn, __fadd_rn, __fdiv_rn), which the compiler never
// contracts into an FMA, so a kernel and its emulation round identically.

typedef signed char s8;
typedef unsigned char u8;
typedef unsigned short f16;  // IEEE binary16, raw bits
typedef long long i64;

#define FULL_MASK 0xffffffffu

__device__ __forceinline__ float h2f(f16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ f16 f2h(float f) {
    f16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ float load_f32(const float* p, i64 i) { return p[i]; }
__device__ __forceinline__ float load_f32(const f16* p, i64 i) { return h2f(p[i]); }
__device__ __forceinline__ void store_f32(float* p, i64 i, float v) { p[i] = v; }
__device__ __forceinline__ void store_f32(f16* p, i64 i, float v) { p[i] = f2h(v); }

// d = c + a.x*b.x + a.y*b.y + a.z*b.z + a.w*b.w over the four signed bytes of a and b
__device__ __forceinline__ int dp4a_s8(int a, int b, int c) {
    int d;
    asm("dp4a.s32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

// The activation quantizer's row of the timestep table: index[0] (the batch shares its first
// timestep, as in the ONNX backend), or row 0 of a static quantizer (index == nullptr).
__device__ __forceinline__ i64 table_row(const i64* index) { return index ? index[0] : 0; }
