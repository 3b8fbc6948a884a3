// Generates kquant_golden.bin: outputs of the real ggml build (libggml-base + libggml-cpu, x86 AVX2 +
// FMA + F16C, GCC) for the K-quant formats Q4_K, Q5_K, Q6_K and the Q8_K activation format.
// tests/kquant_golden.rs regenerates the same inputs with the same PRNG and compares bit for bit.
//
// Build and run (from this directory; LIB = the llama.cpp build's shared libraries, GGML = its ggml/):
//
//   LIB=/work/main/.venv/lib/python3.11/site-packages/llama_cpp/lib
//   GGML=/tmp/lcp/llama_cpp_python-0.3.36/vendor/llama.cpp/ggml
//   gcc -O2 -ffp-contract=off -I$GGML/include gen_kquant_golden.c -o /tmp/gen_kquant
//       -L$LIB -lggml-cpu -lggml-base -lm -Wl,-rpath,$LIB   (one command line)
//   /tmp/gen_kquant kquant_golden.bin
//
// -ffp-contract=off keeps the generator's own input arithmetic (products by constants) identical to the
// Rust side. Everything under test is ggml's: weights are quantised by ggml_quantize_chunk (or are raw
// random bytes), dequantised by ggml_get_type_traits(t)->to_float, activations are quantised by the CPU
// backend's ggml_get_type_traits_cpu(GGML_TYPE_Q8_K)->from_float and dotted by
// ggml_get_type_traits_cpu(t)->vec_dot.
//
// File layout (all little-endian; counts are the constants below, mirrored in the Rust test):
//   "EPK1"
//   Q8_K of the NQ8 quantisation-test blocks                         NQ8 * 292 bytes
//   Q8_K of the NA dot activation rows (NB blocks each)               NA * NB * 292 bytes
//   for each type in (Q4_K, Q5_K, Q6_K):
//     the NWQ ggml-quantised weight rows (NB blocks each)             NWQ * NB * type_size bytes
//     dequantisation of the first NDQ blocks of each of the NW rows  NW * NDQ * 256 f32
//     dots: for row w < NW, activation a < NA, k < 3: n = DOT_NB[k] * 256 (prefixes of the rows)
//                                                                     NW * NA * 3 f32
//   "END!"
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#include "ggml.h"
#include "ggml-cpu.h"

enum { QK_K = 256, Q8K_BYTES = 292 };
enum { NQ8 = 24, NA = 5, NB = 8, NWQ = 3, NWR = 3, NW = NWQ + NWR, NDQ = 3 };
static const int DOT_NB[3] = {1, 3, 8};

// ---- PRNG (splitmix64) and inputs: mirrored in tests/kquant_golden.rs ----
// Every PRNG call is its own statement (C leaves the evaluation order of operands unspecified).
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

static const float SCALES[8] = {1.0f, 0.01f, 3.7f, 100.0f, 1e-4f, 1e30f, 1e-30f, 0.5f};

// One 256-element activation block. Kinds 0..9; `special` allows NaN / inf (kinds 10, 11).
static void gen_act_block(float *x, int special) {
    uint32_t kind = below(special ? 12 : 10);
    switch (kind) {
    case 0:  // zeros (d = 0, bsums untouched by ggml: the buffer is zeroed beforehand)
        for (int i = 0; i < QK_K; i++) x[i] = 0.0f;
        break;
    case 1:  // ties: max = -127 -> iscale = 1, values k + 0.5
        for (int i = 0; i < QK_K; i++) x[i] = (float)((int)below(254) - 127) + 0.5f;
        x[below(QK_K)] = -127.0f;
        break;
    case 2:  // +amax and -amax both present: the first one sets the sign of d
        for (int i = 0; i < QK_K; i++) x[i] = unit() * 3.0f;
        x[below(128)] = 4.0f;
        x[128 + below(128)] = -4.0f;
        break;
    case 3:  // one outlier
        for (int i = 0; i < QK_K; i++) x[i] = unit() * 0.01f;
        x[below(QK_K)] = 50.0f;
        break;
    case 4:  // all positive (bsums large)
        for (int i = 0; i < QK_K; i++) x[i] = unit() * 0.5f + 0.5f;
        break;
    case 5:  // tiny: -127/max is huge but finite
        for (int i = 0; i < QK_K; i++) x[i] = unit() * 1e-37f;
        break;
    case 10: {  // NaN somewhere (ignored by the amax search)
        for (int i = 0; i < QK_K; i++) x[i] = unit();
        x[below(QK_K)] = NAN;
        break;
    }
    case 11: {  // an infinity: d = -inf, the infinite element becomes a NaN product
        for (int i = 0; i < QK_K; i++) x[i] = unit();
        uint32_t neg = below(2);
        x[below(QK_K)] = neg ? -INFINITY : INFINITY;
        break;
    }
    default: {
        float s = SCALES[below(8)];
        for (int i = 0; i < QK_K; i++) x[i] = unit() * s;
    }
    }
}

// Weight floats for ggml_quantize_chunk: per 32-element sub-block, a random kind.
static void gen_weight_floats(float *x, int n) {
    for (int lo = 0; lo < n; lo += 32) {
        uint32_t kind = below(6);
        float s = 0.02f * (float)(1 + below(8));
        for (int i = lo; i < lo + 32; i++) {
            float u = unit();
            switch (kind) {
            case 0: x[i] = 0.0f; break;                        // all-zero sub-block
            case 1: x[i] = (u + 1.0f) * s; break;              // all positive
            case 2: x[i] = (u - 1.0f) * s; break;              // all negative
            case 3: x[i] = u * s * 40.0f; break;               // large
            default: x[i] = u * s; break;
            }
        }
        if (kind == 4) x[lo + below(32)] = 1.5f;              // outlier
    }
}

static uint16_t f16_bits(uint32_t exp_lo, uint32_t exp_n, int allow_neg) {
    uint32_t sign = allow_neg ? below(2) : 0;
    uint32_t exp = exp_lo + below(exp_n);
    uint32_t man = below(1024);
    return (uint16_t)((sign << 15) | (exp << 10) | man);
}

// Raw random weight blocks: every byte random except the f16 super-block scales (finite, normal).
static void gen_weight_bytes(enum ggml_type t, uint8_t *w, int nb, size_t bs) {
    for (int b = 0; b < nb; b++) {
        uint8_t *p = w + b * bs;
        for (size_t i = 0; i < bs; i++) p[i] = (uint8_t)below(256);
        if (t == GGML_TYPE_Q6_K) {
            uint16_t d = f16_bits(3, 12, 1);  // |d| in [2^-12, 2^0)
            memcpy(p + 208, &d, 2);
        } else {
            uint16_t d = f16_bits(3, 12, 1);
            uint16_t m = f16_bits(3, 12, 1);
            memcpy(p, &d, 2);
            memcpy(p + 2, &m, 2);
        }
    }
}

static FILE *out;
static void put(const void *p, size_t n) {
    if (fwrite(p, 1, n, out) != n) { perror("fwrite"); exit(1); }
}

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: %s out.bin\n", argv[0]); return 2; }
    ggml_cpu_init();
    out = fopen(argv[1], "wb");
    if (!out) { perror(argv[1]); return 1; }
    put("EPK1", 4);

    const struct ggml_type_traits_cpu *q8k = ggml_get_type_traits_cpu(GGML_TYPE_Q8_K);
    static float x[NB * QK_K];
    static uint8_t a[NA][NB * Q8K_BYTES];

    // Q8_K quantisation, including NaN / inf blocks (not used in dots).
    rng_state = 0x4B51554131ull;  // "KQUA1"
    for (int b = 0; b < NQ8; b++) {
        uint8_t q[Q8K_BYTES];
        memset(q, 0, sizeof q);
        gen_act_block(x, 1);
        q8k->from_float(x, q, QK_K);
        put(q, Q8K_BYTES);
    }

    // Dot activations.
    rng_state = 0x4B51554132ull;
    for (int r = 0; r < NA; r++) {
        for (int b = 0; b < NB; b++) gen_act_block(x + b * QK_K, 0);
        memset(a[r], 0, sizeof a[r]);
        q8k->from_float(x, a[r], NB * QK_K);
        put(a[r], sizeof a[r]);
    }

    static const enum ggml_type TYPES[3] = {GGML_TYPE_Q4_K, GGML_TYPE_Q5_K, GGML_TYPE_Q6_K};
    for (int ti = 0; ti < 3; ti++) {
        enum ggml_type t = TYPES[ti];
        const struct ggml_type_traits *tr = ggml_get_type_traits(t);
        const struct ggml_type_traits_cpu *trc = ggml_get_type_traits_cpu(t);
        if (trc->vec_dot_type != GGML_TYPE_Q8_K) { fprintf(stderr, "unexpected vec_dot_type\n"); return 1; }
        size_t bs = ggml_type_size(t), rb = bs * NB;
        static uint8_t w[NW][NB * 256];

        // ggml-quantised rows (floats from a generator-only stream: the Rust side reads the bytes).
        rng_state = 0x4B51554157ull + (uint64_t)ti;
        for (int r = 0; r < NWQ; r++) {
            gen_weight_floats(x, NB * QK_K);
            size_t got = ggml_quantize_chunk(t, x, w[r], 0, 1, NB * QK_K, NULL);
            if (got != rb) { fprintf(stderr, "quantize size %zu != %zu\n", got, rb); return 1; }
            put(w[r], rb);
        }
        // Random-byte rows (regenerated by the Rust side).
        rng_state = 0x4B51554152ull + (uint64_t)ti;
        for (int r = NWQ; r < NW; r++) gen_weight_bytes(t, w[r], NB, bs);

        for (int r = 0; r < NW; r++) {
            tr->to_float(w[r], x, NDQ * QK_K);
            put(x, sizeof(float) * NDQ * QK_K);
        }
        for (int r = 0; r < NW; r++) {
            for (int ai = 0; ai < NA; ai++) {
                for (int k = 0; k < 3; k++) {
                    float s = 0.0f;
                    trc->vec_dot(DOT_NB[k] * QK_K, &s, 0, w[r], 0, a[ai], 0, 1);
                    put(&s, 4);
                }
            }
        }
    }
    put("END!", 4);
    fclose(out);
    return 0;
}
