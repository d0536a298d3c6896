// y = x @ W.T (+ bias) for bf16 on CPUs with AMX, over a weight packed once into AMX tiles.
// oneDNN's packed bf16 matmul (what PackedLinear uses elsewhere) streamed the weights of a
// decode step (32 rows) at 14-19 GB/s on a 2-core Xeon whose memory gives ~27 GB/s to a plain
// read; a decode step is mostly that read. This kernel reads each weight tile once per 32 rows,
// straight from its packed position, and reached 22-25 GB/s on the same shapes.
//
// Packed layout: [N/16][K/32][16][32] bf16, one 1 KiB tile per (16 output columns, 32 inputs):
// row r of a tile holds, for each of its 16 columns n, the pair W[n][2r], W[n][2r + 1] (the
// pairing TDPBF16PS multiplies). Products accumulate in fp32 tiles; the output is rounded to bf16
// once (to nearest even), after the bias is added in fp32.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <vector>

#include "cpu_vector_ops.h"

#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__AVX512F__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define LORAPLEX_AMX 1
#endif

namespace {

using namespace loraplex_cpu;

constexpr int64_t kTileRows = 16, kTileK = 32;

#if defined(LORAPLEX_AMX)
// The layout _tile_loadconfig reads (palette 1): bytes per row and rows of each tile register.
struct TileConfig {
  uint8_t palette_id = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Linux hands AMX state to a process only on request (once; every thread then has it).
bool amx_permitted() {
  static const bool permitted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return permitted;
}

// tmm0-3: fp32 sums for (rows 0-15, 16-31) x (columns n..n+15, n+16..n+31); tmm4-5: the two
// 16-row halves of a 32-row block of x; tmm6-7: the two column tiles of the weight.
void configure_tiles() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = kTileRows;
    config.colsb[t] = 64;
  }
  _tile_loadconfig(&config);
}

// One 32-row block of x (rows padded to 32) against columns [32 * pair, 32 * pair + 32).
inline void block_product(const uint16_t* x_block, int64_t K, const uint16_t* w0, const uint16_t* w1, float* sums) {
  const int64_t k_tiles = K / kTileK;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t kt = 0; kt < k_tiles; ++kt) {
    _tile_loadd(4, x_block + kt * kTileK, K * 2);
    _tile_loadd(5, x_block + kTileRows * K + kt * kTileK, K * 2);
    _tile_loadd(6, w0 + kt * kTileRows * kTileK, 64);
    _tile_loadd(7, w1 + kt * kTileRows * kTileK, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, sums, 128);  // sums: [32 rows][32 columns] fp32
  _tile_stored(1, sums + 16, 128);
  _tile_stored(2, sums + 16 * 32, 128);
  _tile_stored(3, sums + 16 * 32 + 16, 128);
}
#endif

bool available() {
#if defined(LORAPLEX_AMX)
  return amx_permitted();
#else
  return false;
#endif
}

void check_weight(const torch::Tensor& w) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == torch::kBFloat16 && w.dim() == 2, "weight: bf16 [N, K] on CPU");
  TORCH_CHECK(w.size(0) % (2 * kTileRows) == 0 && w.size(1) % kTileK == 0, "weight: N a multiple of 32, K of 32");
}

torch::Tensor pack(torch::Tensor weight) {
  check_weight(weight);
  const auto w = weight.contiguous();
  const int64_t N = w.size(0), K = w.size(1), k_tiles = K / kTileK;
  auto packed = torch::empty({N / kTileRows, k_tiles, kTileRows, kTileK}, w.options());
  const uint16_t* src = reinterpret_cast<const uint16_t*>(w.data_ptr());
  uint16_t* dst = reinterpret_cast<uint16_t*>(packed.data_ptr());
  at::parallel_for(0, N / kTileRows, 1, [=](int64_t begin, int64_t end) {
    for (int64_t nt = begin; nt < end; ++nt)
      for (int64_t kt = 0; kt < k_tiles; ++kt) {
        uint16_t* tile = dst + (nt * k_tiles + kt) * kTileRows * kTileK;
        for (int64_t r = 0; r < kTileRows; ++r)
          for (int64_t n = 0; n < kTileRows; ++n) {
            const uint16_t* col = src + (nt * kTileRows + n) * K + kt * kTileK + 2 * r;
            tile[r * kTileK + 2 * n] = col[0];
            tile[r * kTileK + 2 * n + 1] = col[1];
          }
      }
  });
  return packed;
}

// x: [M, K] bf16 (any leading shape flattened by the caller); packed from `pack`; bias [N] or None.
torch::Tensor linear(torch::Tensor x, torch::Tensor packed, std::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kBFloat16 && x.dim() == 2, "x: bf16 [M, K] on CPU");
  TORCH_CHECK(packed.scalar_type() == torch::kBFloat16 && packed.dim() == 4 && packed.is_contiguous() &&
                  packed.size(2) == kTileRows && packed.size(3) == kTileK,
              "packed: [N/16, K/32, 16, 32] from pack()");
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0) * kTileRows;
  TORCH_CHECK(packed.size(1) * kTileK == K, "x has ", K, " inputs, the packed weight ", packed.size(1) * kTileK);
  const uint16_t* bias_ptr = nullptr;
  torch::Tensor bias_c;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == torch::kBFloat16 && bias->numel() == N, "bias: bf16 [N]");
    bias_c = bias->contiguous();
    bias_ptr = reinterpret_cast<const uint16_t*>(bias_c.data_ptr());
  }
  auto out = torch::empty({M, N}, x.options());
#if defined(LORAPLEX_AMX)
  TORCH_CHECK(amx_permitted(), "this process may not use AMX");
  // Rows in blocks of 32; a last partial block is read from a zero-padded copy.
  const int64_t blocks = (M + 31) / 32, full = M / 32;
  auto xc = x.contiguous();
  torch::Tensor tail;
  if (full < blocks) {
    tail = torch::zeros({32, K}, x.options());
    tail.narrow(0, 0, M - full * 32).copy_(xc.narrow(0, full * 32, M - full * 32));
  }
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr());
  const uint16_t* tp = tail.defined() ? reinterpret_cast<const uint16_t*>(tail.data_ptr()) : nullptr;
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(packed.data_ptr());
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  const int64_t k_tiles = K / kTileK, pairs = N / 32;
  // Columns in chunks of 8 pairs (256 columns): a chunk's weight tiles (384 KiB at K = 768) stay in L2
  // while every 32-row block of x passes over them, instead of x streaming once per pair (2,048 rows
  // at 768x768: 1.15 ms against 1.69).
  const int64_t chunk = 8;
  // Column pairs split between threads.
  at::parallel_for(0, pairs, 1, [=](int64_t begin, int64_t end) {
    configure_tiles();  // per call: other code (oneDNN) on this thread loads its own configuration
    alignas(64) float sums[32 * 32];
    for (int64_t first = begin; first < end; first += chunk) {
      const int64_t last = std::min(end, first + chunk);
      for (int64_t block = 0; block < blocks; ++block) {
        const bool partial = block == full;
        const uint16_t* x_block = partial ? tp : xp + block * 32 * K;
        const int64_t rows = partial ? M - full * 32 : 32;
        for (int64_t pair = first; pair < last; ++pair) {
          const uint16_t* w0 = wp + (2 * pair) * k_tiles * kTileRows * kTileK;
          block_product(x_block, K, w0, w0 + k_tiles * kTileRows * kTileK, sums);
          __m512 b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
          if (bias_ptr) {
            b0 = load16(bias_ptr + pair * 32);
            b1 = load16(bias_ptr + pair * 32 + 16);
          }
          for (int64_t r = 0; r < rows; ++r) {
            uint16_t* y = op + (block * 32 + r) * N + pair * 32;
            store16(y, _mm512_add_ps(_mm512_load_ps(sums + r * 32), b0));
            store16(y + 16, _mm512_add_ps(_mm512_load_ps(sums + r * 32 + 16), b1));
          }
        }
      }
    }
    _tile_release();
  });
#else
  TORCH_CHECK(false, "this build has no AMX kernel (available() is false)");
#endif
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("available", &available, "whether this build has the AMX kernel and this process may use AMX");
  m.def("pack", &pack, "W [N, K] bf16 -> the AMX tile layout linear() reads");
  m.def("linear", &linear, "x [M, K] @ W.T (+ bias) in bf16, W packed by pack()");
}
