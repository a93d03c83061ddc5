// bf16 linear at any row count, read straight from the weight oneDNN keeps for `Linear` (layout
// AB16b64a2b) and summed in oneDNN's own order, so that a row gets the bits oneDNN's matmul gives it
// (batch invariance, and transformers' bits): at the weights' streaming rate for few rows, where
// oneDNN's bf16 matmul reads them at about half the copy bandwidth, and without oneDNN's libgomp
// region at every row count (docs/performance.md). bf16_blocked_linear_argmax keeps each row's first
// maximum among the outputs instead of storing them (an LM head's greedy token), as
// bf16_amx_linear_argmax does.
//
// Layout: 64 output columns by 32 input features per block, blocks [n / 64][k / 32]; inside a block,
// for each pair (2p, 2p + 1) of input features, the 64 columns' two weights. So each 64-column block
// is one run of [K_padded / 2][64][2] bf16, zero-padded to whole blocks.
//
// Order (found by pagedlm/model_executor/layers/onednn_order.py and checked against oneDNN at load):
// K splits into chunks [0, e0), [e0, e1), ...; each chunk is one fp32 chain over its feature pairs in
// order, one vdpbf16ps step per pair (the odd feature's product added first, then the even one's);
// the chunk sums are added left to right, then the bias, and the result rounded to bf16 (RNE).
#include "vec.h"

#include "../checks.h"
#include "activation.h"
#include "aligned_vector.h"
#include "l2_prefetch.h"
#include "mkldnn_tensor.h"
#include "ops.h"
#include "packed_linear.h"
#include "parallel.h"
#include "weight_read_ahead.h"

#include <algorithm>
#include <cstring>
#include <vector>

namespace pagedlm::cpu {
namespace {

constexpr int64_t kBlockN = 64;
constexpr int64_t kBlockK = 32;

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// The bytes of an [N, K] weight in the AB16b64a2b layout: whole 64 x 32 blocks.
int64_t blocked_weight_bytes(int64_t N, int64_t K) { return round_up(N, kBlockN) * round_up(K, kBlockK) * 2; }

#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)

constexpr int kMaxTileRows = 6;  // 6 rows x 4 vectors of accumulators, 4 weight vectors, 1 broadcast

// How far ahead of its reads a pass that streams a block from memory asks for the weights: the
// out-of-order window alone keeps ~3 KB in flight at 6 rows, less than memory's latency needs.
// 8 KB measured best of 2-32 KB (benchmarks/linear_bench.py; docs/performance.md, session 22).
constexpr int64_t kStreamAheadBytes = 8192;

// The pass that reads a block from memory asks for each step's lines kStreamAheadBytes ahead, into
// L2 (prefetcht1): a request into L1 holds one of the core's few L1 fill buffers until its line
// arrives, and on the Zen 4 of docs/performance.md (session 24) the linears at 1-16 rows ran 3-10%
// faster asking into L2. Past the block's end, `jump` bytes further on, where the block the thread
// reads next begins.
struct StreamAhead {
  bool on = false;
  const char* block_end = nullptr;
  int64_t jump = 0;

  const char* target(const void* read) const {
    const char* a = static_cast<const char*>(read) + kStreamAheadBytes;
    return a < block_end ? a : a + jump;
  }
};

// sum[r][0..64) (+)= rows r of x against one 64-column block over the feature pairs [p0, p1). A
// pair is one 32-bit lane, its even feature in the low half; the pair past an odd K holds only its
// even feature. Each step also issues pf's next prefetches and, with `ahead` on, asks for the step's
// four lines ahead.
template <int MT>
PAGEDLM_ALWAYS_INLINE void chain(const at::BFloat16* x, int64_t x_stride, int64_t K, const __m512bh* w, int64_t p0,
                                 int64_t p1, bool first, float* sum, L2Prefetch& pf, const StreamAhead& ahead) {
  __m512 acc[MT][4];
  for (int r = 0; r < MT; ++r)
    for (int t = 0; t < 4; ++t) acc[r][t] = _mm512_setzero_ps();
  auto step = [&](int64_t p, auto pair) {
    const __m512bh* wp = w + 4 * p;
    const __m512bh w0 = wp[0], w1 = wp[1], w2 = wp[2], w3 = wp[3];
    pf.issue();
    if (ahead.on) {
      const char* a = ahead.target(wp);
      for (int line = 0; line < 4; ++line) _mm_prefetch(a + 64 * line, _MM_HINT_T1);
    }
    for (int r = 0; r < MT; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair(x + r * x_stride + 2 * p));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, w0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, w1);
      acc[r][2] = _mm512_dpbf16_ps(acc[r][2], a, w2);
      acc[r][3] = _mm512_dpbf16_ps(acc[r][3], a, w3);
    }
  };
  const int64_t whole = std::min(p1, K / 2);
  for (int64_t p = p0; p < whole; ++p) step(p, [](const at::BFloat16* q) {
    int v;
    std::memcpy(&v, q, 4);
    return v;
  });
  if (whole < p1) step(whole, [](const at::BFloat16* q) { return static_cast<int>(q->x); });
  for (int r = 0; r < MT; ++r)
    for (int t = 0; t < 4; ++t) {
      float* s = sum + r * kBlockN + t * 16;
      _mm512_storeu_ps(s, first ? acc[r][t] : _mm512_add_ps(_mm512_loadu_ps(s), acc[r][t]));
    }
}

template <typename F>
void with_tile_rows(int64_t rows, const F& f) {
  switch (rows) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    default: f(std::integral_constant<int, 6>{}); break;
  }
}

// At most this many rows (one row tile) a linear's units are taken from both ends, after the pool
// read the next weights ahead. Decode steps of 1 and 4 sequences ran 3-12% faster; of 8 (two row
// tiles) 1-4% slower (docs/performance.md, session 25).
constexpr int64_t kTwoEndedRows = kMaxTileRows;

// Work units are (column block, row group) pairs, block-major. An odd number of blocks (SmolLM2's
// 576- and 960-column linears have 9 and 15) would leave one thread idle for a block's time, so with
// `groups` row groups a unit is a block's rows in one group.
//
// A unit's block b sums `parts` weight blocks: block b itself (parts = 1), or gate block b and its
// up block b + num_blocks (parts = 2, a gated MLP's gate_up weight). Each task calls make_store()
// once, and the store it returns, store(b, m0, m1, sums, stride), takes rows [m0, m1) of each of the
// task's units from sums[part * stride + (row - m0) * 64 + 0..64).
//
// Up to kTwoEndedRows rows (weight-bound) the units are taken one at a time, the caller from the
// back and the workers from the front, whose first blocks the pool's workers have read into their
// caches while idle (weight_read_ahead.h): the threads meet wherever those reads left them. Above,
// each thread takes a contiguous range that covers whole blocks but for at most two, which it shares
// with a neighbour.
template <typename MakeStore>
void blocked_linear_kernel(const at::Tensor& input, const at::BFloat16* weight, int64_t N, int parts,
                           const std::vector<int64_t>& pair_ends, const MakeStore& make_store) {
  const int64_t M = input.size(0), K = input.size(1);
  const int64_t num_blocks = round_up(N, kBlockN) / kBlockN / parts, block_pairs = round_up(K, kBlockK) / 2;
  const auto* x = input.data_ptr<at::BFloat16>();
  const int64_t x_stride = input.stride(0);
  const int64_t threads = at::get_num_threads();
  const int64_t tiles = (M + kMaxTileRows - 1) / kMaxTileRows;
  const int64_t wanted = num_blocks % threads == 0 ? 1 : std::min<int64_t>(threads, tiles);
  const int64_t group_tiles = (tiles + wanted - 1) / wanted;
  const int64_t groups = (tiles + group_tiles - 1) / group_tiles;  // none empty
  const int64_t rows_per_group = group_tiles * kMaxTileRows;
  const int64_t part_rows = std::min(M, rows_per_group);
  const int64_t block_elements = block_pairs * 2 * kBlockN;
  auto block_of = [&](int64_t b, int part) { return weight + (b + part * num_blocks) * block_elements; };
  // One unit; its block comes from memory (from_memory: this thread did not just read it for another
  // row group), and next_block is the block this thread reads after it if that one comes from memory
  // too (-1 if not, or not known).
  auto run_unit = [&](AlignedVector<float>& sum, auto& store, int64_t unit, bool from_memory, int64_t next_block) {
    const int64_t b = unit / groups, m0 = unit % groups * rows_per_group, m1 = std::min(M, m0 + rows_per_group);
    const at::BFloat16* xg = x + m0 * x_stride;
    const int64_t tile_passes = (m1 - m0 + kMaxTileRows - 1) / kMaxTileRows;
    for (int part = 0; part < parts; ++part) {
      const at::BFloat16* block = block_of(b, part);
      const auto* w = reinterpret_cast<const __m512bh*>(block);
      float* part_sum = sum.data() + part * part_rows * kBlockN;
      // The block the thread reads next: the unit's up block after its gate block, else the next
      // unit's first.
      const bool last_part = part + 1 == parts;
      const at::BFloat16* next = last_part ? block_of(next_block >= 0 ? next_block : b + 1, 0) : block_of(b, part + 1);
      // Where the unit has two or more row tiles (the tiles after the first read the block from
      // L2), that next block is asked into L2 over the unit's tile passes, if it comes from memory:
      // the unit's up block when the unit reads from memory, the next unit's blocks when this is the
      // last row group of b. SmolLM2's linears 7-19% faster at 8-104 rows and 6% at 256
      // (benchmarks/linear_bench.py). A single tile waits on memory anyway, and a second stream
      // beside it measured no faster.
      L2Prefetch pf;
      if (tile_passes > 1 && (last_part ? next_block >= 0 : from_memory))
        pf = L2Prefetch(next, next + block_elements, (K + 1) / 2 * tile_passes);
      StreamAhead ahead;
      if (from_memory) ahead = {true, reinterpret_cast<const char*>(block + block_elements), (next - block - block_elements) * 2};
      // Chunk by chunk, so a chunk's weights stay in cache while every row tile reads them.
      int64_t p0 = 0;
      for (size_t c = 0; c < pair_ends.size(); ++c) {
        for (int64_t r = 0; r < m1 - m0; r += kMaxTileRows)
          with_tile_rows(std::min<int64_t>(kMaxTileRows, m1 - m0 - r), [&](auto mt) {
            chain<mt()>(xg + r * x_stride, x_stride, K, w, p0, pair_ends[c], c == 0, part_sum + r * kBlockN, pf,
                        r == 0 ? ahead : StreamAhead{});
          });
        p0 = pair_ends[c];
      }
    }
    store(b, m0, m1, sum.data(), part_rows * kBlockN);
  };
  const int64_t units = num_blocks * groups, grain = grain_for(parts * block_elements);
  const int64_t tasks = std::min(threads, (units + grain - 1) / grain);
  if (M <= kTwoEndedRows && tasks > 1) {
    TwoEnded remaining(units);
    run_in_parallel(static_cast<int>(tasks), [&](int t) {
      const bool from_back = t == 0;
      AlignedVector<float> sum(parts * part_rows * kBlockN);
      auto store = make_store();
      int64_t previous = -1;
      // Each thread takes its next unit as it starts one (to ask for its blocks early), but only
      // while more units remain than threads: one held then would leave another thread idle.
      for (int64_t unit = remaining.take(from_back); unit >= 0;) {
        const int64_t next = remaining.remaining() > tasks ? remaining.take(from_back) : -1, b = unit / groups;
        run_unit(sum, store, unit, b != previous, next >= 0 && next / groups != b ? next / groups : -1);
        previous = b;
        unit = next >= 0 ? next : remaining.take(from_back);
      }
    });
    return;
  }
  parallel_for(0, units, grain, [&](int64_t begin, int64_t end) {
    AlignedVector<float> sum(parts * part_rows * kBlockN);
    auto store = make_store();
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t b = unit / groups;
      const bool last_group = unit % groups == groups - 1 && (b + 1) * groups < end;
      run_unit(sum, store, unit, unit % groups == 0 || unit == begin, last_group ? b + 1 : -1);
    }
  });
}

#endif

// Checks input, weight and k_chunk_ends (parts = 2: a gate_up weight, whose out_features 2 * d must be
// whole 128-column runs) and returns the chunks' ends in feature pairs.
std::vector<int64_t> check_blocked_operands(const at::Tensor& input, const at::Tensor& weight, int parts,
                                            at::IntArrayRef k_chunk_ends, const char* op) {
  TORCH_CHECK(input.dim() == 2 && input.scalar_type() == at::kBFloat16 && input.stride(1) == 1, op,
              ": input must be bfloat16 [rows, in_features] with contiguous rows");
  const int64_t K = input.size(1);
  TORCH_CHECK(weight.is_mkldnn() && weight.scalar_type() == at::kBFloat16 && weight.dim() == 2 &&
                  weight.size(1) == K,
              op, ": weight must be a bfloat16 MKLDNN tensor [out_features, ", K,
              "] (torch.ops.mkldnn._reorder_linear_weight's result)");
  const int64_t N = weight.size(0);
  // Only the size can be checked here; a weight in another layout of the same size gives wrong sums.
  TORCH_CHECK(mkldnn_nbytes(weight) == blocked_weight_bytes(N, K), op,
              ": weight must be in oneDNN's AB16b64a2b layout (torch.ops.mkldnn._reorder_linear_weight(w, 64)); its ",
              mkldnn_nbytes(weight), " bytes are not that layout's size");
  TORCH_CHECK(parts == 1 || N % (2 * kBlockN) == 0, op, ": the gate_up weight's out_features (2 * d = ", N,
              ") must be a multiple of 128, so that d is one of whole 64-column blocks");
  std::vector<int64_t> pair_ends;
  int64_t previous = 0;
  for (const int64_t e : k_chunk_ends) {
    TORCH_CHECK(e > previous && (e % 2 == 0 || e == K) && e <= K, op,
                ": k_chunk_ends must increase, be even (or the last, in_features) and end at ", K, "; got ",
                k_chunk_ends);
    pair_ends.push_back((e + 1) / 2);
    previous = e;
  }
  TORCH_CHECK(previous == K, op, ": k_chunk_ends must end at in_features = ", K, "; got ", k_chunk_ends);
  return pair_ends;
}

#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
// The weight's data, after asking the pool's idle workers to read its first blocks where the
// kernel takes its units from both ends.
const at::BFloat16* blocked_weight_data(const at::Tensor& input, const at::Tensor& weight, int parts) {
  const void* data = mkldnn_data(weight);
  if (input.size(0) <= kTwoEndedRows)
    read_next_weights_while_idle(weight, data, blocked_weight_bytes(weight.size(0), input.size(1)), parts);
  return static_cast<const at::BFloat16*>(data);
}
#endif

// The two ops' body: with `act`, the gated op (out has d = out_features / 2 columns), else the linear.
void run_blocked_linear(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, at::IntArrayRef k_chunk_ends,
                        std::optional<Activation> act, const char* op) {
  const int parts = act ? 2 : 1;
  const std::vector<int64_t> pair_ends = check_blocked_operands(input, weight, parts, k_chunk_ends, op);
  const int64_t M = input.size(0), N = weight.size(0), out_cols = N / parts;
  TORCH_CHECK(out.dim() == 2 && out.size(0) == M && out.size(1) == out_cols && out.scalar_type() == at::kBFloat16 &&
                  out.stride(1) == 1,
              op, ": out must be bfloat16 [", M, ", ", out_cols, "] with contiguous rows");
  const at::Tensor bias_f32 = linear_bias_fp32(bias, N, op);
  if (M == 0) return;
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
  auto* y = out.data_ptr<at::BFloat16>();
  const int64_t y_stride = out.stride(0);
  const float* b = bias_f32.defined() ? bias_f32.data_ptr<float>() : nullptr;
  const uint16_t* table = act ? bf16_activation_table(*act) : nullptr;
  auto store = [&](int64_t block, int64_t m0, int64_t m1, const float* sums, int64_t part_stride) {
    const int64_t n0 = block * kBlockN;
    for (int64_t r = m0; r < m1; ++r) {
      const float* row_sums = sums + (r - m0) * kBlockN;
      at::BFloat16* row = y + r * y_stride + n0;
      if (table)
        store_act_and_mul_bf16(row, row_sums, row_sums + part_stride, b ? b + n0 : nullptr,
                               b ? b + out_cols + n0 : nullptr, table, kBlockN);
      else
        store_sums_bf16(row, row_sums, b ? b + n0 : nullptr, std::min(kBlockN, N - n0));
    }
  };
  blocked_linear_kernel(input, blocked_weight_data(input, weight, parts), N, parts, pair_ends,
                        [&] { return store; });
#else
  TORCH_CHECK(false, op, " needs pagedlm._C built with AVX512-BF16 (this build has no vdpbf16ps)");
#endif
}

}  // namespace

void bf16_blocked_linear(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias, at::IntArrayRef k_chunk_ends) {
  run_blocked_linear(out, input, weight, bias, k_chunk_ends, std::nullopt, "bf16_blocked_linear");
}

void bf16_blocked_linear_act_and_mul(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias, at::IntArrayRef k_chunk_ends,
                                     c10::string_view activation) {
  const char* op = "bf16_blocked_linear_act_and_mul";
  run_blocked_linear(out, input, weight, bias, k_chunk_ends, parse_activation(activation, op), op);
}

void bf16_blocked_linear_argmax(at::Tensor& token_ids, const at::Tensor& input, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, at::IntArrayRef k_chunk_ends) {
  const char* op = "bf16_blocked_linear_argmax";
  const std::vector<int64_t> pair_ends = check_blocked_operands(input, weight, 1, k_chunk_ends, op);
  const int64_t M = input.size(0), N = weight.size(0);
  check_token_ids(token_ids, M, op);
  const at::Tensor bias_f32 = linear_bias_fp32(bias, N, op);
  if (M == 0) return;
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
  const float* b = bias_f32.defined() ? bias_f32.data_ptr<float>() : nullptr;
  RowArgmax tokens(M);
  // Each task's own argmax over its blocks' columns (merged into tokens as the task ends).
  struct TaskStore {
    TaskArgmax seen;
    const float* bias;
    int64_t N;
    void operator()(int64_t block, int64_t m0, int64_t m1, const float* sums, int64_t) {
      const int64_t n0 = block * kBlockN;
      for (int64_t r = m0; r < m1; ++r)
        seen.get()->update_bf16_sums(r, n0, sums + (r - m0) * kBlockN, bias ? bias + n0 : nullptr,
                                     std::min(kBlockN, N - n0));
    }
  };
  blocked_linear_kernel(input, blocked_weight_data(input, weight, 1), N, 1, pair_ends,
                        [&] { return TaskStore{TaskArgmax(&tokens, M), b, N}; });
  int64_t* ids = token_ids.data_ptr<int64_t>();
  for (int64_t r = 0; r < M; ++r) ids[r] = tokens.token(r);
#else
  TORCH_CHECK(false, op, " needs pagedlm._C built with AVX512-BF16 (this build has no vdpbf16ps)");
#endif
}

}  // namespace pagedlm::cpu
