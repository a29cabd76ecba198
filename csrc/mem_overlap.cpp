#include "mem_overlap.h"

#include <algorithm>
#include <array>
#include <numeric>
#include <utility>
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
// interval of reachable sums and the gcd of their coefficients). For views whose strides nest,
// each level has one or two candidates; `steps` bounds the total work of adversarial ones.
class BoundedSum {
 public:
  BoundedSum(const std::vector<Term>& terms, int64_t& steps) : steps_(steps) {
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

  Overlap hits(int64_t lo, int64_t hi) {
    if (empty_) return Overlap::kNo;
    if (search(0, lo, hi)) return Overlap::kYes;
    return steps_ > kMaxSteps ? Overlap::kUndecided : Overlap::kNo;
  }

 private:
  bool search(size_t k, int64_t lo, int64_t hi) {
    if (++steps_ > kMaxSteps) return false;
    if (hi < rest_min_[k] || lo > rest_max_[k]) return false;
    if (k == terms_.size()) return true;
    // Every sum of the remaining terms is a multiple of their gcd.
    const int64_t g = rest_gcd_[k];
    if (floor_div(hi, g) * g < lo) return false;
    const Term& t = terms_[k];
    const int64_t x_lo = std::max(t.lo, ceil_div(lo - rest_max_[k + 1], t.coef));
    const int64_t x_hi = std::min(t.hi, floor_div(hi - rest_min_[k + 1], t.coef));
    for (int64_t x = x_lo; x <= x_hi && steps_ <= kMaxSteps; ++x) {
      if (search(k + 1, lo - t.coef * x, hi - t.coef * x)) return true;
    }
    return false;
  }

  int64_t& steps_;
  bool empty_ = false;
  std::vector<Term> terms_;
  std::vector<int64_t> rest_min_, rest_max_, rest_gcd_;
};

// The (stride, size) pairs of the dims that vary, by increasing stride; on the stack, as the
// validator runs on every op call.
struct Dims {
  int count = 0;
  std::array<std::pair<int64_t, int64_t>, 3> pairs;
  const std::pair<int64_t, int64_t>* begin() const { return pairs.data(); }
  const std::pair<int64_t, int64_t>* end() const { return pairs.data() + count; }
};

Dims varying_dims(const View& v) {
  Dims dims;
  for (int d = 0; d < v.dims; ++d) dims.pairs[dims.count++] = {v.strides[d], v.sizes[d]};
  std::sort(dims.pairs.begin(), dims.pairs.begin() + dims.count);
  return dims;
}

// Each stride passes the farthest element reachable through the smaller ones, so every index
// lands on its own element (dense views and rows with padding, the common layouts).
bool strides_nest(const View& v) {
  int64_t reach = 0;  // largest offset reachable through the dims seen so far
  for (const auto& [stride, size] : varying_dims(v)) {
    if (stride <= reach) return false;
    reach += (size - 1) * stride;
  }
  return true;
}

// Dense: the elements tile [first, last] with no gap.
bool is_dense(const View& v) {
  int64_t expected = 1;
  for (const auto& [stride, size] : varying_dims(v)) {
    if (stride != expected) return false;
    expected *= size;
  }
  return true;
}

// [first byte, one past the last byte] that the view addresses.
std::pair<int64_t, int64_t> byte_span(const View& v) {
  int64_t begin = v.address, end = v.address + v.item_bytes;
  for (int d = 0; d < v.dims; ++d) {
    const int64_t extent = (v.sizes[d] - 1) * v.strides[d] * v.item_bytes;
    (extent < 0 ? begin : end) += extent;
  }
  return {begin, end};
}

}  // namespace

Overlap internal_overlap(const View& v) {
  const Dims dims = varying_dims(v);
  if (dims.count > 0 && dims.pairs[0].first == 0) return Overlap::kYes;  // stride 0 repeats an element
  if (strides_nest(v)) return Overlap::kNo;
  // Two distinct indices share an element iff some nonzero index difference has
  // sum_k stride_k * diff_k == 0. Negating the difference if needed, its first nonzero entry
  // (dim k) is positive: one exact question per k, all sharing one step budget.
  std::vector<Term> terms;
  for (const auto& [stride, size] : dims) terms.push_back({stride, -(size - 1), size - 1});
  int64_t steps = 0;
  for (size_t k = 0; k < terms.size(); ++k) {
    std::vector<Term> diff(terms.begin() + static_cast<std::ptrdiff_t>(k), terms.end());
    diff[0].lo = 1;
    // A yes settles it; an undecided search has spent the shared budget, so nothing later can.
    if (const Overlap found = BoundedSum(diff, steps).hits(0, 0); found != Overlap::kNo) return found;
  }
  return Overlap::kNo;
}

Overlap overlap(const View& a, const View& b) {
  const auto [a_begin, a_end] = byte_span(a);
  const auto [b_begin, b_end] = byte_span(b);
  if (a_end <= b_begin || b_end <= a_begin) return Overlap::kNo;
  // A dense view covers every byte of its span.
  if (is_dense(a) && is_dense(b)) return Overlap::kYes;
  // Element i of a covers bytes [a_begin + off_a(i), +size_a); element j of b likewise. They share
  // a byte iff off_a(i) - off_b(j) lies in (b.address - a.address - size_a, ... + size_b).
  std::vector<Term> terms;
  for (const auto& [v, sign] : {std::pair{&a, int64_t{1}}, std::pair{&b, int64_t{-1}}}) {
    for (int d = 0; d < v->dims; ++d) terms.push_back({sign * v->strides[d] * v->item_bytes, 0, v->sizes[d] - 1});
  }
  const int64_t base = b.address - a.address;
  int64_t steps = 0;
  return BoundedSum(terms, steps).hits(base - a.item_bytes + 1, base + b.item_bytes - 1);
}

}  // namespace vllm_mla_ops
