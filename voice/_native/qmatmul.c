/*
 * Weight-only int4 and int8 matrix products for CPU decoding: out = x @ W.T + bias.
 *
 * Decoding reads every weight once per forward pass, so its speed is set by the bytes
 * the weights take and by how cheaply each byte turns into products. These kernels
 * quantize the few activation rows of a decoding or verification pass to int8, with
 * one scale per group of 32 values (as llama.cpp's Q8_0), and multiply them with the
 * weight bytes in int32 (AVX512-VNNI vpdpbusd, or vpmaddubsw on AVX2).
 *
 * Both kernels keep 16 output rows in the 16 lanes of a vector. Each 32-bit lane takes
 * the products of one output row with 4 adjacent inputs, and those 4 activations are
 * broadcast to all lanes, so an instruction does 64 multiply-adds with no horizontal
 * sum. Per group of 32 inputs the exact int32 sum becomes float once and is scaled for
 * all 16 rows at once. The weights of a group serve every activation row of the call,
 * so a verification pass of 8 rows reads and unpacks them once.
 *
 * Every output value is computed by the same sequence of operations, whatever the
 * number of rows, the row blocking, the thread count and the instruction set. A token's
 * logits are therefore bit-identical in a one-token step and in a verification pass.
 *
 * Layouts (K = in_features, a multiple of 128; N = out_features, a multiple of 16): the
 * weights are stored in tiles of 16 output rows, and a tile's data for group g (inputs
 * 32g to 32g+31) is contiguous, read as 64-byte loads. In every load, bytes 4r to 4r+3
 * belong to row r of the tile.
 * - int4: per tile and group, 256 bytes in 4 loads. In load L, the low nibble of byte
 *   4r + j is the code of input 32g + 8L + j and the high nibble that of input
 *   32g + 8L + 4 + j. sub_scales uint8 and zeros float16: per tile and group, one value
 *   for each of the 16 rows. block_scales float32: per tile and block of 128 inputs, one
 *   value for each of the 16 rows. w = block_scale * sub_scale * (code - 8) + zero.
 * - int8: per tile and group, 512 bytes in 8 loads. In load L, byte 4r + j is
 *   weight + 128 of input 32g + 4L + j. One float32 scale per output row, in row
 *   order: w = scale * weight.
 * - activations and output: float32 or bfloat16, row-major; bias float32 or none.
 *
 * Integer sums cannot overflow: a group adds 32 products of at most 255 * 128.
 *
 * Only the integer products see the rounded activations; the int4 zeros multiply the
 * sum of the group's float activations. Centring the codes on 8 keeps the integer
 * products, and so the rounding error, about half as large as with codes 0 to 15.
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

#define GROUP 32  /* inputs per activation scale and int4 sub-scale and zero */
#define BLOCK 128 /* inputs per int4 block scale */
#define TILE 16 /* output rows per tile: the lanes of one 512-bit vector of float32 */
#define MAX_THREADS 64

enum { DTYPE_FLOAT32 = 0, DTYPE_BFLOAT16 = 1 };
enum { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512_VNNI = 2 };
static const char *ISA_NAMES[] = {"scalar", "avx2", "avx512_vnni"};

/* Activation rows as int8: x = scale[group] * q. */
typedef struct {
    int8_t *q;        /* rows x K */
    float *scales;    /* rows x K/32: amax / 127 of each group */
    float *sums;      /* rows x K/32: sum of the float values of each group (int4 mins) */
    int32_t *centers; /* rows x K/32: 8 * the sum of the group's q (int4 weights) */
    int32_t *offsets; /* rows x K/32: 128 * the sum of the group's q (int8 weights) */
} Activations;

typedef struct {
    int kind; /* 4 or 8 */
    int isa;
    int rows, k, n;
    const Activations *act;
    const uint8_t *weights;
    const uint8_t *sub_scales;  /* int4: (N, K/32) */
    const float *block_scales;  /* int4: (N, K/128) */
    const uint16_t *zeros;      /* int4: float16 (N, K/32) */
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
/* Activation quantization: round to nearest, one scale per group of 32 values         */

static void quantize_activations(const void *x, int dtype, int rows, int k, Activations *act)
{
    const int groups = k / GROUP;
    float values[GROUP];
    for (int r = 0; r < rows; r++) {
        for (int g = 0; g < groups; g++) {
            const size_t base = (size_t)r * k + (size_t)g * GROUP, index = (size_t)r * groups + g;
            float amax = 0.0f, sum = 0.0f;
            for (int i = 0; i < GROUP; i++) {
                values[i] = dtype == DTYPE_FLOAT32 ? ((const float *)x)[base + i] : bf16_to_float(((const uint16_t *)x)[base + i]);
                amax = fmaxf(amax, fabsf(values[i]));
                sum += values[i];
            }
            const float inverse = amax > 0.0f ? 127.0f / amax : 0.0f;
            int32_t codes = 0;
            for (int i = 0; i < GROUP; i++) {
                act->q[base + i] = (int8_t)lrintf(values[i] * inverse);
                codes += act->q[base + i];
            }
            act->scales[index] = amax / 127.0f;
            act->sums[index] = sum;
            act->centers[index] = 8 * codes;
            act->offsets[index] = 128 * codes;
        }
    }
}

/* code of output row `lane` of a tile and input i (0..31) of group g */
static inline int int4_code(const uint8_t *tile_codes, int g, int lane, int i)
{
    const uint8_t byte = tile_codes[(size_t)g * 256 + (i / 8) * 64 + 4 * lane + i % 4];
    return (byte >> (4 * ((i % 8) / 4))) & 0x0f;
}

/* weight of output row `lane` of a tile and input i (0..31) of group g */
static inline int int8_weight(const uint8_t *tile_weights, int g, int lane, int i)
{
    return (int)tile_weights[(size_t)g * 512 + (i / 4) * 64 + 4 * lane + i % 4] - 128;
}

/* ---------------------------------------------------------------------------------- */
/* Scalar kernels: any x86-64, and the reference for the others                        */
/*
 * The kernels of every instruction set perform these float operations in this order for
 * each output value, so their results are bit-identical. Per group, the exact int32 dot
 * product becomes float and is added with a fused multiply-add. int4 multiplies the
 * product with codes - 8 by (block_scale * sub_scale) * activation scale, then adds
 * zero * (sum of the group's activations) with a second one. int8 multiplies the
 * product by the activation scale, and ends with one fused multiply-add of the row
 * scale and the bias.
 */

static void int4_scalar(const Job *job, int n0, int n1)
{
    const int k = job->k, blocks = k / BLOCK, groups = k / GROUP;
    for (int tile = n0 / TILE; tile < n1 / TILE; tile++) {
        const uint8_t *codes = job->weights + (size_t)tile * groups * 256;
        const uint8_t *sub = job->sub_scales + (size_t)tile * groups * TILE;
        const uint16_t *zeros = job->zeros + (size_t)tile * groups * TILE;
        const float *block_scales = job->block_scales + (size_t)tile * blocks * TILE;
        for (int r = 0; r < job->rows; r++) {
            const int8_t *q = job->act->q + (size_t)r * k;
            for (int lane = 0; lane < TILE; lane++) {
                float total = 0.0f;
                for (int g = 0; g < groups; g++) {
                    int32_t dot = -job->act->centers[(size_t)r * groups + g];
                    for (int i = 0; i < GROUP; i++) dot += int4_code(codes, g, lane, i) * q[g * GROUP + i];
                    const int b = g / (BLOCK / GROUP);
                    const float group_scale = block_scales[b * TILE + lane] * (float)sub[g * TILE + lane];
                    const float scale = group_scale * job->act->scales[(size_t)r * groups + g];
                    total = fmaf((float)dot, scale, total);
                    total = fmaf(half_to_float(zeros[g * TILE + lane]), job->act->sums[(size_t)r * groups + g], total);
                }
                if (job->bias) total += job->bias[tile * TILE + lane];
                store_output(job, r, tile * TILE + lane, total);
            }
        }
    }
}

static void int8_scalar(const Job *job, int n0, int n1)
{
    const int k = job->k, groups = k / GROUP;
    for (int tile = n0 / TILE; tile < n1 / TILE; tile++) {
        const uint8_t *weights = job->weights + (size_t)tile * groups * 512;
        for (int r = 0; r < job->rows; r++) {
            const int8_t *q = job->act->q + (size_t)r * k;
            for (int lane = 0; lane < TILE; lane++) {
                const int n = tile * TILE + lane;
                float total = 0.0f;
                for (int g = 0; g < groups; g++) {
                    int32_t dot = 0;
                    for (int i = 0; i < GROUP; i++) dot += int8_weight(weights, g, lane, i) * q[g * GROUP + i];
                    total = fmaf((float)dot, job->act->scales[(size_t)r * groups + g], total);
                }
                store_output(job, r, n, fmaf(total, job->row_scales[n], job->bias ? job->bias[n] : 0.0f));
            }
        }
    }
}

/* ---------------------------------------------------------------------------------- */
/* AVX2 kernels                                                                        */
/*
 * A 256-bit vector contains 8 of a tile's 16 rows, so each tile goes in two halves: the
 * 32-byte half h of every 64-byte load contains rows 8 h to 8 h + 7. Without VNNI, vpmaddubsw
 * multiplies unsigned weight bytes with signed activation bytes into pairs of int16, and
 * vpmaddwd with ones adds the pairs into int32.
 */

#define AVX2_TARGET __attribute__((target("avx2,fma,f16c")))
#define AVX2_ROWS 4 /* activation rows per pass over a half tile */

AVX2_TARGET static inline __m256i avx2_quad(const int8_t *q)
{
    int32_t quad;
    memcpy(&quad, q, sizeof quad);
    return _mm256_set1_epi32(quad);
}

/* the sum of each lane's 4 products of unsigned bytes u and signed bytes s; exact while
 * each pair of products fits in int16 */
AVX2_TARGET static inline __m256i avx2_dot4(__m256i u, __m256i s)
{
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

AVX2_TARGET static inline void avx2_store(const Job *job, int row, int n, __m256 values)
{
    float lanes[8];
    _mm256_storeu_ps(lanes, values);
    for (int lane = 0; lane < 8; lane++) store_output(job, row, n + lane, lanes[lane]);
}

AVX2_TARGET static inline __attribute__((always_inline)) void int4_avx2_half(const Job *job, int tile, int half, int r0, const int RB)
{
    const int k = job->k, blocks = k / BLOCK, groups = k / GROUP;
    const uint8_t *codes = job->weights + (size_t)tile * groups * 256 + 32 * half;
    const uint8_t *sub = job->sub_scales + (size_t)tile * groups * TILE + 8 * half;
    const uint16_t *zeros = job->zeros + (size_t)tile * groups * TILE + 8 * half;
    const float *block_scales = job->block_scales + (size_t)tile * blocks * TILE + 8 * half;
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    __m256 total[AVX2_ROWS];
    for (int j = 0; j < RB; j++) total[j] = _mm256_setzero_ps();
    for (int g = 0; g < groups; g++) {
        const int b = g / (BLOCK / GROUP);
        __m256i dot[AVX2_ROWS];
        for (int j = 0; j < RB; j++) dot[j] = _mm256_setzero_si256();
        for (int load = 0; load < 4; load++) {
            const __m256i bytes = _mm256_loadu_si256((const __m256i *)(codes + (size_t)g * 256 + load * 64));
            const __m256i low = _mm256_and_si256(bytes, low4), high = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4);
            for (int j = 0; j < RB; j++) {
                const int8_t *q = job->act->q + (size_t)(r0 + j) * k + g * GROUP + 8 * load;
                dot[j] = _mm256_add_epi32(dot[j], avx2_dot4(low, avx2_quad(q)));
                dot[j] = _mm256_add_epi32(dot[j], avx2_dot4(high, avx2_quad(q + 4)));
            }
        }
        const __m256 sub_scale = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(sub + g * TILE))));
        const __m256 group_scale = _mm256_mul_ps(_mm256_loadu_ps(block_scales + b * TILE), sub_scale);
        const __m256 zero = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(zeros + g * TILE)));
        for (int j = 0; j < RB; j++) {
            const size_t index = (size_t)(r0 + j) * groups + g;
            const __m256 scale = _mm256_mul_ps(group_scale, _mm256_set1_ps(job->act->scales[index]));
            const __m256i centered = _mm256_sub_epi32(dot[j], _mm256_set1_epi32(job->act->centers[index]));
            total[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(centered), scale, total[j]);
            total[j] = _mm256_fmadd_ps(zero, _mm256_set1_ps(job->act->sums[index]), total[j]);
        }
    }
    const int n = tile * TILE + 8 * half;
    for (int j = 0; j < RB; j++) {
        if (job->bias) total[j] = _mm256_add_ps(total[j], _mm256_loadu_ps(job->bias + n));
        avx2_store(job, r0 + j, n, total[j]);
    }
}

/*
 * The weights are stored as unsigned bytes (weight + 128). vpmaddubsw would saturate
 * at 255 * 127 * 2, so each weight's magnitude is multiplied by the activation with the
 * weight's sign, at most 128 * 127 * 2 per pair.
 */
AVX2_TARGET static inline __attribute__((always_inline)) void int8_avx2_half(const Job *job, int tile, int half, int r0, const int RB)
{
    const int k = job->k, groups = k / GROUP;
    const uint8_t *weights = job->weights + (size_t)tile * groups * 512 + 32 * half;
    const __m256i offset = _mm256_set1_epi8((char)0x80);
    __m256 total[AVX2_ROWS];
    for (int j = 0; j < RB; j++) total[j] = _mm256_setzero_ps();
    for (int g = 0; g < groups; g++) {
        __m256i dot[AVX2_ROWS];
        for (int j = 0; j < RB; j++) dot[j] = _mm256_setzero_si256();
        for (int load = 0; load < 8; load++) {
            const __m256i signed_weights = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(weights + (size_t)g * 512 + load * 64)), offset);
            const __m256i magnitudes = _mm256_abs_epi8(signed_weights);
            for (int j = 0; j < RB; j++) {
                const __m256i q = avx2_quad(job->act->q + (size_t)(r0 + j) * k + g * GROUP + 4 * load);
                dot[j] = _mm256_add_epi32(dot[j], avx2_dot4(magnitudes, _mm256_sign_epi8(q, signed_weights)));
            }
        }
        for (int j = 0; j < RB; j++)
            total[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[j]), _mm256_set1_ps(job->act->scales[(size_t)(r0 + j) * groups + g]), total[j]);
    }
    const int n = tile * TILE + 8 * half;
    const __m256 row_scales = _mm256_loadu_ps(job->row_scales + n);
    const __m256 bias = job->bias ? _mm256_loadu_ps(job->bias + n) : _mm256_setzero_ps();
    for (int j = 0; j < RB; j++) avx2_store(job, r0 + j, n, _mm256_fmadd_ps(total[j], row_scales, bias));
}

#define AVX2_KERNELS(KIND)                                                                                   \
    AVX2_TARGET static void KIND##_avx2_rows1(const Job *job, int tile, int half, int r0) { KIND##_avx2_half(job, tile, half, r0, 1); } \
    AVX2_TARGET static void KIND##_avx2_rows2(const Job *job, int tile, int half, int r0) { KIND##_avx2_half(job, tile, half, r0, 2); } \
    AVX2_TARGET static void KIND##_avx2_rows3(const Job *job, int tile, int half, int r0) { KIND##_avx2_half(job, tile, half, r0, 3); } \
    AVX2_TARGET static void KIND##_avx2_rows4(const Job *job, int tile, int half, int r0) { KIND##_avx2_half(job, tile, half, r0, 4); } \
    AVX2_TARGET static void KIND##_avx2(const Job *job, int n0, int n1)                                      \
    {                                                                                                        \
        static void (*const kernels[AVX2_ROWS + 1])(const Job *, int, int, int) = {                          \
            NULL, KIND##_avx2_rows1, KIND##_avx2_rows2, KIND##_avx2_rows3, KIND##_avx2_rows4};               \
        for (int tile = n0 / TILE; tile < n1 / TILE; tile++)                                                 \
            for (int half = 0; half < 2; half++)                                                             \
                for (int r = 0; r < job->rows; r += AVX2_ROWS)                                               \
                    kernels[job->rows - r < AVX2_ROWS ? job->rows - r : AVX2_ROWS](job, tile, half, r);      \
    }

AVX2_KERNELS(int4)
AVX2_KERNELS(int8)

/* ---------------------------------------------------------------------------------- */
/* AVX512-VNNI kernels                                                                 */
/*
 * A 512-bit vector contains all 16 rows of a tile, 4 weight bytes per 32-bit lane.
 * vpdpbusd multiplies them with 4 activation bytes broadcast to every lane and adds
 * the 4 products to the lane's int32: 64 multiply-adds per instruction, no horizontal
 * sum. With fewer than 4 activation rows the products go into several int32
 * accumulators per row, so consecutive vpdpbusd do not wait for each other. The integer
 * sum is the same whatever the split.
 */

#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))

/* bytes ahead of the weights being read that are prefetched. On the Xeon a 1-row
 * product of an 8960x1536 int4 layer took about 15% less time with 2 KiB than with 512 B. */
#define PREFETCH_BYTES 2048
#define PASS_ROWS 8 /* activation rows per pass over a tile: 8 float and 8 int32 accumulators */

AVX512_TARGET static inline __m512i avx512_quad(const int8_t *q)
{
    int32_t quad;
    memcpy(&quad, q, sizeof quad);
    return _mm512_set1_epi32(quad);
}

/* int32 accumulators per activation row: fewer rows need more chains to keep vpdpbusd busy */
static inline int chains_for(int rows)
{
    if (rows >= 4) return 1;
    if (rows >= 2) return 2;
    return 4;
}

AVX512_TARGET static inline void avx512_store(const Job *job, int row, int n, __m512 values)
{
    if (job->out_dtype == DTYPE_FLOAT32) {
        _mm512_storeu_ps((float *)job->out + (size_t)row * job->n + n, values);
        return;
    }
    float lanes[TILE];
    _mm512_storeu_ps(lanes, values);
    for (int lane = 0; lane < TILE; lane++) store_output(job, row, n + lane, lanes[lane]);
}

/* Rows r0 .. r0 + RB - 1 against one int4 tile. Each 64-byte load of codes gives two
 * vectors: the low nibbles hold inputs 8 L to 8 L + 3 of every row, the high ones the next 4. */
AVX512_TARGET static inline __attribute__((always_inline)) void int4_avx512_tile(const Job *job, int tile, int r0, const int RB)
{
    const int k = job->k, blocks = k / BLOCK, groups = k / GROUP, chains = chains_for(RB);
    const uint8_t *codes = job->weights + (size_t)tile * groups * 256;
    const uint8_t *sub = job->sub_scales + (size_t)tile * groups * TILE;
    const uint16_t *zeros = job->zeros + (size_t)tile * groups * TILE;
    const float *block_scales = job->block_scales + (size_t)tile * blocks * TILE;
    const __m512i low4 = _mm512_set1_epi8(0x0f);
    __m512 total[PASS_ROWS];
    for (int j = 0; j < RB; j++) total[j] = _mm512_setzero_ps();
    for (int g = 0; g < groups; g++) {
        const int b = g / (BLOCK / GROUP);
        const uint8_t *group_codes = codes + (size_t)g * 256;
        for (int line = 0; line < 4; line++) _mm_prefetch((const char *)(group_codes + PREFETCH_BYTES + 64 * line), _MM_HINT_T0);
        __m512i dot[PASS_ROWS][4];
        for (int j = 0; j < RB; j++)
            for (int c = 0; c < chains; c++) dot[j][c] = _mm512_setzero_si512();
#pragma GCC unroll 4
        for (int load = 0; load < 4; load++) {
            const __m512i bytes = _mm512_loadu_si512(group_codes + load * 64);
            const __m512i low = _mm512_and_si512(bytes, low4), high = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low4);
            for (int j = 0; j < RB; j++) {
                const int8_t *q = job->act->q + (size_t)(r0 + j) * k + g * GROUP + 8 * load;
                const int c0 = (2 * load) % chains, c1 = (2 * load + 1) % chains;
                dot[j][c0] = _mm512_dpbusd_epi32(dot[j][c0], low, avx512_quad(q));
                dot[j][c1] = _mm512_dpbusd_epi32(dot[j][c1], high, avx512_quad(q + 4));
            }
        }
        const __m512 sub_scale = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(sub + g * TILE))));
        const __m512 group_scale = _mm512_mul_ps(_mm512_loadu_ps(block_scales + b * TILE), sub_scale);
        const __m512 zero = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(zeros + g * TILE)));
        for (int j = 0; j < RB; j++) {
            const size_t index = (size_t)(r0 + j) * groups + g;
            __m512i sum = _mm512_sub_epi32(dot[j][0], _mm512_set1_epi32(job->act->centers[index]));
            for (int c = 1; c < chains; c++) sum = _mm512_add_epi32(sum, dot[j][c]);
            const __m512 scale = _mm512_mul_ps(group_scale, _mm512_set1_ps(job->act->scales[index]));
            total[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, total[j]);
            total[j] = _mm512_fmadd_ps(zero, _mm512_set1_ps(job->act->sums[index]), total[j]);
        }
    }
    const int n = tile * TILE;
    for (int j = 0; j < RB; j++) {
        if (job->bias) total[j] = _mm512_add_ps(total[j], _mm512_loadu_ps(job->bias + n));
        avx512_store(job, r0 + j, n, total[j]);
    }
}

/* Rows r0 .. r0 + RB - 1 against one int8 tile. The weights are stored as unsigned
 * bytes (weight + 128), as vpdpbusd takes them; 128 times the sum of the group's
 * activation codes is subtracted from each dot product to remove the offset. */
AVX512_TARGET static inline __attribute__((always_inline)) void int8_avx512_tile(const Job *job, int tile, int r0, const int RB)
{
    const int k = job->k, groups = k / GROUP, chains = chains_for(RB);
    const uint8_t *weights = job->weights + (size_t)tile * groups * 512;
    __m512 total[PASS_ROWS];
    for (int j = 0; j < RB; j++) total[j] = _mm512_setzero_ps();
    for (int g = 0; g < groups; g++) {
        const uint8_t *group_weights = weights + (size_t)g * 512;
        for (int line = 0; line < 8; line++) _mm_prefetch((const char *)(group_weights + PREFETCH_BYTES + 64 * line), _MM_HINT_T0);
        __m512i dot[PASS_ROWS][4];
        for (int j = 0; j < RB; j++)
            for (int c = 0; c < chains; c++) dot[j][c] = _mm512_setzero_si512();
#pragma GCC unroll 8
        for (int load = 0; load < 8; load++) {
            const __m512i bytes = _mm512_loadu_si512(group_weights + load * 64);
            for (int j = 0; j < RB; j++) {
                const int8_t *q = job->act->q + (size_t)(r0 + j) * k + g * GROUP + 4 * load;
                dot[j][load % chains] = _mm512_dpbusd_epi32(dot[j][load % chains], bytes, avx512_quad(q));
            }
        }
        for (int j = 0; j < RB; j++) {
            const size_t index = (size_t)(r0 + j) * groups + g;
            __m512i sum = _mm512_sub_epi32(dot[j][0], _mm512_set1_epi32(job->act->offsets[index]));
            for (int c = 1; c < chains; c++) sum = _mm512_add_epi32(sum, dot[j][c]);
            total[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(job->act->scales[index]), total[j]);
        }
    }
    const int n = tile * TILE;
    const __m512 row_scales = _mm512_loadu_ps(job->row_scales + n);
    const __m512 bias = job->bias ? _mm512_loadu_ps(job->bias + n) : _mm512_setzero_ps();
    for (int j = 0; j < RB; j++) avx512_store(job, r0 + j, n, _mm512_fmadd_ps(total[j], row_scales, bias));
}

/*
 * A tile's weights stay in cache while each block of up to 8 activation rows passes
 * over them, so the rows of a prefill read the weights from memory once.
 */
#define AVX512_KERNELS(KIND)                                                                                 \
    AVX512_TARGET static void KIND##_avx512_rows1(const Job *job, int tile, int r0) { KIND##_avx512_tile(job, tile, r0, 1); } \
    AVX512_TARGET static void KIND##_avx512_rows2(const Job *job, int tile, int r0) { KIND##_avx512_tile(job, tile, r0, 2); } \
    AVX512_TARGET static void KIND##_avx512_rows3(const Job *job, int tile, int r0) { KIND##_avx512_tile(job, tile, r0, 3); } \
    AVX512_TARGET static void KIND##_avx512_rows4(const Job *job, int tile, int r0) { KIND##_avx512_tile(job, tile, r0, 4); } \
    AVX512_TARGET static void KIND##_avx512_rows5(const Job *job, int tile, int r0) { KIND##_avx512_tile(job, tile, r0, 5); } \
    AVX512_TARGET static void KIND##_avx512_rows6(const Job *job, int tile, int r0) { KIND##_avx512_tile(job, tile, r0, 6); } \
    AVX512_TARGET static void KIND##_avx512_rows7(const Job *job, int tile, int r0) { KIND##_avx512_tile(job, tile, r0, 7); } \
    AVX512_TARGET static void KIND##_avx512_rows8(const Job *job, int tile, int r0) { KIND##_avx512_tile(job, tile, r0, 8); } \
    AVX512_TARGET static void KIND##_avx512(const Job *job, int n0, int n1)                                  \
    {                                                                                                        \
        static void (*const kernels[PASS_ROWS + 1])(const Job *, int, int) = {                               \
            NULL, KIND##_avx512_rows1, KIND##_avx512_rows2, KIND##_avx512_rows3, KIND##_avx512_rows4,         \
            KIND##_avx512_rows5, KIND##_avx512_rows6, KIND##_avx512_rows7, KIND##_avx512_rows8};              \
        for (int tile = n0 / TILE; tile < n1 / TILE; tile++)                                                 \
            for (int r = 0; r < job->rows; r += PASS_ROWS)                                                   \
                kernels[job->rows - r < PASS_ROWS ? job->rows - r : PASS_ROWS](job, tile, r);                \
    }

AVX512_KERNELS(int4)
AVX512_KERNELS(int8)

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

static void split_rows(const Job *job, int parts, int part, int *n0, int *n1)
{
    const int unit = TILE, units = job->n / unit;
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
    if (threads > job->n / TILE) threads = job->n / TILE; /* a thread's share is whole tiles */
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
    size_t q_bytes = (count + 63) & ~(size_t)63;
    size_t group_bytes = ((count / GROUP) * sizeof(float) + 63) & ~(size_t)63; /* floats and int32s */
    size_t needed = q_bytes + 4 * group_bytes;
    if (needed > scratch_size) {
        free(scratch);
        scratch = NULL;
        scratch_size = 0;
        if (posix_memalign(&scratch, 64, needed) != 0) return -1;
        scratch_size = needed;
    }
    char *base = scratch;
    act->q = (int8_t *)base;
    act->scales = (float *)(base + q_bytes);
    act->sums = (float *)(base + q_bytes + group_bytes);
    act->centers = (int32_t *)(base + q_bytes + 2 * group_bytes);
    act->offsets = (int32_t *)(base + q_bytes + 3 * group_bytes);
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
    if (job->rows < 0 || job->k <= 0 || job->n <= 0 || job->k % BLOCK || job->n % TILE ||
        (x_dtype != DTYPE_FLOAT32 && x_dtype != DTYPE_BFLOAT16) || (job->out_dtype != DTYPE_FLOAT32 && job->out_dtype != DTYPE_BFLOAT16)) {
        PyErr_Format(PyExc_ValueError, "invalid shape or dtype: rows=%d in=%d out=%d (in must be a multiple of %d, out of %d)", job->rows,
                     job->k, job->n, BLOCK, TILE);
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
    Py_ssize_t x, codes, sub_scales, block_scales, zeros, bias, out;
    int x_dtype, threads;
    Job job = {.kind = 4};
    if (!PyArg_ParseTuple(args, "niiinnnninnii", &x, &x_dtype, &job.rows, &job.k, &codes, &sub_scales, &block_scales, &zeros, &job.n, &bias,
                          &out, &job.out_dtype, &threads))
        return NULL;
    job.weights = (const uint8_t *)codes;
    job.sub_scales = (const uint8_t *)sub_scales;
    job.block_scales = (const float *)block_scales;
    job.zeros = (const uint16_t *)zeros;
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
     "int4_matmul(x, x_dtype, rows, in, codes, sub_scales, block_scales, zeros, out_features, bias, out, out_dtype, threads): "
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
