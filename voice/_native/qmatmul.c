/*
 * Weight-only int4 and int8 matrix products for CPU decoding: out = x @ W.T + bias.
 *
 * Decoding reads every weight once per forward pass, so its speed is set by the bytes
 * the weights take and by how cheaply each byte turns into products. These kernels
 * quantize the few activation rows of a decoding or verification pass to int16, with
 * one scale per block of 128 values, and multiply them with the weights widened to int16
 * (AVX512-VNNI vpdpwssd, or vpmaddwd on AVX2), summing in int32.
 *
 * The int4 kernel keeps 16 output rows in the 16 lanes of a vector. Each 32-bit lane
 * takes the products of one output row with two adjacent inputs, and the activation
 * pair is broadcast to all lanes, so an instruction does 32 multiply-adds with no
 * horizontal sum. Per group of 32 inputs the exact int32 sum becomes float once and is
 * scaled by the group's scale for all 16 rows at once. The widened weights of a group
 * serve every activation row of the call, so a verification pass of 8 rows costs little
 * more widening than a decoding step of one.
 * The int8 kernel goes over one or two output rows at a time and sums each block of
 * 128 inputs across the lanes of a vector.
 *
 * Every output value is computed by the same sequence of operations, whatever the
 * number of rows, the row blocking and the thread count. A token's logits are therefore
 * bit-identical in a one-token step and in a verification pass. For int4 the sequence
 * is also the same on every instruction set.
 *
 * Layouts (K = in_features, a multiple of 128; N = out_features):
 * - int4 (N a multiple of 16): the weights are stored in tiles of 16 output rows, and a
 *   tile's data for group g (inputs 32g to 32g+31) is contiguous. codes: per tile and
 *   group, 256 bytes read as 4 loads of 32 little-endian 16-bit words. In load L, word w
 *   belongs to output row w / 2 of the tile, and its nibble t (bits 4t to 4t+3) is the
 *   code of input 32g + 8L + 2t + w % 2. sub_scales uint8 and mins float16: per tile and group,
 *   one value for each of the 16 rows. block_scales float32: per tile and block of 128
 *   inputs, one value for each of the 16 rows. w = block_scale * sub_scale * code + min.
 * - int8 (N a multiple of 4): weights (N, K) int8 and one float32 scale per output row:
 *   w = scale * weight.
 * - activations and output: float32 or bfloat16, row-major; bias float32 or none.
 *
 * Integer sums cannot overflow. An int4 lane adds 32 products of a code (at most 15)
 * and an int16 activation (at most 32767) per group, under 2^24. An int8 lane adds 8
 * products of at most 128 * 32768 per block, under 2^26.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <immintrin.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define GROUP 32  /* inputs per int4 sub-scale and min */
#define BLOCK 128 /* inputs per activation scale and int4 block scale */
#define TILE 16 /* int4 output rows per tile: the lanes of one 512-bit vector of float32 */
#define INT8_ROW_BLOCK 4 /* int8 output rows per unit of a thread's share */
#define MAX_THREADS 64
#define PREFETCH_ROWS 4 /* output rows ahead whose weights are prefetched */

enum { DTYPE_FLOAT32 = 0, DTYPE_BFLOAT16 = 1 };
enum { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512_VNNI = 2 };
static const char *ISA_NAMES[] = {"scalar", "avx2", "avx512_vnni"};

/* Activation rows as int16: x = scale[block] * q. */
typedef struct {
    int16_t *q;    /* rows x K */
    float *scales; /* rows x K/128: amax / 32767 of each block */
    float *sums;   /* rows x K/32: sum of the float values of each group (int4 mins) */
} Activations;

typedef struct {
    int kind; /* 4 or 8 */
    int isa;
    int rows, k, n;
    const Activations *act;
    const uint8_t *weights;
    const uint8_t *sub_scales;  /* int4: (N, K/32) */
    const float *block_scales;  /* int4: (N, K/128) */
    const uint16_t *mins;       /* int4: float16 (N, K/32) */
    const float *row_scales;    /* int8: (N) */
    const float *bias;
    void *out;
    int out_dtype;
} Job;

/* ---------------------------------------------------------------------------------- */
/* Conversions                                                                         */

static inline float bf16_to_float(uint16_t value)
{
    uint32_t bits = (uint32_t)value << 16;
    float result;
    memcpy(&result, &bits, sizeof result);
    return result;
}

static inline uint16_t float_to_bf16(float value)
{
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40); /* NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u); /* round to nearest even */
    return (uint16_t)(bits >> 16);
}

static inline float half_to_float(uint16_t value)
{
    uint32_t sign = (uint32_t)(value & 0x8000u) << 16;
    uint32_t exponent = (value >> 10) & 0x1fu;
    uint32_t mantissa = value & 0x3ffu;
    uint32_t bits;
    if (exponent == 0) {
        if (mantissa == 0) {
            bits = sign;
        } else { /* subnormal: normalize */
            exponent = 113;
            while (!(mantissa & 0x400u)) {
                mantissa <<= 1;
                exponent--;
            }
            bits = sign | (exponent << 23) | ((mantissa & 0x3ffu) << 13);
        }
    } else if (exponent == 31) {
        bits = sign | 0x7f800000u | (mantissa << 13);
    } else {
        bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
    }
    float result;
    memcpy(&result, &bits, sizeof result);
    return result;
}

static inline void store_output(const Job *job, int row, int col, float value)
{
    size_t index = (size_t)row * job->n + col;
    if (job->out_dtype == DTYPE_FLOAT32)
        ((float *)job->out)[index] = value;
    else
        ((uint16_t *)job->out)[index] = float_to_bf16(value);
}

/* ---------------------------------------------------------------------------------- */
/* Activation quantization: round to nearest, one scale per block of 128 values        */

static void quantize_activations(const void *x, int dtype, int rows, int k, Activations *act)
{
    const int blocks = k / BLOCK, groups = k / GROUP;
    float values[BLOCK];
    for (int r = 0; r < rows; r++) {
        for (int b = 0; b < blocks; b++) {
            size_t base = (size_t)r * k + (size_t)b * BLOCK;
            float amax = 0.0f;
            for (int i = 0; i < BLOCK; i++) {
                values[i] = dtype == DTYPE_FLOAT32 ? ((const float *)x)[base + i] : bf16_to_float(((const uint16_t *)x)[base + i]);
                amax = fmaxf(amax, fabsf(values[i]));
            }
            float inverse = amax > 0.0f ? 32767.0f / amax : 0.0f;
            for (int i = 0; i < BLOCK; i++) act->q[base + i] = (int16_t)lrintf(values[i] * inverse);
            act->scales[(size_t)r * blocks + b] = amax / 32767.0f;
            for (int g = 0; g < BLOCK / GROUP; g++) {
                float sum = 0.0f;
                for (int i = 0; i < GROUP; i++) sum += values[g * GROUP + i];
                act->sums[(size_t)r * groups + (size_t)b * (BLOCK / GROUP) + g] = sum;
            }
        }
    }
}

/* code of output row `lane` of a tile and input i (0..31) of group g */
static inline int int4_code(const uint8_t *tile_codes, int g, int lane, int i)
{
    const int load = i / 8, nibble = (i % 8) / 2, word = 2 * lane + i % 2;
    const uint8_t *bytes = tile_codes + (size_t)g * 256 + load * 64 + 2 * word;
    const int value = bytes[0] | (bytes[1] << 8);
    return (value >> (4 * nibble)) & 0x0f;
}

/* ---------------------------------------------------------------------------------- */
/* Scalar kernels: any x86-64, and the reference for the others                        */
/*
 * The int4 kernels of every instruction set perform these float operations in this
 * order for each output value, so their results are bit-identical. Per group, the int32
 * dot product is converted to float and multiplied by (block_scale * sub_scale) *
 * activation scale with a fused multiply-add. Then min * (sum of the group's
 * activations) is added with another.
 */

static void int4_scalar(const Job *job, int n0, int n1)
{
    const int k = job->k, blocks = k / BLOCK, groups = k / GROUP;
    for (int tile = n0 / TILE; tile < n1 / TILE; tile++) {
        const uint8_t *codes = job->weights + (size_t)tile * groups * 256;
        const uint8_t *sub = job->sub_scales + (size_t)tile * groups * TILE;
        const uint16_t *mins = job->mins + (size_t)tile * groups * TILE;
        const float *block_scales = job->block_scales + (size_t)tile * blocks * TILE;
        for (int r = 0; r < job->rows; r++) {
            const int16_t *q = job->act->q + (size_t)r * k;
            for (int lane = 0; lane < TILE; lane++) {
                float total = 0.0f;
                for (int g = 0; g < groups; g++) {
                    int32_t dot = 0;
                    for (int i = 0; i < GROUP; i++) dot += int4_code(codes, g, lane, i) * q[g * GROUP + i];
                    const int b = g / (BLOCK / GROUP);
                    const float group_scale = block_scales[b * TILE + lane] * (float)sub[g * TILE + lane];
                    const float scale = group_scale * job->act->scales[(size_t)r * blocks + b];
                    total = fmaf((float)dot, scale, total);
                    total = fmaf(half_to_float(mins[g * TILE + lane]), job->act->sums[(size_t)r * groups + g], total);
                }
                if (job->bias) total += job->bias[tile * TILE + lane];
                store_output(job, r, tile * TILE + lane, total);
            }
        }
    }
}

static void int8_scalar(const Job *job, int n0, int n1)
{
    const int k = job->k, blocks = k / BLOCK;
    for (int n = n0; n < n1; n++) {
        const int8_t *weights = (const int8_t *)job->weights + (size_t)n * k;
        for (int r = 0; r < job->rows; r++) {
            const int16_t *q = job->act->q + (size_t)r * k;
            float total = 0.0f;
            for (int b = 0; b < blocks; b++) {
                int32_t dot = 0;
                for (int i = 0; i < BLOCK; i++) dot += weights[b * BLOCK + i] * q[b * BLOCK + i];
                total += (float)dot * job->act->scales[(size_t)r * blocks + b];
            }
            total = total * job->row_scales[n] + (job->bias ? job->bias[n] : 0.0f);
            store_output(job, r, n, total);
        }
    }
}

/* ---------------------------------------------------------------------------------- */
/* AVX2 kernels                                                                        */

#define AVX2_TARGET __attribute__((target("avx2,fma,f16c")))
#define AVX2_ROWS 4 /* activation rows per pass over one output row's weights */

AVX2_TARGET static inline float avx2_sum(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/*
 * Rows r0 .. r0 + RB - 1 against one half (8 output rows) of an int4 tile. The 32-byte
 * half of each load contains words 16 h to 16 h + 15, the words of rows 8 h to 8 h + 7.
 */
AVX2_TARGET static inline __attribute__((always_inline)) void int4_avx2_half(const Job *job, int tile, int half, int r0, const int RB)
{
    const int k = job->k, blocks = k / BLOCK, groups = k / GROUP;
    const uint8_t *codes = job->weights + (size_t)tile * groups * 256 + 32 * half;
    const uint8_t *sub = job->sub_scales + (size_t)tile * groups * TILE + 8 * half;
    const uint16_t *mins = job->mins + (size_t)tile * groups * TILE + 8 * half;
    const float *block_scales = job->block_scales + (size_t)tile * blocks * TILE + 8 * half;
    const __m256i low4 = _mm256_set1_epi16(0x0f);
    __m256 total[AVX2_ROWS];
    for (int j = 0; j < RB; j++) total[j] = _mm256_setzero_ps();
    for (int g = 0; g < groups; g++) {
        const int b = g / (BLOCK / GROUP);
        const __m256 sub_scale = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(sub + g * TILE))));
        const __m256 group_scale = _mm256_mul_ps(_mm256_loadu_ps(block_scales + b * TILE), sub_scale);
        const __m256 min = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(mins + g * TILE)));
        __m256i dot[AVX2_ROWS];
        for (int j = 0; j < RB; j++) dot[j] = _mm256_setzero_si256();
        for (int load = 0; load < 4; load++) {
            const __m256i words = _mm256_loadu_si256((const __m256i *)(codes + (size_t)g * 256 + load * 64));
            const __m256i w[4] = {
                _mm256_and_si256(words, low4),
                _mm256_and_si256(_mm256_srli_epi16(words, 4), low4),
                _mm256_and_si256(_mm256_srli_epi16(words, 8), low4),
                _mm256_srli_epi16(words, 12),
            };
            for (int j = 0; j < RB; j++) {
                const int16_t *q = job->act->q + (size_t)(r0 + j) * k + g * GROUP + 8 * load;
                for (int t = 0; t < 4; t++) {
                    int32_t pair;
                    memcpy(&pair, q + 2 * t, sizeof pair);
                    dot[j] = _mm256_add_epi32(dot[j], _mm256_madd_epi16(w[t], _mm256_set1_epi32(pair)));
                }
            }
        }
        for (int j = 0; j < RB; j++) {
            const __m256 scale = _mm256_mul_ps(group_scale, _mm256_set1_ps(job->act->scales[(size_t)(r0 + j) * blocks + b]));
            total[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[j]), scale, total[j]);
            total[j] = _mm256_fmadd_ps(min, _mm256_set1_ps(job->act->sums[(size_t)(r0 + j) * groups + g]), total[j]);
        }
    }
    for (int j = 0; j < RB; j++) {
        float values[8];
        _mm256_storeu_ps(values, total[j]);
        for (int lane = 0; lane < 8; lane++) {
            const int n = tile * TILE + 8 * half + lane;
            store_output(job, r0 + j, n, job->bias ? values[lane] + job->bias[n] : values[lane]);
        }
    }
}

AVX2_TARGET static void int4_avx2_rows1(const Job *job, int tile, int half, int r0) { int4_avx2_half(job, tile, half, r0, 1); }
AVX2_TARGET static void int4_avx2_rows2(const Job *job, int tile, int half, int r0) { int4_avx2_half(job, tile, half, r0, 2); }
AVX2_TARGET static void int4_avx2_rows3(const Job *job, int tile, int half, int r0) { int4_avx2_half(job, tile, half, r0, 3); }
AVX2_TARGET static void int4_avx2_rows4(const Job *job, int tile, int half, int r0) { int4_avx2_half(job, tile, half, r0, 4); }

AVX2_TARGET static void int4_avx2(const Job *job, int n0, int n1)
{
    static void (*const kernels[AVX2_ROWS + 1])(const Job *, int, int, int) = {
        NULL, int4_avx2_rows1, int4_avx2_rows2, int4_avx2_rows3, int4_avx2_rows4};
    for (int tile = n0 / TILE; tile < n1 / TILE; tile++)
        for (int half = 0; half < 2; half++)
            for (int r = 0; r < job->rows; r += AVX2_ROWS) kernels[job->rows - r < AVX2_ROWS ? job->rows - r : AVX2_ROWS](job, tile, half, r);
}

AVX2_TARGET static void int8_avx2(const Job *job, int n0, int n1)
{
    const int k = job->k, blocks = k / BLOCK;
    for (int n = n0; n < n1; n++) {
        const int8_t *weights = (const int8_t *)job->weights + (size_t)n * k;
        for (int r0 = 0; r0 < job->rows; r0 += AVX2_ROWS) {
            const int rb = job->rows - r0 < AVX2_ROWS ? job->rows - r0 : AVX2_ROWS;
            __m256 acc[AVX2_ROWS];
            for (int j = 0; j < AVX2_ROWS; j++) acc[j] = _mm256_setzero_ps();
            for (int b = 0; b < blocks; b++) {
                __m256i w[8];
                for (int t = 0; t < 8; t++) w[t] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(weights + b * BLOCK + 16 * t)));
                for (int j = 0; j < rb; j++) {
                    const int16_t *q = job->act->q + (size_t)(r0 + j) * k + (size_t)b * BLOCK;
                    __m256i dot = _mm256_setzero_si256();
                    for (int t = 0; t < 8; t++) dot = _mm256_add_epi32(dot, _mm256_madd_epi16(w[t], _mm256_loadu_si256((const __m256i *)(q + 16 * t))));
                    acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(job->act->scales[(size_t)(r0 + j) * blocks + b]), acc[j]);
                }
            }
            for (int j = 0; j < rb; j++) {
                float total = avx2_sum(acc[j]) * job->row_scales[n] + (job->bias ? job->bias[n] : 0.0f);
                store_output(job, r0 + j, n, total);
            }
        }
    }
}

/* ---------------------------------------------------------------------------------- */
/* AVX512-VNNI kernels                                                                 */

#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))

/* groups ahead whose codes are prefetched: 2 KiB. On the Xeon a 1-row product of an
 * 8960x1536 layer took about 15% less time with 8 groups than with 2. */
#define PREFETCH_GROUPS 8
#define INT4_PASS_ROWS 8 /* activation rows per pass over an int4 tile: 8 float and 8 int32 accumulators */

/*
 * Rows r0 .. r0 + RB - 1 against one int4 tile. Per group, each 64-byte load of codes
 * gives 4 vectors of widened weights: nibble t of every word is the weight of input
 * pair t of that load for all 16 rows. With fewer than 4 activation rows the products
 * go into several int32 accumulators per row, so consecutive vpdpwssd do not wait for
 * each other. The integer sum is the same whatever the split.
 */
AVX512_TARGET static inline __attribute__((always_inline)) void int4_avx512_tile(const Job *job, int tile, int r0, const int RB)
{
    const int k = job->k, blocks = k / BLOCK, groups = k / GROUP;
    int chains = 4;
    if (RB >= 4)
        chains = 1;
    else if (RB >= 2)
        chains = 2;
    const uint8_t *codes = job->weights + (size_t)tile * groups * 256;
    const uint8_t *sub = job->sub_scales + (size_t)tile * groups * TILE;
    const uint16_t *mins = job->mins + (size_t)tile * groups * TILE;
    const float *block_scales = job->block_scales + (size_t)tile * blocks * TILE;
    const __m512i low4 = _mm512_set1_epi16(0x0f);
    __m512 total[INT4_PASS_ROWS];
    for (int j = 0; j < RB; j++) total[j] = _mm512_setzero_ps();
    for (int g = 0; g < groups; g++) {
        const int b = g / (BLOCK / GROUP);
        for (int line = 0; line < 4; line++) _mm_prefetch((const char *)(codes + (size_t)(g + PREFETCH_GROUPS) * 256 + 64 * line), _MM_HINT_T0);
        __m512i dot[INT4_PASS_ROWS][4];
        for (int j = 0; j < RB; j++)
            for (int c = 0; c < chains; c++) dot[j][c] = _mm512_setzero_si512();
#pragma GCC unroll 4
        for (int load = 0; load < 4; load++) {
            const __m512i words = _mm512_loadu_si512(codes + (size_t)g * 256 + load * 64);
            const __m512i w[4] = {
                _mm512_and_si512(words, low4),
                _mm512_and_si512(_mm512_srli_epi16(words, 4), low4),
                _mm512_and_si512(_mm512_srli_epi16(words, 8), low4),
                _mm512_srli_epi16(words, 12),
            };
            for (int j = 0; j < RB; j++) {
                const int16_t *q = job->act->q + (size_t)(r0 + j) * k + g * GROUP + 8 * load;
                for (int t = 0; t < 4; t++) {
                    int32_t pair;
                    memcpy(&pair, q + 2 * t, sizeof pair);
                    dot[j][t % chains] = _mm512_dpwssd_epi32(dot[j][t % chains], w[t], _mm512_set1_epi32(pair));
                }
            }
        }
        const __m512 sub_scale = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(sub + g * TILE))));
        const __m512 group_scale = _mm512_mul_ps(_mm512_loadu_ps(block_scales + b * TILE), sub_scale);
        const __m512 min = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(mins + g * TILE)));
        for (int j = 0; j < RB; j++) {
            __m512i sum = dot[j][0];
            for (int c = 1; c < chains; c++) sum = _mm512_add_epi32(sum, dot[j][c]);
            const __m512 scale = _mm512_mul_ps(group_scale, _mm512_set1_ps(job->act->scales[(size_t)(r0 + j) * blocks + b]));
            total[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, total[j]);
            total[j] = _mm512_fmadd_ps(min, _mm512_set1_ps(job->act->sums[(size_t)(r0 + j) * groups + g]), total[j]);
        }
    }
    for (int j = 0; j < RB; j++) {
        const int n = tile * TILE;
        if (job->bias) total[j] = _mm512_add_ps(total[j], _mm512_loadu_ps(job->bias + n));
        if (job->out_dtype == DTYPE_FLOAT32) {
            _mm512_storeu_ps((float *)job->out + (size_t)(r0 + j) * job->n + n, total[j]);
        } else {
            float values[TILE];
            _mm512_storeu_ps(values, total[j]);
            for (int lane = 0; lane < TILE; lane++) store_output(job, r0 + j, n + lane, values[lane]);
        }
    }
}

#define INT4_AVX512_ROWS(RB) \
    AVX512_TARGET static void int4_avx512_rows##RB(const Job *job, int tile, int r0) { int4_avx512_tile(job, tile, r0, RB); }
INT4_AVX512_ROWS(1)
INT4_AVX512_ROWS(2)
INT4_AVX512_ROWS(3)
INT4_AVX512_ROWS(4)
INT4_AVX512_ROWS(5)
INT4_AVX512_ROWS(6)
INT4_AVX512_ROWS(7)
INT4_AVX512_ROWS(8)

/*
 * The tile's weights stay in cache while each block of up to 8 activation rows passes
 * over them, so the rows of a prefill read the weights from memory once.
 */
AVX512_TARGET static void int4_avx512(const Job *job, int n0, int n1)
{
    static void (*const kernels[INT4_PASS_ROWS + 1])(const Job *, int, int) = {
        NULL, int4_avx512_rows1, int4_avx512_rows2, int4_avx512_rows3, int4_avx512_rows4,
        int4_avx512_rows5, int4_avx512_rows6, int4_avx512_rows7, int4_avx512_rows8};
    for (int tile = n0 / TILE; tile < n1 / TILE; tile++)
        for (int r = 0; r < job->rows; r += INT4_PASS_ROWS)
            kernels[job->rows - r < INT4_PASS_ROWS ? job->rows - r : INT4_PASS_ROWS](job, tile, r);
}

#define INT8_AVX512_BLOCK(NB, RB)                                                                    \
    AVX512_TARGET static void int8_avx512_##NB##x##RB(const Job *job, int n, int r0)                 \
    {                                                                                                \
        const int k = job->k, blocks = k / BLOCK;                                                    \
        __m512 acc[NB][RB];                                                                          \
        for (int i = 0; i < NB; i++)                                                                 \
            for (int j = 0; j < RB; j++) acc[i][j] = _mm512_setzero_ps();                            \
        for (int b = 0; b < blocks; b++) {                                                           \
            for (int i = 0; i < NB; i++) {                                                           \
                const int8_t *weights = (const int8_t *)job->weights + (size_t)(n + i) * k + (size_t)b * BLOCK; \
                _mm_prefetch((const char *)(weights + PREFETCH_ROWS * k), _MM_HINT_T0);             \
                _mm_prefetch((const char *)(weights + PREFETCH_ROWS * k + 64), _MM_HINT_T0);        \
                __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)weights));     \
                __m512i w1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(weights + 32))); \
                __m512i w2 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(weights + 64))); \
                __m512i w3 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(weights + 96))); \
                for (int j = 0; j < RB; j++) {                                                       \
                    const int16_t *q = job->act->q + (size_t)(r0 + j) * k + (size_t)b * BLOCK;       \
                    __m512i dot = _mm512_dpwssd_epi32(_mm512_setzero_si512(), w0, _mm512_loadu_si512(q)); \
                    dot = _mm512_dpwssd_epi32(dot, w1, _mm512_loadu_si512(q + 32));                  \
                    dot = _mm512_dpwssd_epi32(dot, w2, _mm512_loadu_si512(q + 64));                  \
                    dot = _mm512_dpwssd_epi32(dot, w3, _mm512_loadu_si512(q + 96));                  \
                    const float scale = job->act->scales[(size_t)(r0 + j) * blocks + b];            \
                    acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(scale), acc[i][j]); \
                }                                                                                    \
            }                                                                                        \
        }                                                                                            \
        for (int i = 0; i < NB; i++)                                                                 \
            for (int j = 0; j < RB; j++) {                                                           \
                float total = _mm512_reduce_add_ps(acc[i][j]) * job->row_scales[n + i];              \
                if (job->bias) total += job->bias[n + i];                                            \
                store_output(job, r0 + j, n + i, total);                                             \
            }                                                                                        \
    }

#define AVX512_SHAPES(KIND)                                                                          \
    KIND##_AVX512_BLOCK(1, 1)                                                                        \
    KIND##_AVX512_BLOCK(2, 1)                                                                        \
    KIND##_AVX512_BLOCK(2, 2)                                                                        \
    KIND##_AVX512_BLOCK(2, 3)                                                                        \
    KIND##_AVX512_BLOCK(2, 4)                                                                        \
    KIND##_AVX512_BLOCK(2, 5)                                                                        \
    KIND##_AVX512_BLOCK(2, 6)                                                                        \
    KIND##_AVX512_BLOCK(2, 7)                                                                        \
    KIND##_AVX512_BLOCK(2, 8)

AVX512_SHAPES(INT8)

/*
 * One activation row (decoding) goes one output row at a time. On 2 Zen 4 cores a
 * decoding step of the int4 1.5B target took 57 ms that way and 65 to 70 ms with 4
 * output rows at a time. More rows go with 2 output rows and up to 8 activation rows,
 * so the weights are widened once for 8 rows and the accumulators still fit in the 32
 * vector registers. The block's weights stay in cache while every activation row
 * passes over them.
 */
#define AVX512_ROWS(KIND)                                                                            \
    AVX512_TARGET static void KIND##_avx512(const Job *job, int n0, int n1)                          \
    {                                                                                                \
        static void (*const wide[9])(const Job *, int, int) = {                                      \
            NULL, KIND##_avx512_2x1, KIND##_avx512_2x2, KIND##_avx512_2x3, KIND##_avx512_2x4,         \
            KIND##_avx512_2x5, KIND##_avx512_2x6, KIND##_avx512_2x7, KIND##_avx512_2x8};              \
        if (job->rows == 1) {                                                                        \
            for (int n = n0; n < n1; n++) KIND##_avx512_1x1(job, n, 0);                              \
            return;                                                                                  \
        }                                                                                            \
        for (int n = n0; n < n1; n += 2)                                                             \
            for (int r = 0; r < job->rows; r += 8) wide[job->rows - r < 8 ? job->rows - r : 8](job, n, r); \
    }

AVX512_ROWS(int8)

static void run_range(const Job *job, int n0, int n1)
{
    if (n0 >= n1) return;
    if (job->kind == 4) {
        if (job->isa == ISA_AVX512_VNNI) int4_avx512(job, n0, n1);
        else if (job->isa == ISA_AVX2) int4_avx2(job, n0, n1);
        else int4_scalar(job, n0, n1);
    } else {
        if (job->isa == ISA_AVX512_VNNI) int8_avx512(job, n0, n1);
        else if (job->isa == ISA_AVX2) int8_avx2(job, n0, n1);
        else int8_scalar(job, n0, n1);
    }
}

/* ---------------------------------------------------------------------------------- */
/* Thread pool                                                                         */
/*
 * Output rows are split between the calling thread and up to MAX_THREADS - 1 workers.
 * A worker spins for a short while after each job, because the next layer's call comes
 * within tens of microseconds during decoding, and then sleeps on a condition variable.
 * Only one call uses the pool at a time; a concurrent call (another Python thread) runs
 * on its own thread alone.
 */

#define SPIN_ROUNDS 20000 /* about 100 microseconds of pause instructions on Zen 4 */

static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER; /* held by the call using the pool */
static pthread_mutex_t sleep_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
static atomic_int generation;
static atomic_int sleepers;
static atomic_int finished;
static int workers_started;
static int pool_threads; /* threads of the current job, the caller included */
static const Job *pool_job;

/* output rows per unit of a thread's share: an int4 tile or a block of int8 rows */
static int row_unit(const Job *job)
{
    return job->kind == 4 ? TILE : INT8_ROW_BLOCK;
}

static void split_rows(const Job *job, int parts, int part, int *n0, int *n1)
{
    const int unit = row_unit(job), units = job->n / unit;
    *n0 = (int)((long)units * part / parts) * unit;
    *n1 = (int)((long)units * (part + 1) / parts) * unit;
}

static int worker_start_generation[MAX_THREADS];

static void *worker_main(void *arg)
{
    const int index = (int)(intptr_t)arg; /* 1 .. MAX_THREADS - 1; the caller is 0 */
    /* the generation before the job this worker was started for, which may already
     * have begun by the time the thread runs */
    int seen = worker_start_generation[index];
    for (;;) {
        int spins = 0;
        while (atomic_load(&generation) == seen && spins < SPIN_ROUNDS) {
            _mm_pause();
            spins++;
        }
        if (atomic_load(&generation) == seen) {
            pthread_mutex_lock(&sleep_lock);
            atomic_fetch_add(&sleepers, 1);
            while (atomic_load(&generation) == seen) pthread_cond_wait(&wake, &sleep_lock);
            atomic_fetch_sub(&sleepers, 1);
            pthread_mutex_unlock(&sleep_lock);
        }
        seen = atomic_load(&generation);
        if (index < pool_threads) {
            int n0, n1;
            split_rows(pool_job, pool_threads, index, &n0, &n1);
            run_range(pool_job, n0, n1);
        }
        atomic_fetch_add(&finished, 1);
    }
    return NULL;
}

/* Start workers up to `threads` - 1; return how many threads the pool can use. */
static int ensure_workers(int threads)
{
    while (workers_started < threads - 1) {
        pthread_t thread;
        pthread_attr_t attributes;
        pthread_attr_init(&attributes);
        pthread_attr_setdetachstate(&attributes, PTHREAD_CREATE_DETACHED);
        worker_start_generation[workers_started + 1] = atomic_load(&generation);
        int failed = pthread_create(&thread, &attributes, worker_main, (void *)(intptr_t)(workers_started + 1));
        pthread_attr_destroy(&attributes);
        if (failed) break;
        workers_started++;
    }
    return workers_started + 1;
}

/*
 * torch's own OpenMP runtime, when Python passes its entry points (use_openmp). Running
 * the rows on torch's OpenMP threads leaves no second set of threads to compete with
 * torch's workers, which keep spinning for a while after each op.
 */
typedef void (*GompParallel)(void (*)(void *), void *, unsigned, unsigned);
typedef int (*OmpQuery)(void);
static GompParallel gomp_parallel;
static OmpQuery omp_thread_num, omp_num_threads;

static void openmp_body(void *data)
{
    const Job *job = data;
    int n0, n1;
    split_rows(job, omp_num_threads(), omp_thread_num(), &n0, &n1);
    run_range(job, n0, n1);
}

static void run_job(const Job *job, int threads)
{
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > job->n / row_unit(job)) threads = job->n / row_unit(job);
    if (threads > 1 && gomp_parallel) {
        gomp_parallel(openmp_body, (void *)job, (unsigned)threads, 0);
        return;
    }
    if (threads <= 1 || pthread_mutex_trylock(&pool_lock) != 0) {
        run_range(job, 0, job->n);
        return;
    }
    threads = ensure_workers(threads);
    pool_job = job;
    pool_threads = threads;
    atomic_store(&finished, 0);
    atomic_fetch_add(&generation, 1);
    if (atomic_load(&sleepers) > 0) {
        pthread_mutex_lock(&sleep_lock);
        pthread_cond_broadcast(&wake);
        pthread_mutex_unlock(&sleep_lock);
    }
    int n0, n1;
    split_rows(job, threads, 0, &n0, &n1);
    run_range(job, n0, n1);
    /* every started worker reports, also those without a share of this job */
    while (atomic_load(&finished) < workers_started) _mm_pause();
    pthread_mutex_unlock(&pool_lock);
}

/* ---------------------------------------------------------------------------------- */
/* Per-thread scratch space for the quantized activations                              */

static __thread void *scratch;
static __thread size_t scratch_size;

static int prepare_activations(Activations *act, int rows, int k)
{
    size_t count = (size_t)rows * k;
    size_t q_bytes = (count * sizeof(int16_t) + 63) & ~(size_t)63;
    size_t scale_bytes = ((count / BLOCK) * sizeof(float) + 63) & ~(size_t)63;
    size_t sum_bytes = ((count / GROUP) * sizeof(float) + 63) & ~(size_t)63;
    size_t needed = q_bytes + scale_bytes + sum_bytes;
    if (needed > scratch_size) {
        free(scratch);
        scratch = NULL;
        scratch_size = 0;
        if (posix_memalign(&scratch, 64, needed) != 0) return -1;
        scratch_size = needed;
    }
    char *base = scratch;
    act->q = (int16_t *)base;
    act->scales = (float *)(base + q_bytes);
    act->sums = (float *)(base + q_bytes + scale_bytes);
    return 0;
}

/* ---------------------------------------------------------------------------------- */
/* Python interface                                                                    */

static int best_isa = ISA_SCALAR;
static int active_isa = ISA_SCALAR;

static int detect_isa(void)
{
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("f16c"))
        return ISA_AVX512_VNNI;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) return ISA_AVX2;
    return ISA_SCALAR;
}

/* Check a call's shape and dtypes, quantize x and run the job with the GIL released. */
static PyObject *run_matmul(Job *job, Py_ssize_t x, int x_dtype, int threads)
{
    if (job->rows < 0 || job->k <= 0 || job->n <= 0 || job->k % BLOCK || job->n % row_unit(job) ||
        (x_dtype != DTYPE_FLOAT32 && x_dtype != DTYPE_BFLOAT16) || (job->out_dtype != DTYPE_FLOAT32 && job->out_dtype != DTYPE_BFLOAT16)) {
        PyErr_Format(PyExc_ValueError, "invalid shape or dtype: rows=%d in=%d out=%d (in must be a multiple of %d, out of %d)", job->rows,
                     job->k, job->n, BLOCK, row_unit(job));
        return NULL;
    }
    if (job->rows == 0) Py_RETURN_NONE;
    Activations act;
    job->act = &act;
    job->isa = active_isa;
    int failed;
    Py_BEGIN_ALLOW_THREADS
    failed = prepare_activations(&act, job->rows, job->k);
    if (!failed) {
        quantize_activations((const void *)x, x_dtype, job->rows, job->k, &act);
        run_job(job, threads);
    }
    Py_END_ALLOW_THREADS
    if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *int4_matmul(PyObject *self, PyObject *args)
{
    (void)self;
    Py_ssize_t x, codes, sub_scales, block_scales, mins, bias, out;
    int x_dtype, threads;
    Job job = {.kind = 4};
    if (!PyArg_ParseTuple(args, "niiinnnninnii", &x, &x_dtype, &job.rows, &job.k, &codes, &sub_scales, &block_scales, &mins, &job.n, &bias,
                          &out, &job.out_dtype, &threads))
        return NULL;
    job.weights = (const uint8_t *)codes;
    job.sub_scales = (const uint8_t *)sub_scales;
    job.block_scales = (const float *)block_scales;
    job.mins = (const uint16_t *)mins;
    job.bias = (const float *)bias;
    job.out = (void *)out;
    return run_matmul(&job, x, x_dtype, threads);
}

static PyObject *int8_matmul(PyObject *self, PyObject *args)
{
    (void)self;
    Py_ssize_t x, weights, row_scales, bias, out;
    int x_dtype, threads;
    Job job = {.kind = 8};
    if (!PyArg_ParseTuple(args, "niiinninnii", &x, &x_dtype, &job.rows, &job.k, &weights, &row_scales, &job.n, &bias, &out, &job.out_dtype,
                          &threads))
        return NULL;
    job.weights = (const uint8_t *)weights;
    job.row_scales = (const float *)row_scales;
    job.bias = (const float *)bias;
    job.out = (void *)out;
    return run_matmul(&job, x, x_dtype, threads);
}

static PyObject *use_openmp(PyObject *self, PyObject *args)
{
    (void)self;
    Py_ssize_t parallel, thread_num, num_threads;
    if (!PyArg_ParseTuple(args, "nnn", &parallel, &thread_num, &num_threads)) return NULL;
    if (!parallel || !thread_num || !num_threads) {
        gomp_parallel = NULL;
        Py_RETURN_NONE;
    }
    omp_thread_num = (OmpQuery)thread_num;
    omp_num_threads = (OmpQuery)num_threads;
    gomp_parallel = (GompParallel)parallel;
    Py_RETURN_NONE;
}

static PyObject *get_isa(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    return PyUnicode_FromString(ISA_NAMES[active_isa]);
}

static PyObject *supported_isas(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    PyObject *names = PyList_New(0);
    for (int isa = ISA_SCALAR; isa <= best_isa && names; isa++) {
        PyObject *name = PyUnicode_FromString(ISA_NAMES[isa]);
        if (!name || PyList_Append(names, name) < 0) Py_CLEAR(names);
        Py_XDECREF(name);
    }
    return names;
}

static PyObject *set_isa(PyObject *self, PyObject *args)
{
    (void)self;
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    for (int isa = ISA_SCALAR; isa <= best_isa; isa++) {
        if (strcmp(name, ISA_NAMES[isa]) == 0) {
            active_isa = isa;
            Py_RETURN_NONE;
        }
    }
    PyErr_Format(PyExc_ValueError, "instruction set %s is not supported by this CPU; the best is %s", name, ISA_NAMES[best_isa]);
    return NULL;
}

static PyMethodDef methods[] = {
    {"int4_matmul", int4_matmul, METH_VARARGS,
     "int4_matmul(x, x_dtype, rows, in, codes, sub_scales, block_scales, mins, out_features, bias, out, out_dtype, threads): "
     "pointers as integers; bias may be 0."},
    {"int8_matmul", int8_matmul, METH_VARARGS,
     "int8_matmul(x, x_dtype, rows, in, weights, row_scales, out_features, bias, out, out_dtype, threads): "
     "pointers as integers; bias may be 0."},
    {"isa", get_isa, METH_NOARGS, "Name of the instruction set the kernels use."},
    {"use_openmp", use_openmp, METH_VARARGS,
     "use_openmp(GOMP_parallel, omp_get_thread_num, omp_get_num_threads): addresses in torch's libgomp, or zeros "
     "for the kernels' own threads."},
    {"supported_isas", supported_isas, METH_NOARGS, "Instruction sets this CPU runs, slowest first."},
    {"set_isa", set_isa, METH_VARARGS, "Use a slower instruction set (for tests and measurements)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "voice._native.qmatmul", "Weight-only int4 and int8 matrix products for few-row inputs.", -1, methods,
};

PyMODINIT_FUNC PyInit_qmatmul(void)
{
    best_isa = active_isa = detect_isa();
    return PyModule_Create(&module);
}
