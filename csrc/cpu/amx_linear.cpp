// bf16 linear on AMX tiles over a weight packed once at load (packed_linear.h). Every output row is
// summed the same way whatever the number of rows: one fp32 accumulator tile per 16 x 16 outputs, one
// tdpbf16ps per 32-feature block of K in order, then the bias, then one rounding to bf16. A tile
// row's sums use only that row of the input, so a row's bits do not depend on the batch at any row
// count; oneDNN's AMX matmul gives no such guarantee (it changes its sums between 32 and 33 rows,
// among others). One B tile is 16 pairs of one column block: 1 KiB, contiguous.
//
// bf16_amx_linear_act_and_mul takes a gated MLP's packed gate_up weight. The 32 columns one pass of
// the kernel sums are then a gate block and its up block, and it stores act(gate) * up instead of
// both: the [rows, 2 * d] projection is never written, nor read back by act_and_mul.
//
// bf16_amx_linear_argmax keeps, instead of the outputs, each row's first maximum among them (an LM
// head's greedy token): the [rows, vocab] logits are never written, nor read back by argmax.

#include "vec.h"  // first: selects ATen's vector width

#include "amx.h"
#include "l2_prefetch.h"
#include "ops.h"
#include "packed_linear.h"
#include "parallel.h"

#include <algorithm>
#include <cstring>
#include <optional>
#include <string>

namespace pagedlm::cpu {
namespace {

constexpr int64_t kTileN = kPackN;  // output columns per B tile
constexpr int64_t kTileK = kPackK;  // input features per tdpbf16ps
constexpr int64_t kTileM = 16;  // rows per A tile

#ifdef PAGEDLM_AMX

// Weights of the column blocks that every row tile passes over in turn stay in L2 (2 MiB per core
// here) as a panel. From 33 to 256 rows (2 to 8 passes) the next panel is asked into L2, a few lines
// per step of K, over all the passes of the current one, the first included (which then reads its
// own panel from L2, asked for during the panel before), in panels of 256 KiB: two of them and the
// rows' inputs fit in L2. Against the prefetch over the passes after the first only, from 97 rows on
// (benchmarks/linear_bench.py): SmolLM2's 121 linears 11-15% faster at 96-112 rows and 4-10% at
// 40-64, Qwen2-0.5B's 6-9% at 64-128, neither changed at 200-256. With one pass there is nothing to
// hide the stream behind; with more than 8, the rows' inputs, read again for every panel, no longer
// fit beside it, and 512 KiB panels without a prefetch measured faster (SmolLM2's linears 15-25%
// slower at 2,048 rows with 256 KiB panels).
bool prefetches_panels(int64_t rows) { return rows > 32 && rows <= 256; }
int64_t panel_bytes(int64_t rows) { return prefetches_panels(rows) ? 256 << 10 : 512 << 10; }

// Tiles: C 0..3 ([row tile][column tile]), A 4..5 (row tiles), B 6..7 (column tiles).
void configure(int m0, int m1) {
  amx::TileConfig cfg;
  for (int t : {0, 1, 4}) cfg.set(t, m0, 64);
  if (m1 > 0)
    for (int t : {2, 3, 5}) cfg.set(t, m1, 64);
  for (int t : {6, 7}) cfg.set(t, 16, 64);
  cfg.load();
}

// A block of sums in memory, waiting for its bias and its rounding to bf16 (and, gated, its
// activation; with argmax set, a comparison with the row's maximum so far instead of a store).
struct PendingBlock {
  const float* sums = nullptr;  // row stride 32 floats
  at::BFloat16* out = nullptr;  // the block's first output, row stride ldy
  const float* bias = nullptr;  // the block's first column's (gated: its gate column's), or null
  const float* up_bias = nullptr;  // gated: the up column's, or null
  int64_t ldy = 0, cols = 0;
  int rows = 0, done = 0;
  const uint16_t* table = nullptr;  // gated: the activation's table (bf16_activation_table)
  RowArgmax* argmax = nullptr;
  int64_t row0 = 0, col0 = 0;  // argmax: the block's first row and column

  // Inlined into tile_sums' loop, which calls it every step of K: as a call (12.5% of the kernel's
  // samples) a [1024, 224 x 576] linear ran 5% slower.
  PAGEDLM_ALWAYS_INLINE void finish_rows(int end) {
    if (!argmax && !table) {  // the common kind, decided once rather than row by row
      // Whole blocks with the column count a constant (one 64-byte store a row): a runtime count
      // measured 3-7% slower per product at 128 rows.
      if (cols == 32) {
        for (; done < end; ++done) store_sums_bf16(out + done * ldy, sums + done * 32, bias, 32);
      } else {
        for (; done < end; ++done) store_sums_bf16(out + done * ldy, sums + done * 32, bias, cols);
      }
      return;
    }
    for (; done < end; ++done) {
      const float* row_sums = sums + done * 32;
      if (argmax) {
        argmax->update_bf16_sums(row0 + done, col0, row_sums, bias, cols);
        continue;
      }
      store_act_and_mul_bf16(out + done * ldy, row_sums, row_sums + kTileN, bias, up_bias, table, kTileN);
    }
  }
};

// c[0..32)[0..32) (row stride 32 floats) = up to 32 rows x 32 columns of sums. The rows' features
// come from a (row stride lda elements) for the first full_blocks blocks of K, then from tail
// (row stride 32 elements, zero-padded). The previous block is rounded and written a few rows per
// step of K while this block's products run: written all at once between two blocks, its stores'
// cache misses held the fill buffers that the tile loads need, and a 2,048-row linear ran ~15%
// slower (benchmarks/linear_bench.py).
//
// Where the weights are in L2 (b_in_l2: every pass after a panel's first, and the first pass of a panel
// that the panel before asked into L2), B tiles are loaded with tileloaddt1, which does not keep them
// in L1: the row tiles' inputs (36 KiB at K = 576) then stay in L1 across the column blocks, and only B
// comes from L2. A 2,048-row [3072, 576] linear ran 12-15% faster; SmolLM2's 120 layer linears 1-4%
// faster at 64-200 rows with the prefetched first passes included. A first pass from memory loads B as
// usual: there the hint cost 5-15% at 64-128 rows.
template <bool TWO_M, bool TWO_N>
void tile_sums(const at::BFloat16* a, int64_t lda, const at::BFloat16* tail, int64_t full_blocks,
               int64_t blocks, const at::BFloat16* b0, const at::BFloat16* b1, bool b_in_l2, float* c,
               PendingBlock& previous, L2Prefetch& prefetch) {
  _tile_zero(0);
  if constexpr (TWO_N) _tile_zero(1);
  if constexpr (TWO_M) {
    _tile_zero(2);
    if constexpr (TWO_N) _tile_zero(3);
  }
  for (int64_t kb = 0; kb < blocks; ++kb) {
    previous.finish_rows(static_cast<int>((kb + 1) * previous.rows / blocks));
    prefetch.issue();
    const bool full = kb < full_blocks;
    const at::BFloat16* ak = full ? a + kb * kTileK : tail;
    const int64_t stride = (full ? lda : kTileK) * 2;
    _tile_loadd(4, ak, stride);
    if (b_in_l2) {
      _tile_stream_loadd(6, b0 + kb * kTileK * kTileN, 64);
      if constexpr (TWO_N) _tile_stream_loadd(7, b1 + kb * kTileK * kTileN, 64);
    } else {
      _tile_loadd(6, b0 + kb * kTileK * kTileN, 64);
      if constexpr (TWO_N) _tile_loadd(7, b1 + kb * kTileK * kTileN, 64);
    }
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (TWO_M) _tile_loadd(5, ak + kTileM * stride / 2, stride);
    if constexpr (TWO_N) _tile_dpbf16ps(1, 4, 7);
    if constexpr (TWO_M) {
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (TWO_N) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, 128);
  if constexpr (TWO_N) _tile_stored(1, c + 16, 128);
  if constexpr (TWO_M) {
    _tile_stored(2, c + 16 * 32, 128);
    if constexpr (TWO_N) _tile_stored(3, c + 16 * 32 + 16, 128);
  }
}

// act unset: y [M, N] = input @ W.T + bias. act set: y [M, d] = act(gate) * up over a gate_up weight
// packed by amx_pack_gate_up_weight, bias [2 * d] in gate, up order. argmax set: no y; each row's
// greedy token over input @ W.T + bias (rounded to bf16) merged into *argmax.
void amx_linear_kernel(at::BFloat16* y, int64_t ldy, int64_t N, const at::Tensor& input, const at::Tensor& weight,
                       const float* bias, std::optional<Activation> act, RowArgmax* argmax) {
  const uint16_t* table = act ? bf16_activation_table(*act) : nullptr;
  const int64_t M = input.size(0), K = input.size(1);
  const int64_t k_pad = weight.size(1) * 2, n_blocks = weight.size(0);
  const int64_t full_blocks = K / kTileK, blocks = k_pad / kTileK, tail_k = K - full_blocks * kTileK;
  const auto* x = input.data_ptr<at::BFloat16>();
  const auto* w = weight.data_ptr<at::BFloat16>();
  const int64_t lda = input.stride(0);
  const int64_t units = (n_blocks + 1) / 2;  // pairs of column blocks: 32 output columns
  const int64_t unit_bytes = k_pad * 2 * kTileN * 2;
  // Column units whose weights stay in L2 while every row tile passes over them.
  const int64_t units_per_panel = std::max<int64_t>(1, panel_bytes(M) / unit_bytes);
  const int64_t unit_elements = unit_bytes / 2, w_elements = n_blocks * k_pad * kTileN;
  parallel_for(0, units, grain_for(unit_elements * std::min<int64_t>(M, 2 * kTileM)), [&](int64_t begin, int64_t end) {
    alignas(64) float c[2][32 * 32];  // this block's sums and the pending block's
    alignas(64) at::BFloat16 tail[2 * kTileM * kTileK];
    PendingBlock pending;
    TaskArgmax seen(argmax, M);  // argmax: this task's columns
    int configured = -1;
    for (int64_t p0 = begin; p0 < end; p0 += units_per_panel) {
      const int64_t p1 = std::min(end, p0 + units_per_panel);
      L2Prefetch prefetch;
      for (int64_t m = 0; m < M; m += 2 * kTileM) {
        if (m == 0 && prefetches_panels(M)) {
          // Offsets clamped to the weight: the last unit may hold one column block.
          const int64_t next = std::min(p1 * unit_elements, w_elements);
          const int64_t next_end = std::min(std::min(end, p1 + units_per_panel) * unit_elements, w_elements);
          const int64_t passes = (M + 2 * kTileM - 1) / (2 * kTileM);
          prefetch = L2Prefetch(w + next, w + next_end, passes * (p1 - p0) * blocks);
        }
        const int mr = static_cast<int>(std::min<int64_t>(2 * kTileM, M - m));
        if (mr != configured) {
          configure(std::min<int>(mr, kTileM), std::max<int>(mr - kTileM, 0));
          configured = mr;
        }
        const at::BFloat16* a = x + m * lda;
        const bool b_in_l2 = m > 0 || (prefetches_panels(M) && p0 > begin);
        if (tail_k > 0) {  // the last, partial block of K, zero-padded: tile rows read 64 bytes
          std::memset(tail, 0, sizeof(tail));
          for (int r = 0; r < mr; ++r) std::memcpy(tail + r * kTileK, a + r * lda + full_blocks * kTileK, tail_k * 2);
        }
        for (int64_t u = p0; u < p1; ++u) {
          const int64_t nb = 2 * u;
          const bool two_n = nb + 1 < n_blocks;
          const at::BFloat16* b0 = w + nb * k_pad * kTileN;
          float* sums = c[pending.sums == c[0] ? 1 : 0];
          if (mr > kTileM) {
            if (two_n) tile_sums<true, true>(a, lda, tail, full_blocks, blocks, b0, b0 + k_pad * kTileN, b_in_l2, sums, pending, prefetch);
            else tile_sums<true, false>(a, lda, tail, full_blocks, blocks, b0, nullptr, b_in_l2, sums, pending, prefetch);
          } else {
            if (two_n) tile_sums<false, true>(a, lda, tail, full_blocks, blocks, b0, b0 + k_pad * kTileN, b_in_l2, sums, pending, prefetch);
            else tile_sums<false, false>(a, lda, tail, full_blocks, blocks, b0, nullptr, b_in_l2, sums, pending, prefetch);
          }
          if (argmax) {
            const int64_t n0 = nb * kTileN;
            pending = {sums, nullptr, bias ? bias + n0 : nullptr, nullptr, 0,
                       std::min<int64_t>(two_n ? 32 : 16, N - n0), mr, 0, nullptr, seen.get(), m, n0};
          } else if (table) {
            const int64_t n0 = u * kTileN;
            pending = {sums, y + m * ldy + n0, bias ? bias + n0 : nullptr, bias ? bias + N + n0 : nullptr,
                       ldy, kTileN, mr, 0, table};
          } else {
            const int64_t n0 = nb * kTileN;
            pending = {sums, y + m * ldy + n0, bias ? bias + n0 : nullptr, nullptr, ldy,
                       std::min<int64_t>(two_n ? 32 : 16, N - n0), mr, 0, nullptr};
          }
        }
      }
    }
    pending.finish_rows(pending.rows);
    _tile_release();
  });
}

#endif

void check_amx(const char* op) {
#ifdef PAGEDLM_AMX
  TORCH_CHECK(amx::permitted(), op, ": AMX is off (PAGEDLM_DISABLE_AMX=1, or the kernel refused "
              "arch_prctl ARCH_REQ_XCOMP_PERM)");
#else
  TORCH_CHECK(false, op, " needs pagedlm._C built with AMX-BF16 (this build has no tdpbf16ps)");
#endif
}

void run_amx_linear(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                    std::optional<Activation> act, const char* op) {
  check_amx(op);
#ifdef PAGEDLM_AMX
  if (input.size(0) == 0 || out.size(1) == 0) return;
  amx_linear_kernel(out.data_ptr<at::BFloat16>(), out.stride(0), out.size(1), input, weight,
                    bias.defined() ? bias.data_ptr<float>() : nullptr, act, nullptr);
#endif
}

void run_amx_argmax(RowArgmax& tokens, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                    int64_t N, const char* op) {
  check_amx(op);
#ifdef PAGEDLM_AMX
  if (input.size(0) == 0) return;
  amx_linear_kernel(nullptr, 0, N, input, weight, bias.defined() ? bias.data_ptr<float>() : nullptr, std::nullopt,
                    &tokens);
#endif
}

}  // namespace

void bf16_amx_linear(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias) {
  packed_linear_op(run_amx_linear, out, input, weight, bias, at::kBFloat16, "bf16_amx_linear");
}

void bf16_amx_linear_act_and_mul(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, c10::string_view activation) {
  packed_act_and_mul_op(run_amx_linear, out, input, weight, bias, activation, at::kBFloat16,
                        "bf16_amx_linear_act_and_mul");
}

void bf16_amx_linear_argmax(at::Tensor& token_ids, const at::Tensor& input, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, int64_t out_features) {
  packed_argmax_op(run_amx_argmax, token_ids, input, weight, bias, out_features, at::kBFloat16,
                   "bf16_amx_linear_argmax");
}

}  // namespace pagedlm::cpu
