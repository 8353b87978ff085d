/* Compiled float32 transposes for `python -m bench.transpose --compiled`: what a compiled kernel
 * (the classic cache-blocked loops, 8 x 8 AVX register transposes, a staging buffer, a recursive
 * split) gains over the numpy transposes the workers use (weightrelay/transpose.py), timed in the
 * same run on the same arrays. Benchmark only: nothing in the project builds or loads this file.
 *
 * Every function writes dst[c * dld + r] = src[r * sld + c] for r < rows, c < cols (strides in
 * elements); edges that do not fill a block or a register tile are done element by element.
 */
#include <stddef.h>
#include <string.h>

typedef void (*kernel_fn)(const float *, float *, size_t, size_t, size_t, size_t);

static void scalar_tile(const float *s, float *d, size_t rows, size_t cols, size_t sld, size_t dld) {
    for (size_t c = 0; c < cols; c++)
        for (size_t r = 0; r < rows; r++) d[c * dld + r] = s[r * sld + c];
}

/* Blocks of block_rows x block_cols, each done by `tile` (8 x 8 steps) or element by element at the edges. */
static void blocked(const float *s, float *d, size_t rows, size_t cols, size_t sld, size_t dld,
                    size_t block_rows, size_t block_cols, kernel_fn tile) {
    for (size_t r0 = 0; r0 < rows; r0 += block_rows)
        for (size_t c0 = 0; c0 < cols; c0 += block_cols) {
            size_t nr = rows - r0 < block_rows ? rows - r0 : block_rows, nc = cols - c0 < block_cols ? cols - c0 : block_cols;
            tile(s + r0 * sld + c0, d + c0 * dld + r0, nr, nc, sld, dld);
        }
}

void wr_scalar_blocked(const float *s, float *d, size_t rows, size_t cols, size_t sld, size_t dld) {
    blocked(s, d, rows, cols, sld, dld, 32, 32, scalar_tile);
}

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define WR_AVX __attribute__((target("avx")))

int wr_has_avx(void) { return __builtin_cpu_supports("avx"); }

static inline WR_AVX void avx8(const float *s, float *d, size_t sld, size_t dld) {
    __m256 r0 = _mm256_loadu_ps(s), r1 = _mm256_loadu_ps(s + sld), r2 = _mm256_loadu_ps(s + 2 * sld), r3 = _mm256_loadu_ps(s + 3 * sld);
    __m256 r4 = _mm256_loadu_ps(s + 4 * sld), r5 = _mm256_loadu_ps(s + 5 * sld), r6 = _mm256_loadu_ps(s + 6 * sld), r7 = _mm256_loadu_ps(s + 7 * sld);
    __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1), t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
    __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5), t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
    __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE), u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE), u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    _mm256_storeu_ps(d, _mm256_permute2f128_ps(u0, u4, 0x20));
    _mm256_storeu_ps(d + dld, _mm256_permute2f128_ps(u1, u5, 0x20));
    _mm256_storeu_ps(d + 2 * dld, _mm256_permute2f128_ps(u2, u6, 0x20));
    _mm256_storeu_ps(d + 3 * dld, _mm256_permute2f128_ps(u3, u7, 0x20));
    _mm256_storeu_ps(d + 4 * dld, _mm256_permute2f128_ps(u0, u4, 0x31));
    _mm256_storeu_ps(d + 5 * dld, _mm256_permute2f128_ps(u1, u5, 0x31));
    _mm256_storeu_ps(d + 6 * dld, _mm256_permute2f128_ps(u2, u6, 0x31));
    _mm256_storeu_ps(d + 7 * dld, _mm256_permute2f128_ps(u3, u7, 0x31));
}

/* A block in 8 x 8 register tiles, column tiles outer (each destination row's piece written whole). */
static WR_AVX void avx_tile(const float *s, float *d, size_t rows, size_t cols, size_t sld, size_t dld) {
    size_t full_rows = rows & ~(size_t)7, full_cols = cols & ~(size_t)7;
    for (size_t c = 0; c < full_cols; c += 8)
        for (size_t r = 0; r < full_rows; r += 8) avx8(s + r * sld + c, d + c * dld + r, sld, dld);
    scalar_tile(s + full_rows * sld, d + full_rows, rows - full_rows, cols, sld, dld);
    scalar_tile(s + full_cols, d + full_cols * dld, full_rows, cols - full_cols, sld, dld);
}

void wr_avx_blocked_32(const float *s, float *d, size_t rows, size_t cols, size_t sld, size_t dld) {
    blocked(s, d, rows, cols, sld, dld, 32, 32, avx_tile);
}

void wr_avx_blocked_64x16(const float *s, float *d, size_t rows, size_t cols, size_t sld, size_t dld) {
    blocked(s, d, rows, cols, sld, dld, 64, 16, avx_tile);
}

/* Blocks of 1024 x 1024 (in the last-level cache), each in blocks of 64 x 64. */
static WR_AVX void avx_64(const float *s, float *d, size_t rows, size_t cols, size_t sld, size_t dld) {
    blocked(s, d, rows, cols, sld, dld, 64, 64, avx_tile);
}

void wr_avx_two_level(const float *s, float *d, size_t rows, size_t cols, size_t sld, size_t dld) {
    blocked(s, d, rows, cols, sld, dld, 1024, 1024, avx_64);
}

/* 256 rows x 64 columns copied into a buffer whose rows are not a power of two apart, then transposed from it. */
#define STAGE_ROWS 256
#define STAGE_COLS 64
#define STAGE_LD (STAGE_COLS + 8)
static WR_AVX void staged_tile(const float *s, float *d, size_t rows, size_t cols, size_t sld, size_t dld) {
    static _Thread_local float stage[STAGE_ROWS * STAGE_LD];
    for (size_t r = 0; r < rows; r++) memcpy(stage + r * STAGE_LD, s + r * sld, cols * sizeof(float));
    avx_tile(stage, d, rows, cols, STAGE_LD, dld);
}

void wr_avx_staged(const float *s, float *d, size_t rows, size_t cols, size_t sld, size_t dld) {
    blocked(s, d, rows, cols, sld, dld, STAGE_ROWS, STAGE_COLS, staged_tile);
}

/* Halves the longer side until a block is at most 32 x 32 (cache-oblivious). */
void wr_avx_recursive(const float *s, float *d, size_t rows, size_t cols, size_t sld, size_t dld) {
    if (rows <= 32 && cols <= 32) {
        avx_tile(s, d, rows, cols, sld, dld);
    } else if (rows >= cols) {
        wr_avx_recursive(s, d, rows / 2, cols, sld, dld);
        wr_avx_recursive(s + rows / 2 * sld, d + rows / 2, rows - rows / 2, cols, sld, dld);
    } else {
        wr_avx_recursive(s, d, rows, cols / 2, sld, dld);
        wr_avx_recursive(s + cols / 2, d + cols / 2 * dld, rows, cols - cols / 2, sld, dld);
    }
}
/* numpy's two passes (weightrelay/transpose.py) in C, in blocks of B x B: the block's rows as chunks of 4
 * floats into a scratch whose rows are not a power of two apart (row k: chunk k of every row, 4 rows per
 * cache line), then each 4 x 4 square of the scratch, read in order, transposed in registers into 4 rows of
 * the result. B: the largest of 512, 256, 128, 64 that the matrix holds; what whole blocks leave goes to avx_tile. */
#define TWO_PASS_BLOCK 512
#define TWO_PASS_ROW (4 * TWO_PASS_BLOCK + 16)
static WR_AVX void two_pass_block(const float *s, float *d, size_t sld, size_t dld, size_t B, float *scratch) {
    for (size_t i = 0; i < B; i += 4)
        for (size_t k = 0; k < B / 4; k++) {
            float *o = scratch + k * TWO_PASS_ROW + i * 4;
            _mm_store_ps(o, _mm_loadu_ps(s + i * sld + 4 * k));
            _mm_store_ps(o + 4, _mm_loadu_ps(s + (i + 1) * sld + 4 * k));
            _mm_store_ps(o + 8, _mm_loadu_ps(s + (i + 2) * sld + 4 * k));
            _mm_store_ps(o + 12, _mm_loadu_ps(s + (i + 3) * sld + 4 * k));
        }
    for (size_t k = 0; k < B / 4; k++) {
        const float *row = scratch + k * TWO_PASS_ROW;
        float *t = d + 4 * k * dld;
        for (size_t b = 0; b < B / 4; b++) {
            __m128 a0 = _mm_load_ps(row + 16 * b), a1 = _mm_load_ps(row + 16 * b + 4);
            __m128 a2 = _mm_load_ps(row + 16 * b + 8), a3 = _mm_load_ps(row + 16 * b + 12);
            _MM_TRANSPOSE4_PS(a0, a1, a2, a3);
            _mm_storeu_ps(t + 4 * b, a0);
            _mm_storeu_ps(t + dld + 4 * b, a1);
            _mm_storeu_ps(t + 2 * dld + 4 * b, a2);
            _mm_storeu_ps(t + 3 * dld + 4 * b, a3);
        }
    }
}

void wr_two_pass(const float *s, float *d, size_t rows, size_t cols, size_t sld, size_t dld) {
    static _Thread_local _Alignas(64) float scratch[TWO_PASS_BLOCK / 4 * TWO_PASS_ROW];  /* 1 MiB, kept */
    size_t B = TWO_PASS_BLOCK;
    while (B > 64 && (rows < B || cols < B)) B /= 2;
    if (rows < B || cols < B) {
        avx_tile(s, d, rows, cols, sld, dld);
        return;
    }
    size_t full_rows = rows / B * B, full_cols = cols / B * B;
    for (size_t r0 = 0; r0 < full_rows; r0 += B)
        for (size_t c0 = 0; c0 < full_cols; c0 += B) two_pass_block(s + r0 * sld + c0, d + c0 * dld + r0, sld, dld, B, scratch);
    avx_tile(s + full_rows * sld, d + full_rows, rows - full_rows, cols, sld, dld);
    avx_tile(s + full_cols, d + full_cols * dld, full_rows, cols - full_cols, sld, dld);
}
#else
int wr_has_avx(void) { return 0; }
#endif
