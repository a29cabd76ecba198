#include "mem_overlap.h"

#include <ATen/MemoryOverlap.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

namespace vllm_mla_ops {
namespace {

// Division rounding toward -inf / +inf, for a positive divisor.
int64_t floor_div(int64_t a, int64_t b) {
  const int64_t q = a / b;
  return (a % b != 0 && a < 0) ? q - 1 : q;
}
int64_t ceil_div(int64_t a, int64_t b) { return -floor_div(-a, b); }

// One unknown of a bounded linear equation: it contributes coef * x, with lo <= x <= hi.
struct Term {
  int64_t coef, lo, hi;
};

// Decides whether integers x_k in [lo_k, hi_k] exist with sum_k coef_k * x_k in [lo, hi].
// Terms with equal coefficients merge into one (so two views of one buffer with the same row
// stride reduce to a single row-difference unknown); the search then goes depth-first, largest
// coefficient first, and keeps only the values the remaining terms can still complete (their
// interval of reachable sums and the gcd of their coefficients). It is exact; for views whose
// strides nest, each level has one or two candidates.
class BoundedSum {
 public:
  explicit BoundedSum(const std::vector<Term>& terms) {
    for (Term t : terms) {
      if (t.lo > t.hi) empty_ = true;
      if (t.coef < 0) t = {-t.coef, -t.hi, -t.lo};
      if (t.coef == 0) continue;
      auto same = std::find_if(terms_.begin(), terms_.end(), [&](const Term& u) { return u.coef == t.coef; });
      if (same == terms_.end()) {
        terms_.push_back(t);
      } else {
        same->lo += t.lo;
        same->hi += t.hi;
      }
    }
    std::sort(terms_.begin(), terms_.end(), [](const Term& a, const Term& b) { return a.coef > b.coef; });
    const size_t n = terms_.size();
    rest_min_.assign(n + 1, 0);
    rest_max_.assign(n + 1, 0);
    rest_gcd_.assign(n + 1, 0);
    for (size_t k = n; k-- > 0;) {
      rest_min_[k] = rest_min_[k + 1] + terms_[k].coef * terms_[k].lo;
      rest_max_[k] = rest_max_[k + 1] + terms_[k].coef * terms_[k].hi;
      rest_gcd_[k] = std::gcd(rest_gcd_[k + 1], terms_[k].coef);
    }
  }

  bool hits(int64_t lo, int64_t hi) const { return !empty_ && search(0, lo, hi); }

 private:
  bool search(size_t k, int64_t lo, int64_t hi) const {
    if (hi < rest_min_[k] || lo > rest_max_[k]) return false;
    if (k == terms_.size()) return true;
    // Every sum of the remaining terms is a multiple of their gcd.
    const int64_t g = rest_gcd_[k];
    if (floor_div(hi, g) * g < lo) return false;
    const Term& t = terms_[k];
    const int64_t x_lo = std::max(t.lo, ceil_div(lo - rest_max_[k + 1], t.coef));
    const int64_t x_hi = std::min(t.hi, floor_div(hi - rest_min_[k + 1], t.coef));
    for (int64_t x = x_lo; x <= x_hi; ++x) {
      if (search(k + 1, lo - t.coef * x, hi - t.coef * x)) return true;
    }
    return false;
  }

  bool empty_ = false;
  std::vector<Term> terms_;
  std::vector<int64_t> rest_min_, rest_max_, rest_gcd_;
};

// [first byte, one past the last byte] that a non-empty view addresses.
std::pair<int64_t, int64_t> byte_span(const at::Tensor& t) {
  int64_t begin = reinterpret_cast<intptr_t>(t.const_data_ptr());
  int64_t end = begin + static_cast<int64_t>(t.element_size());
  for (int64_t d = 0; d < t.dim(); ++d) {
    const int64_t extent = (t.size(d) - 1) * t.stride(d) * static_cast<int64_t>(t.element_size());
    (extent < 0 ? begin : end) += extent;
  }
  return {begin, end};
}

}  // namespace

bool has_internal_overlap(const at::Tensor& t) {
  switch (at::has_internal_overlap(t)) {
    case at::MemOverlap::No:
      return false;
    case at::MemOverlap::Yes:
      return true;
    case at::MemOverlap::TooHard:
      break;
  }
  std::vector<Term> dims;
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) > 1) dims.push_back({t.stride(d), -(t.size(d) - 1), t.size(d) - 1});
  }
  // Two distinct indices share an element iff some nonzero index difference has
  // sum_k stride_k * diff_k == 0. Negating the difference if needed, its first nonzero entry
  // (dimension k) is positive: one exact question per k.
  for (size_t k = 0; k < dims.size(); ++k) {
    std::vector<Term> diff(dims.begin() + k, dims.end());
    diff[0].lo = 1;
    if (BoundedSum(diff).hits(0, 0)) return true;
  }
  return false;
}

bool overlaps(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  // By address, not by storage: at::get_overlap_status answers "No" for two storages, but two
  // storages can share memory (from_blob, numpy or DLPack views of one buffer).
  const auto [a_begin, a_end] = byte_span(a);
  const auto [b_begin, b_end] = byte_span(b);
  if (a_end <= b_begin || b_end <= a_begin) return false;
  // A dense view covers every byte of its span.
  if (a.is_non_overlapping_and_dense() && b.is_non_overlapping_and_dense()) return true;
  // Element i of a covers bytes [a_begin + off_a(i), +size_a); element j of b likewise. They share
  // a byte iff off_a(i) - off_b(j) lies in (b_begin - a_begin - size_a, b_begin - a_begin + size_b).
  std::vector<Term> terms;
  for (const auto& [t, sign] : {std::pair{&a, 1}, std::pair{&b, -1}}) {
    const int64_t item = static_cast<int64_t>(t->element_size());
    for (int64_t d = 0; d < t->dim(); ++d) {
      terms.push_back({sign * t->stride(d) * item, 0, t->size(d) - 1});
    }
  }
  const int64_t base = reinterpret_cast<intptr_t>(b.const_data_ptr()) -
                       reinterpret_cast<intptr_t>(a.const_data_ptr());
  return BoundedSum(terms).hits(base - static_cast<int64_t>(a.element_size()) + 1,
                                base + static_cast<int64_t>(b.element_size()) - 1);
}

}  // namespace vllm_mla_ops
