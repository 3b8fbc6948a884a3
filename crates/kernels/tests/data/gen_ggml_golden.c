// Generates ggml_golden.bin: outputs of the real ggml CPU backend (x86, AVX2 + FMA + F16C build) for
// inputs that tests/ggml_golden.rs regenerates with the same PRNG. Build against a llama.cpp build's
// shared libraries (built with -march=native, GCC), e.g.:
//
//   gcc -O2 -ffp-contract=off gen_ggml_golden.c -o gen -L$LIB -lggml-cpu -lggml-base -Wl,-rpath,$LIB
//   ./gen ggml_golden.bin
//
// or against the static libraries of scripts/peer/build-llama-cpp.sh ($EDGEPROMPT_HOME/peer/build):
//
//   B=$EDGEPROMPT_HOME/peer/build/ggml/src
//   gcc -O2 -ffp-contract=off gen_ggml_golden.c -o gen $B/libggml-cpu.a $B/libggml-base.a -lstdc++ -lgomp -lm
//
// The generator itself is compiled with -ffp-contract=off so its input arithmetic (exact products by
// constants) matches the Rust side bit for bit.
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

void ggml_cpu_init(void);
void quantize_row_q8_0(const float *x, void *y, int64_t k);
void quantize_row_q8_1(const float *x, void *y, int64_t k);
void ggml_vec_dot_q4_0_q8_0(int n, float *s, size_t bs, const void *x, size_t bx, const void *y, size_t by, int nrc);
void ggml_vec_dot_q4_1_q8_1(int n, float *s, size_t bs, const void *x, size_t bx, const void *y, size_t by, int nrc);
void ggml_vec_dot_q5_0_q8_0(int n, float *s, size_t bs, const void *x, size_t bx, const void *y, size_t by, int nrc);
void ggml_vec_dot_q5_1_q8_1(int n, float *s, size_t bs, const void *x, size_t bx, const void *y, size_t by, int nrc);
void dequantize_row_q5_0(const void *x, float *y, int64_t k);
void dequantize_row_q5_1(const void *x, float *y, int64_t k);
void ggml_vec_dot_q8_0_q8_0(int n, float *s, size_t bs, const void *x, size_t bx, const void *y, size_t by, int nrc);
void ggml_vec_dot_f16(int n, float *s, size_t bs, uint16_t *x, size_t bx, uint16_t *y, size_t by, int nrc);
void ggml_vec_dot_bf16(int n, float *s, size_t bs, uint16_t *x, size_t bx, uint16_t *y, size_t by, int nrc);
void ggml_vec_dot_f32(int n, float *s, size_t bs, const float *x, size_t bx, const float *y, size_t by, int nrc);
void ggml_cpu_fp32_to_fp16(const float *x, uint16_t *y, int64_t n);
void ggml_cpu_fp32_to_bf16(const float *x, uint16_t *y, int64_t n);
void dequantize_row_q4_0(const void *x, float *y, int64_t k);
void dequantize_row_q4_1(const void *x, float *y, int64_t k);
void dequantize_row_q8_0(const void *x, float *y, int64_t k);

// ---- PRNG and inputs: mirrored in tests/ggml_golden.rs ----
static uint64_t rng_state;
static uint64_t next_u64(void) {
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static uint32_t below(uint32_t n) { return (uint32_t)(next_u64() % n); }
// uniform in [-1, 1), exactly k * 2^-23
static float unit(void) { return (float)((int32_t)(next_u64() >> 40) - (1 << 23)) * (1.0f / 8388608.0f); }

static const float SCALES[] = {1.0f, 0.01f, 3.7f, 100.0f, 1e-4f, 65504.0f, 1e-20f, 0.5f};

static float special(void) {
    switch (below(4)) {
    case 0: return NAN;
    case 1: return INFINITY;
    case 2: return -INFINITY;
    default: return 1e-37f;
    }
}

// Fills x[0..n) block by block (32 at a time, the last block may be partial).
static void gen_activations(float *x, int n, int allow_special) {
    for (int b = 0; b * 32 < n; b++) {
        int lo = b * 32, hi = lo + 32 < n ? lo + 32 : n;
        uint32_t kind = below(16);
        if (kind == 0) {                      // zeros
            for (int i = lo; i < hi; i++) x[i] = 0.0f;
        } else if (kind == 1) {               // ties: amax 127 -> id 1, values k + 0.5
            for (int i = lo; i < hi; i++) x[i] = (float)((int)below(254) - 127) + 0.5f;
            x[lo] = 127.0f;
        } else if (kind == 2) {               // ties: amax 63.5 -> id 2, values k/2 + 0.25
            for (int i = lo; i < hi; i++) x[i] = (float)((int)below(254) - 127) * 0.5f + 0.25f;
            x[lo] = -63.5f;
        } else if (kind == 3) {               // one outlier
            for (int i = lo; i < hi; i++) x[i] = unit() * 0.01f;
            uint32_t at = below(hi - lo);
            x[lo + at] = 50.0f;
        } else if (kind == 4) {               // tiny amax: 127/amax overflows to inf in f32
            for (int i = lo; i < hi; i++) x[i] = unit() * 1e-37f;
            x[lo] = 2e-37f;
        } else if (kind == 5 && allow_special) {
            for (int i = lo; i < hi; i++) x[i] = unit();
            uint32_t at = below(hi - lo);
            x[lo + at] = special();
        } else {
            float s = SCALES[below(8)];  // one PRNG call per statement below, in order
            for (int i = lo; i < hi; i++) x[i] = unit() * s;
        }
    }
}

// (every PRNG call is its own statement: C leaves the order of operand evaluation unspecified)
static uint16_t rand_f16_bits(void) {  // normal, |v| in [2^-10, 2^6)
    uint32_t sign = below(2);
    uint32_t exp = 5 + below(16);
    uint32_t man = below(1024);
    return (uint16_t)((sign << 15) | (exp << 10) | man);
}
static uint16_t rand_bf16_bits(void) {  // normal, |v| in [2^-10, 2^6)
    uint32_t sign = below(2);
    uint32_t exp = 117 + below(16);
    uint32_t man = below(128);
    return (uint16_t)((sign << 15) | (exp << 7) | man);
}
static void gen_weights_q(uint8_t *w, int nb, int bs, int nscales) {
    for (int b = 0; b < nb; b++) {
        uint8_t *p = w + b * bs;
        for (int s = 0; s < nscales; s++) {
            uint16_t h = rand_f16_bits();
            memcpy(p + 2 * s, &h, 2);
        }
        for (int i = 2 * nscales; i < bs; i++) p[i] = (uint8_t)below(256);
    }
}

// ---- output ----
static FILE *out;
static void put(const void *p, size_t n) { fwrite(p, 1, n, out); }
static void put_u32(uint32_t v) { put(&v, 4); }

enum { K_Q4_0 = 1, K_Q4_1 = 2, K_Q8_0 = 3, K_F16 = 4, K_BF16 = 5, K_F32 = 6, K_DQ4_0 = 7, K_DQ4_1 = 8, K_DQ8_0 = 9,
       K_Q5_0 = 10, K_Q5_1 = 11, K_DQ5_0 = 12, K_DQ5_1 = 13 };

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: %s out.bin\n", argv[0]); return 2; }
    ggml_cpu_init();
    out = fopen(argv[1], "wb");
    if (!out) return 1;
    rng_state = 0x45444745504D5054ull;  // "EDGEPMPT"
    const int CASES = 30;
    put(&"EPG1", 4);
    static float x[32 * 64];
    static uint8_t w[36 * 64], a[36 * 64];
    static uint16_t wh[32 * 64], ah[32 * 64];
    static float wf[32 * 64];
    float s;

    // Quantised dots: weights random, activations quantised by ggml.
    for (int kind = K_Q4_0; kind <= K_Q8_0; kind++) {
        for (int c = 0; c < CASES; c++) {
            int nb = 1 + (int)below(12), n = nb * 32;
            gen_activations(x, n, 1);
            put_u32(kind); put_u32(n);
            if (kind == K_Q4_0) {
                gen_weights_q(w, nb, 18, 1);
                quantize_row_q8_0(x, a, n);
                ggml_vec_dot_q4_0_q8_0(n, &s, 0, w, 0, a, 0, 1);
                put(a, nb * 34);
            } else if (kind == K_Q4_1) {
                gen_weights_q(w, nb, 20, 2);
                quantize_row_q8_1(x, a, n);
                ggml_vec_dot_q4_1_q8_1(n, &s, 0, w, 0, a, 0, 1);
                put(a, nb * 36);
            } else {
                gen_weights_q(w, nb, 34, 1);
                quantize_row_q8_0(x, a, n);
                ggml_vec_dot_q8_0_q8_0(n, &s, 0, w, 0, a, 0, 1);
                put(a, nb * 34);
            }
            put(&s, 4);
        }
    }
    // Float dots: any length (tails), no NaN/inf (the f16 path asserts on them).
    for (int kind = K_F16; kind <= K_F32; kind++) {
        for (int c = 0; c < CASES; c++) {
            int n;
            if (c < 8) n = 32 * (1 + c) + ((c & 1) ? (int)below(32) : 0);
            else n = 1 + (int)below(300);
            gen_activations(x, n, 0);
            if (kind == K_F16) for (int i = 0; i < n; i++) x[i] *= (x[i] > 60000.0f || x[i] < -60000.0f) ? 0.5f : 1.0f;
            put_u32(kind); put_u32(n);
            if (kind == K_F16) {
                for (int i = 0; i < n; i++) wh[i] = rand_f16_bits();
                ggml_cpu_fp32_to_fp16(x, ah, n);
                ggml_vec_dot_f16(n, &s, 0, wh, 0, ah, 0, 1);
                put(ah, 2 * n);
            } else if (kind == K_BF16) {
                for (int i = 0; i < n; i++) wh[i] = rand_bf16_bits();
                ggml_cpu_fp32_to_bf16(x, ah, n);
                ggml_vec_dot_bf16(n, &s, 0, wh, 0, ah, 0, 1);
                put(ah, 2 * n);
            } else {
                for (int i = 0; i < n; i++) {
                    float u = unit();
                    wf[i] = u * SCALES[below(4)];
                }
                ggml_vec_dot_f32(n, &s, 0, wf, 0, x, 0, 1);
            }
            put(&s, 4);
        }
    }
    // Dequantisation (ggml-base).
    for (int kind = K_DQ4_0; kind <= K_DQ8_0; kind++) {
        for (int c = 0; c < 6; c++) {
            int nb = 1 + (int)below(4), n = nb * 32;
            put_u32(kind); put_u32(n);
            if (kind == K_DQ4_0) { gen_weights_q(w, nb, 18, 1); dequantize_row_q4_0(w, x, n); }
            if (kind == K_DQ4_1) { gen_weights_q(w, nb, 20, 2); dequantize_row_q4_1(w, x, n); }
            if (kind == K_DQ8_0) { gen_weights_q(w, nb, 34, 1); dequantize_row_q8_0(w, x, n); }
            put(x, 4 * n);
        }
    }
    // Q5_0 / Q5_1 (appended later: the records above are unchanged).
    for (int kind = K_Q5_0; kind <= K_Q5_1; kind++) {
        for (int c = 0; c < CASES; c++) {
            int nb = 1 + (int)below(12), n = nb * 32;
            gen_activations(x, n, 1);
            put_u32(kind); put_u32(n);
            if (kind == K_Q5_0) {
                gen_weights_q(w, nb, 22, 1);
                quantize_row_q8_0(x, a, n);
                ggml_vec_dot_q5_0_q8_0(n, &s, 0, w, 0, a, 0, 1);
                put(a, nb * 34);
            } else {
                gen_weights_q(w, nb, 24, 2);
                quantize_row_q8_1(x, a, n);
                ggml_vec_dot_q5_1_q8_1(n, &s, 0, w, 0, a, 0, 1);
                put(a, nb * 36);
            }
            put(&s, 4);
        }
    }
    for (int kind = K_DQ5_0; kind <= K_DQ5_1; kind++) {
        for (int c = 0; c < 6; c++) {
            int nb = 1 + (int)below(4), n = nb * 32;
            put_u32(kind); put_u32(n);
            if (kind == K_DQ5_0) { gen_weights_q(w, nb, 22, 1); dequantize_row_q5_0(w, x, n); }
            if (kind == K_DQ5_1) { gen_weights_q(w, nb, 24, 2); dequantize_row_q5_1(w, x, n); }
            put(x, 4 * n);
        }
    }
    put_u32(0);
    fclose(out);
    return 0;
}
