// CUDA kernels of concat_mla_q and concat_mla_q_fp8: two work splits of the output's packs (vectors
// of N elements), blocks of whole rows for most calls and one flat index for the rest; the two ops
// differ only in the conversion applied to a pack between its load and its store.
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/macros.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "dispatch_utils.h"
#include "ops.h"
#include "packs.cuh"

namespace {

using namespace vllm_mla_ops;

// Division by a divisor fixed for the whole launch, as a multiply and a shift (Granlund and
// Montgomery): exact for numerators below 2^31, which the 32-bit index path guarantees. Default:
// division by one, left in the geometry of the launches that never divide.
struct FastDivmod {
  uint32_t multiplier = 0, shift = 0;
  FastDivmod() = default;
  explicit FastDivmod(uint32_t d) {
    while ((uint64_t{1} << shift) < d) ++shift;
    multiplier = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << shift) - d)) / d + 1);
  }
  __device__ uint32_t div(uint32_t n) const { return (__umulhi(n, multiplier) + n) >> shift; }
};

// The launch's geometry in Index arithmetic (uint32_t whenever every offset fits, see launch());
// strides in elements. As few bytes as the kernels need: on small outputs every byte of kernel
// parameters the threads read costs launch latency (docs/design.md), so the last-dim strides,
// read only when N == 1 (else they are 1, host-checked), come last.
template <typename Index>
struct Geometry {
  Index total;                 // packs in the output: tokens * heads * packs
  Index packs, heads;          // packs per (token, head) row, nope and rope; rows per token
  FastDivmod by_packs, by_heads;  // the flat split's two divisions, 32-bit index only
  Index nope_packs;
  Index nope_s0, nope_s1, pe_s0, pe_s1, out_s0, out_s1;  // pe_s1 == 0 for a 1-head q_pe
  Index nope_s2, pe_s2, out_s2;
};

// Pack p of row (t, h) of the output: where it is read and written.
template <typename scalar_t, typename out_t, int N, typename Index>
struct PackAt {
  const scalar_t* src;
  out_t* dst;
  __device__ PackAt(const scalar_t* nope, const scalar_t* pe, out_t* out, const Geometry<Index>& g, Index t, Index h,
                    Index p) {
    // One address selected per pack: no divergent branch between the two inputs.
    const bool in_nope = p < g.nope_packs;
    const Index q = in_nope ? p : p - g.nope_packs;
    src = (in_nope ? nope : pe) + (t * (in_nope ? g.nope_s0 : g.pe_s0) + h * (in_nope ? g.nope_s1 : g.pe_s1) +
                                   q * (N > 1 ? N : (in_nope ? g.nope_s2 : g.pe_s2)));
    dst = out + (t * g.out_s0 + h * g.out_s1 + p * (N > 1 ? N : g.out_s2));
  }
  // Flat pack i of the output, i = (t * heads + h) * packs + p.
  __device__ static PackAt flat(const scalar_t* nope, const scalar_t* pe, out_t* out, const Geometry<Index>& g,
                                Index i) {
    Index row, t;
    if constexpr (sizeof(Index) == 4) {
      row = g.by_packs.div(i);
      t = g.by_heads.div(row);
    } else {
      row = i / g.packs;
      t = row / g.heads;
    }
    return {nope, pe, out, g, t, row - t * g.heads, i - row * g.packs};
  }
};

// Blocks of whole rows: blockIdx.y is the token, threadIdx.x the pack in the row, and the rows of a
// block are the heads kRows * blockDim.y * blockIdx.x + threadIdx.y + j * blockDim.y, j < kRows, so no
// thread divides. A thread's kRows packs share their index arithmetic up to the head stride. A row
// past the last head is the last head again, the same bytes copied to the same place, so that no
// thread branches: a guarded load let nvcc sink it below the previous store (two round trips in
// sequence), or read the data before the fp8 scale (docs/design.md).
template <typename scalar_t, int N, int kRows, typename Convert>
__global__ void concat_mla_q_rows_kernel(const scalar_t* __restrict__ nope, const scalar_t* __restrict__ pe,
                                         typename Convert::out_t* __restrict__ out, const Geometry<uint32_t> g,
                                         const typename Convert::Args args) {
  using At = PackAt<scalar_t, typename Convert::out_t, N, uint32_t>;
  const uint32_t first = blockIdx.x * blockDim.y * kRows + threadIdx.y;
  Pack<scalar_t, N> buf[kRows];
  typename Convert::out_t* dst[kRows];
#pragma unroll
  for (int j = 0; j < kRows; ++j) {
    const At at(nope, pe, out, g, blockIdx.y, min(first + j * blockDim.y, g.heads - 1), threadIdx.x);
    buf[j] = __ldg(reinterpret_cast<const Pack<scalar_t, N>*>(at.src));
    dst[j] = at.dst;
  }
  const Convert convert(args);
#pragma unroll
  for (int j = 0; j < kRows; ++j) {
    __stwb(reinterpret_cast<Pack<typename Convert::out_t, N>*>(dst[j]), convert(buf[j]));
  }
}

// One flat index over the output's packs, for the calls the row blocks do not take (see launch()).
// Consecutive threads take consecutive packs, so the stores of a warp are contiguous in a contiguous
// q_out and the loads contiguous within each row. Each thread issues all of its kPacksPerThread loads
// before its first store, so they are in flight together; the grid loops when it cannot cover the
// output in one pass.
template <typename scalar_t, int N, typename Index, int kPacksPerThread, typename Convert>
__global__ void concat_mla_q_kernel(const scalar_t* __restrict__ nope, const scalar_t* __restrict__ pe,
                                    typename Convert::out_t* __restrict__ out, const Geometry<Index> g,
                                    const typename Convert::Args args) {
  using At = PackAt<scalar_t, typename Convert::out_t, N, Index>;
  using In = Pack<scalar_t, N>;
  using Out = Pack<typename Convert::out_t, N>;
  const Index step = static_cast<Index>(gridDim.x) * blockDim.x * kPacksPerThread;
  for (Index first = static_cast<Index>(blockIdx.x) * blockDim.x * kPacksPerThread + threadIdx.x; first < g.total;
       first += step) {
    In buf[kPacksPerThread];
    typename Convert::out_t* dst[kPacksPerThread];
#pragma unroll
    for (int j = 0; j < kPacksPerThread; ++j) {
      const Index i = first + static_cast<Index>(j) * blockDim.x;
      if (i < g.total) {
        const At at = At::flat(nope, pe, out, g, i);
        buf[j] = __ldg(reinterpret_cast<const In*>(at.src));
        dst[j] = at.dst;
      }
    }
    // Built here, once the data loads are in flight, so the fp8 conversion's scale load and
    // division overlap them instead of delaying them.
    const Convert convert(args);
#pragma unroll
    for (int j = 0; j < kPacksPerThread; ++j) {
      if (first + static_cast<Index>(j) * blockDim.x < g.total) {
        __stwb(reinterpret_cast<Out*>(dst[j]), convert(buf[j]));
      }
    }
  }
}

template <typename scalar_t, typename Convert, int N>
void launch(const Layout& ql_nope, const Layout& q_pe, const Layout& q_out, void* q_out_data,
            const typename Convert::Args& args, bool copy_nope, cudaStream_t stream) {
  const int64_t tokens = q_out.sizes[0], heads = q_out.sizes[1];
  // Without the nope half (a bmm wrote it in place) the rows are the rope halves of q_out's rows.
  const int64_t nope_dim = copy_nope ? ql_nope.sizes[2] : 0, skipped = ql_nope.sizes[2] - nope_dim;
  const int64_t packs = (nope_dim + q_pe.sizes[2]) / N, total = tokens * heads * packs;
  if (packs == 0) return;  // the nope half written in place and no rope half: nothing to write
  const auto* nope = reinterpret_cast<const scalar_t*>(ql_nope.address);
  const auto* pe = reinterpret_cast<const scalar_t*>(q_pe.address);
  auto* out = static_cast<typename Convert::out_t*>(q_out_data) + skipped * q_out.strides[2];
  // The divisors are built only for the flat split's 32-bit index, the one launch that reads them.
  const auto geometry = [&](auto index, bool divides) {
    using Index = decltype(index);
    const auto divisor = [&](int64_t d) { return divides ? FastDivmod(static_cast<uint32_t>(d)) : FastDivmod(); };
    const auto I = [](int64_t v) { return static_cast<Index>(v); };
    return Geometry<Index>{I(total), I(packs), I(heads), divisor(packs), divisor(heads), I(nope_dim / N),
                           I(ql_nope.strides[0]), I(ql_nope.strides[1]), I(q_pe.strides[0]),
                           I(q_pe.sizes[1] == 1 ? 0 : q_pe.strides[1]), I(q_out.strides[0]), I(q_out.strides[1]),
                           I(ql_nope.strides[2]), I(q_pe.strides[2]), I(q_out.strides[2])};
  };
  // Flat split: 256-thread blocks; several packs a thread from kWideFrom packs, where that still
  // leaves at least 1024 blocks (about eight 256-thread blocks per SM of a 132-SM H100/H200): the
  // conversion's count (four for fp8), and two for the copy when rows are shorter than 32 packs (the
  // K side's 24, each half of a 512-byte kv row, where more loads in flight measured faster:
  // docs/design.md). At most kMaxBlocks blocks, looping.
  constexpr int kThreads = 256;
  constexpr int64_t kWideFrom = int64_t{1} << 20, kMaxBlocks = int64_t{1} << 30;
  constexpr int kWide = std::max(Convert::kPacksPerThread, 2);
  const auto flat = [&](auto packs_per_thread, auto index) {
    constexpr int kPacks = decltype(packs_per_thread)::value;
    using Index = decltype(index);
    const int64_t blocks = std::min(kMaxBlocks, (total + kThreads * kPacks - 1) / (kThreads * kPacks));
    concat_mla_q_kernel<scalar_t, N, Index, kPacks, Convert><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        nope, pe, out, geometry(Index{}, sizeof(Index) == 4), args);
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  };
  // Row blocks: `lines` rows of `packs` threads, each thread k rows (docs/design.md). k by
  // size: one under kOneRowBelow packs (7 tokens of 128 heads), where more blocks spread the latency
  // over more SMs; four under kWideFrom, where the index arithmetic was the bound and four packs
  // share it; eight under kTwoRowsFrom (16 heads at 911-1820 tokens, 128 heads at 114-227); two
  // above. lines: the fewest from min_lines (about kRowThreads threads: two rows of 72 packs, six of
  // 24) to twice that whose block of lines * k rows divides heads, so that no row is copied twice
  // (the K side's 128 heads: eight lines, not six; MiniCPM3's 40 heads of 36 packs at four or eight
  // rows a thread: five lines, not four); failing which half as many rows a thread, and with one row
  // a thread min_lines, the last block of each token copying its last head again.
  constexpr int64_t kRowThreads = 128, kOneRowBelow = int64_t{1} << 16, kTwoRowsFrom = int64_t{1} << 21;
  const int64_t min_lines = std::min({(kRowThreads + packs - 1) / packs, 1024 / packs, heads});
  const int64_t max_lines = std::min(2 * min_lines, 1024 / packs);
  const auto dividing_lines = [&](int64_t k) {
    for (int64_t l = min_lines; l <= max_lines && l * k <= heads; ++l) {
      if (heads % (l * k) == 0) return l;
    }
    return int64_t{0};
  };
  const auto rows = [&](auto rows_per_thread, int64_t lines) {
    constexpr int kRows = decltype(rows_per_thread)::value;
    const dim3 grid(static_cast<unsigned>((heads + lines * kRows - 1) / (lines * kRows)), static_cast<unsigned>(tokens));
    concat_mla_q_rows_kernel<scalar_t, N, kRows, Convert>
        <<<grid, dim3(static_cast<unsigned>(packs), static_cast<unsigned>(lines)), 0, stream>>>(
            nope, pe, out, geometry(uint32_t{}, false), args);
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  };
  // 32-bit arithmetic when the flat index (first + step < twice the total) stays below 2^31 and
  // every element offset below 2^32: strides are never negative, so each term of an offset is at
  // most the offset, and unsigned arithmetic gives it exactly.
  const int64_t last = std::max({last_offset(ql_nope), last_offset(q_pe), last_offset(q_out)});
  if (total >= (int64_t{1} << 30) || last >= (int64_t{1} << 32)) {
    flat(std::integral_constant<int, Convert::kPacksPerThread>{}, int64_t{});
  } else if (total >= kWideFrom && (Convert::kPacksPerThread > 1 || packs < 32)) {
    flat(std::integral_constant<int, kWide>{}, uint32_t{});
  } else if (packs > 1024 || tokens > 65535) {  // a row wider than a block, or more tokens than grid.y
    flat(std::integral_constant<int, 1>{}, uint32_t{});
  } else {
    int k = total < kOneRowBelow ? 1 : total < kWideFrom ? 4 : total < kTwoRowsFrom ? 8 : 2;
    int64_t lines = dividing_lines(k);
    while (lines == 0 && k > 1) lines = dividing_lines(k /= 2);
    lines = std::max(lines, min_lines);
    if (k == 8) {
      rows(std::integral_constant<int, 8>{}, lines);
    } else if (k == 4) {
      rows(std::integral_constant<int, 4>{}, lines);
    } else if (k == 2) {
      rows(std::integral_constant<int, 2>{}, lines);
    } else {
      rows(std::integral_constant<int, 1>{}, lines);
    }
  }
}

// Both ops, on the current stream: the widest pack that every row of the three tensors splits into
// (16 bytes of input for the 512/64 and 256/32 layouts, down to one element for any other layout).
template <typename scalar_t, typename Convert>
void concat_rows(const Tensor& ql_nope, const Tensor& q_pe, const Tensor& q_out,
                 const typename Convert::Args& args, bool copy_nope = true) {
  void* stream = nullptr;
  STD_TORCH_CHECK(aoti_torch_get_current_cuda_stream(ql_nope.get_device_index(), &stream) == AOTI_TORCH_SUCCESS,
                  "could not get the current CUDA stream");
  const Layout nope(ql_nope), pe(q_pe), out(q_out);
  void* out_data = q_out.mutable_data_ptr();
  const auto packable = [&](int64_t n) {
    return rows_split_into_packs(nope, n) && rows_split_into_packs(pe, n) && rows_split_into_packs(out, n);
  };
  const auto run = [&](auto n) {
    launch<scalar_t, Convert, decltype(n)::value>(nope, pe, out, out_data, args, copy_nope,
                                                 static_cast<cudaStream_t>(stream));
  };
  if (packable(8)) {
    run(std::integral_constant<int, 8>{});
  } else if (packable(4)) {
    run(std::integral_constant<int, 4>{});
  } else if (packable(2)) {
    run(std::integral_constant<int, 2>{});
  } else {
    run(std::integral_constant<int, 1>{});
  }
}

void concat_mla_q_cuda(Tensor ql_nope, Tensor q_pe, Tensor q_out) {
  const bool nope_in_place = check_concat_mla_q_args(ql_nope, q_pe, q_out);
  if (q_out.numel() == 0) return;
  const DeviceIfNeeded device_guard(ql_nope.get_device_index());
  VLLM_DISPATCH_HALF_TYPES(dtype_of(ql_nope), "concat_mla_q", [&] {
    concat_rows<scalar_t, Copy<scalar_t>>(ql_nope, q_pe, q_out, NoArgs{}, !nope_in_place);
  });
}

void concat_mla_q_fp8_cuda(Tensor ql_nope, Tensor q_pe, Tensor q_out, Tensor scale) {
  check_concat_mla_q_args(ql_nope, q_pe, q_out, scale);
  if (q_out.numel() == 0) return;
  const DeviceIfNeeded device_guard(ql_nope.get_device_index());
  VLLM_DISPATCH_HALF_TYPES(dtype_of(ql_nope), "concat_mla_q_fp8", [&] {
    concat_rows<scalar_t, QuantizeE4M3<scalar_t>>(ql_nope, q_pe, q_out,
                                                   ScaleArgs{static_cast<const float*>(scale.const_data_ptr())});
  });
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(_C, CUDA, m) {
  m.impl("concat_mla_q", TORCH_BOX(&concat_mla_q_cuda));
  m.impl("concat_mla_q_fp8", TORCH_BOX(&concat_mla_q_fp8_cuda));
}
