// bfloat16 products for MatMulBF16 (amx_bf16.cpp on AMX, avx512_bf16.cpp on AVX512-BF16; ops.cpp
// uses them).
#pragma once

#include <cstddef>
#include <cstdint>

namespace edgetune {

constexpr size_t BF16_TILE_K = 32;  // bfloat16 values of the inner dimension per tile

uint16_t to_bf16(float f);  // round to nearest even, as PyTorch and Intel's conversions do
float from_bf16(uint16_t h);

// Whether this CPU has AMX with bfloat16 and the kernel grants the tile state to this process.
bool amx_bf16_usable();

// B [K, N] (trans_b: B = w^T with w [N, K]; else B = w with w [K, N]; w has n_cols columns) into
// tiles of 32 x 16, zero-padded to K and N rounded up to 32: for each 16 columns of N, each
// 32 rows of K as 16 pairs of rows, interleaved by column (AMX's bfloat16 layout for B).
void pack_b(const uint16_t* w, size_t n_cols, bool trans_b, size_t K, size_t N, uint16_t* out);

// pack_b of B's columns [n0, n0 + cols) only (B [K, N]: w^T with w [N, K] when trans_b, else w
// [K, N]), laid out as pack_b lays out a B of cols columns; with AVX512-BF16, a w
// [K, N] interleaves 16 columns of two rows per instruction, and a w [N, K] is transposed 16 rows
// by 16 pairs at a time.
void pack_b_cols(const uint16_t* w, bool trans_b, size_t K, size_t N, size_t n0, size_t cols, uint16_t* out);

// Up to 32 rows of C = A B (M <= 32 of them valid, N columns, row stride ldc floats), from 32
// rows of A in bfloat16 (row stride lda values, lda a multiple of 32, zero-padded past K) and B
// packed by pack_b, KB tiles deep. C is overwritten.
void amx_bf16_rows(const uint16_t* a, size_t lda, const uint16_t* packed, size_t KB, size_t M, size_t N, float* c,
                   size_t ldc);

// Up to 32 rows of y = x w^T (M of them valid; x [M, K] float32 rounded to bfloat16, w [N, K]
// bfloat16 as stored, no packing; y's row stride ldy). Needs K % 32 == 0 and N % 32 == 0.
void amx_bf16_rows_wt(const float* x, size_t M, size_t K, const uint16_t* w, size_t N, float* y, size_t ldy);

// Whether this CPU has AVX512-BF16 (with AVX512 F, BW and VL) and the OS saves the AVX-512 state.
bool avx512_bf16_usable();

// Rows [16 g, 16 g + 16) of x [M, K] (float32) rounded to bfloat16 into panel g of `out`, the
// layout avx512_bf16_cols reads: per 16 rows, ceil(K / 32) tiles of 512 values (pairs of k
// interleaved by row), zero past M and K.
void avx512_bf16_pack_rows(const float* x, size_t M, size_t K, size_t g, uint16_t* out);

// A low-rank term p q added to a product's sums (a LoRA branch): p [M, r] (row stride r, scaled
// already), q [r, cols] (row stride ldq, from the block's first column).
struct LowRank {
  const float* p;
  size_t r;
  const float* q;
  size_t ldq;
};

// y[M, cols] (row stride ldy) = x w with AVX512-BF16 for one block of up to 32 of w's columns: x's
// rows packed by avx512_bf16_pack_rows, the columns by pack_b_cols (64-byte aligned). With y16, y
// is rounded to bfloat16 (nearest even) into y16 (row stride ldy) instead; with add (row stride
// ldy), y = x w + add, each sum added once as it is stored. With next, the cache lines next + i
// next_stride (i < next_lines) are prefetched into L2 while the rows are multiplied: the source of
// the columns that come next. With low (not with y16), low's p q is added to the sums in float32
// before add is.
void avx512_bf16_cols(const uint16_t* rows, size_t M, size_t K, const uint16_t* panel, size_t cols, float* y,
                      size_t ldy, uint16_t* y16 = nullptr, const float* add = nullptr, const char* next = nullptr,
                      size_t next_lines = 0, size_t next_stride = 0, const LowRank* low = nullptr);

// amx_bf16_rows_wt with vdpbf16ps, for a few rows (no packing of w); needs only K even.
void avx512_bf16_rows_wt(const float* x, size_t M, size_t K, const uint16_t* w, size_t N, float* y, size_t ldy);

// The vocabulary loss of n rows (n <= 64 is best) of h [n, D] (float32, rounded to bfloat16) against
// the entries [v_begin, v_end) of the projection h w^T (w [V, D] bfloat16 as stored), with
// AVX512-BF16 (ce_bf16.cpp), as an online softmax leaves it: per row the largest score m, the sum s
// of exp(score - m), and (G given) G [n, D] = sum of exp(score - m) w_j over those entries.
void avx512_bf16_ce_part(const float* h, size_t n, size_t D, const uint16_t* w, size_t v_begin, size_t v_end, float* m,
                         float* s, float* G);

constexpr size_t CE_PARTS = 4;  // vocabulary slices at most

// The rows' losses (0 where labels[r] == ignore) and (G given) d loss[r] / d h[r] from `parts`
// (<= CE_PARTS) slices' m, s (slice p's at p * stride) and Gs[p] [n, D], read in slice order
// (plain C++; labels in [0, V) or ignore).
void ce_bf16_finish(const float* h, size_t n, size_t D, const uint16_t* w, const int64_t* labels, int64_t ignore,
                    size_t parts, size_t stride, const float* m, const float* s, float* const* Gs, float* loss,
                    float* G);

// rows x K floats (row stride K) to bfloat16 rows of lda values (lda >= K), zero-padded past K;
// rounded to nearest even (with AVX512-BF16's conversion where the CPU has it).
void rows_to_bf16(const float* a, size_t rows, size_t K, uint16_t* out, size_t lda);

}  // namespace edgetune
