// The Basis Decomposition checks on real model weights, written once for the programs that run
// them: test_real_weights (slm4096, stories260K from ../shared/models), test_pypi_models,
// test_smollm2 and test_minilm (SmolLM2-135M, all-MiniLM-L6-v2 from scripts/fetch-models.sh's
// cache). Each check keeps the derivation of its bound here; the programs pass their model's
// specifics (weights, sequences, which claims the model meets) and keep their model's measured
// figures next to the call.
//
//   data        data paths, files_present (the skip message), read_file
//   pair sides  pair_side, qk_side, vo_side: the products A_g B_h BD keeps, from stored weights;
//               print_side_header, check_side: BD's product error by strategy and storage type
//   layers      stored_attention, worst_activation_gain: h (BD's activation rounding, estimated),
//               worst_product_error_ratio: g, the worst ratio of BD's product
//               error to the dense weights' own rounding (bd::measure_product_errors)
//   perplexity  ppl_result (per-token NLL over sequences), blocks, paired_difference,
//               ratio_of_means, rms_ratio; check_bd_perplexity: BD vs dense, fp32 and fp16
#pragma once

#include <basisattn/bd/factorize.hpp>
#include <basisattn/bd/layers.hpp>
#include <basisattn/bd/measure.hpp>

#include "bd_test_util.hpp"
#include "test_util.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <initializer_list>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

namespace test::real {

using basisattn::matrix;
using basisattn::matrix_view;

// ---------------------------------------------------------------------------------------------
// Data

#ifdef BASISATTN_SHARED_DIR
/// WikiText-2 raw, test split, as stored (CRLF line ends, " = Title = " headings).
inline const std::string wikitext2_test = std::string(BASISATTN_SHARED_DIR) + "/data/wikitext-2-raw/wiki.test.raw";
#endif
#ifdef BASISATTN_MODEL_CACHE
/// The models scripts/fetch-models.sh caches from PyPI packages.
inline const std::string smollm2_gguf = std::string(BASISATTN_MODEL_CACHE) + "/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
inline const std::string minilm_dir = std::string(BASISATTN_MODEL_CACHE) + "/minilm/";
#endif

/// For test_prerequisites (skip_main.hpp): true when every file opens; otherwise `why` names the
/// first missing one and `how` to get it, which the program prints before CTest reports Skipped.
inline bool files_present(std::initializer_list<std::string> paths, const std::string& how, std::string& why) {
  for (const std::string& p : paths)
    if (!std::ifstream(p)) {
      why = p + " not found (" + how + ")";
      return false;
    }
  return true;
}

/// A whole file as bytes.
inline std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

// ---------------------------------------------------------------------------------------------
// Pair sides: BD on every eligible pair of a layer

/// One BD side of a real layer: the heads' A_g (m x r) and the B_g each pairs with (r x n_g), whose
/// products BD keeps (bd/measure.hpp's notation).
struct pair_side {
  std::string name;
  std::vector<matrix<float>> a, b;
};

/// The Q/K side of an MHA layer (every head its own K: no GQA, and no RoPE, which leaves Q/K dense)
/// from PyTorch-layout (out, in) weights wq, wk (heads hd x d_model): A_h = W_K^h (d_model x hd) and
/// B_h = W_Q^h^T (hd x d_model), since q.k = x W_Q^h (x W_K^h)^T.
inline pair_side qk_side(std::string name, matrix_view<const float> wq, matrix_view<const float> wk, index_t heads) {
  REQUIRE(heads > 0);
  REQUIRE(wq.rows % heads == 0);
  REQUIRE((wk.rows == wq.rows && wk.cols == wq.cols));
  const index_t hd = wq.rows / heads, dm = wq.cols;
  pair_side s{std::move(name), {}, {}};
  for (index_t h = 0; h < heads; ++h) {
    matrix<float> a(dm, hd), b(hd, dm);
    for (index_t i = 0; i < dm; ++i)
      for (index_t j = 0; j < hd; ++j) a(i, j) = wk(h * hd + j, i);
    for (index_t i = 0; i < hd; ++i)
      for (index_t j = 0; j < dm; ++j) b(i, j) = wq(h * hd + i, j);
    s.a.push_back(std::move(a));
    s.b.push_back(std::move(b));
  }
  return s;
}

/// The V/O side of an MHA or GQA layer from PyTorch-layout (out, in) weights wv (kv_heads hd x
/// d_model) and wo (d_model x heads hd): per kv group g, A_g = W_V^g (d_model x hd) and B_g = the
/// W_O^h (hd x d_model) of the heads / kv_heads query heads h of the group, side by side.
inline pair_side vo_side(std::string name, matrix_view<const float> wv, matrix_view<const float> wo, index_t heads,
                         index_t kv_heads) {
  REQUIRE(kv_heads > 0);
  REQUIRE(heads % kv_heads == 0);
  REQUIRE(wv.rows % kv_heads == 0);
  const index_t hd = wv.rows / kv_heads, dm = wv.cols, grp = heads / kv_heads;
  REQUIRE((wo.rows == dm && wo.cols == heads * hd));
  pair_side s{std::move(name), {}, {}};
  for (index_t g = 0; g < kv_heads; ++g) {
    matrix<float> a(dm, hd), b(hd, grp * dm);
    for (index_t i = 0; i < dm; ++i)
      for (index_t j = 0; j < hd; ++j) a(i, j) = wv(g * hd + j, i);
    for (index_t k = 0; k < grp; ++k)
      for (index_t i = 0; i < hd; ++i)
        for (index_t j = 0; j < dm; ++j) b(i, k * dm + j) = wo(j, (g * grp + k) * hd + i);
    s.a.push_back(std::move(a));
    s.b.push_back(std::move(b));
  }
  return s;
}

/// A side's product errors in one storage type, relative to ||A B|| (bd_test_util.hpp's measures).
struct type_errors {
  double first_r = 0, residual_min = 0, pivot = 0;  ///< each strategy's basis, C and B' rounded to nearest
  double aware = 0;                                 ///< the shared pivot's basis, error-aware rounding (round_pair)
  double dense = 0;                                 ///< the dense pair rounded to the type
};
/// The three storage types, and the fp16 error_growth the shared pivot's basis reports.
struct side_errors {
  type_errors f32, f16, bf16;
  double growth = 0;
};

template <class T>
type_errors measure_side_in(const pair_side& s, double* growth = nullptr) {
  std::vector<matrix_view<const float>> a, b;
  for (const auto& m : s.a) a.push_back(m.view());
  for (const auto& m : s.b) b.push_back(m.view());
  const basisattn::bd::strategy st[3] = {basisattn::bd::strategy::first_r, basisattn::bd::strategy::residual_min,
                                         basisattn::bd::strategy::shared_pivot};
  double e[3];
  type_errors r;
  for (int i = 0; i < 3; ++i) {
    basisattn::bd::prepare_options o;
    o.select = st[i];
    o.max_error_growth = INFINITY;  // measure the baselines even where the default would refuse them
    const auto sb = basisattn::bd::factorize<T>(a, o);
    e[i] = bd_product_error<T>(a, b, sb);
    if (st[i] == basisattn::bd::strategy::shared_pivot) {
      r.aware = bd_pair_error<T>(a, b, sb);  // error-aware rounding (the prepared layers')
      if (growth) *growth = sb.report().error_growth;
    }
  }
  r.first_r = e[0], r.residual_min = e[1], r.pivot = e[2];
  r.dense = dense_rounding_error<T>(a, b);
  return r;
}

/// The table check_side prints a block of three rows into.
inline void print_side_header() {
  std::printf("%-22s %6s | %10s %10s %10s %10s %10s | (errors relative to ||AB||; 16-bit as x dense rounding;\n",
              "side", "dtype", "first_r", "res_min", "pivot", "+aware", "dense");
  std::printf("%-22s %6s | %10s %10s %10s %10s %10s |  est. = the pivot basis's error_growth, nearest rounding)\n", "",
              "", "", "", "", "", "");
}

/// What a model's weights are held to beyond the checks every side gets (each measured per model,
/// at the call).
struct side_claims {
  /// The fp16 error_growth the shared pivot's basis reports predicts the measured fp16 ratio to
  /// BD's dense rounding, to 1.5x either way.
  bool growth_predicts = false;
  /// The project's target: error-aware BD costs at most 1.5x the dense weights' own 16-bit
  /// rounding error (fp16 and bf16).
  bool within_target = false;
};

/// BD on one side with the three basis strategies, in fp32, fp16 and bf16: the errors printed (three
/// rows of print_side_header's table) and checked. Every side:
///  * fp32 at the rounding level of the format (the paper's FP32 claim), 2e-7 relative, rounding C
///    and B' to nearest or error-aware;
///  * the shared pivot never worse than first-r or residual-min, in every type;
///  * error-aware rounding beats rounding C and B' to nearest in 16 bits.
/// These are computed in double from the stored values (the same on every machine up to double
/// rounding). Then the claims the model meets (side_claims).
inline side_errors check_side(const pair_side& s, const side_claims& claims) {
  side_errors r;
  r.f32 = measure_side_in<float>(s);
  r.f16 = measure_side_in<Eigen::half>(s, &r.growth);
  r.bf16 = measure_side_in<Eigen::bfloat16>(s);
  const type_errors &e32 = r.f32, &e16 = r.f16, &eb = r.bf16;
  std::printf("%-22s %6s | %10.2e %10.2e %10.2e %10.2e %10.2e |\n", s.name.c_str(), "f32", e32.first_r,
              e32.residual_min, e32.pivot, e32.aware, e32.dense);
  std::printf("%-22s %6s | %9.2fx %9.2fx %9.2fx %9.2fx %10.2e | est. %.2fx\n", s.name.c_str(), "f16",
              e16.first_r / e16.dense, e16.residual_min / e16.dense, e16.pivot / e16.dense, e16.aware / e16.dense,
              e16.dense, r.growth);
  std::printf("%-22s %6s | %9.2fx %9.2fx %9.2fx %9.2fx %10.2e |\n", s.name.c_str(), "bf16", eb.first_r / eb.dense,
              eb.residual_min / eb.dense, eb.pivot / eb.dense, eb.aware / eb.dense, eb.dense);
  INFO(s.name << ": f32 " << e32.first_r << " " << e32.residual_min << " " << e32.pivot << ", f16 " << e16.first_r
              << " " << e16.residual_min << " " << e16.pivot << ", bf16 " << eb.first_r << " " << eb.residual_min << " "
              << eb.pivot);
  CHECK(e32.pivot <= 2e-7);
  CHECK(e32.aware <= 2e-7);
  CHECK(e32.pivot <= std::min(e32.first_r, e32.residual_min));
  CHECK(e16.pivot <= std::min(e16.first_r, e16.residual_min));
  CHECK(eb.pivot <= std::min(eb.first_r, eb.residual_min));
  CHECK(e16.aware < e16.pivot);
  CHECK(eb.aware < eb.pivot);
  if (claims.growth_predicts) {
    CHECK(r.growth < 1.5 * e16.pivot / e16.dense);
    CHECK(r.growth > e16.pivot / e16.dense / 1.5);
  }
  if (claims.within_target) {
    CHECK(e16.aware <= 1.5 * e16.dense);
    CHECK(eb.aware <= 1.5 * eb.dense);
  }
  return r;
}

// ---------------------------------------------------------------------------------------------
// Layers: g, the worst product-error ratio of a BD model

/// One layer's attention weights as a checkpoint stores them: PyTorch layout (out, in); a bias
/// left empty is absent.
struct stored_attention {
  matrix<float> wq, wk, wv, wo;
  std::vector<float> bq, bk, bv, bo;
  /// As bd::mha_weights: the (in, out) matrices of y = x W (transposed views, no copy).
  basisattn::bd::mha_weights<float> weights() const {
    auto ptr = [](const std::vector<float>& v) { return v.empty() ? nullptr : v.data(); };
    return {wq.view().t(), wk.view().t(), wv.view().t(), wo.view().t(), ptr(bq), ptr(bk), ptr(bv), ptr(bo)};
  }
};

/// A copy of a block of a matrix (e.g. the K rows of a fused QKV weight).
inline matrix<float> copy_of(matrix_view<const float> v) {
  matrix<float> m(v.rows, v.cols);
  for (index_t i = 0; i < v.rows; ++i)
    for (index_t j = 0; j < v.cols; ++j) m(i, j) = v(i, j);
  return m;
}

/// g: the largest ratio, over every layer and side of a BD model (`attn`: its prepared layers), of
/// BD's product error to that of the dense weights rounded once to the model's type
/// (bd::measure_product_errors); stored(l) gives layer l's weights as the file holds them (a
/// stored_attention). Computed in double from the stored values, so the same on every machine up
/// to double rounding. The 16-bit BD-vs-dense bounds scale with it.
template <class Layers, class Stored>
double worst_product_error_ratio(const Layers& attn, Stored&& stored) {
  double g = 0;
  for (std::size_t l = 0; l < attn.size(); ++l) {
    const stored_attention s = stored(static_cast<index_t>(l));
    const basisattn::bd::product_errors e = basisattn::bd::measure_product_errors(s.weights(), attn[l]);
    g = std::max({g, e.qk_ratio(), e.vo_ratio()});
  }
  return g;
}

/// h: the largest factor, over every layer and BD'd side of a BD model, by which rounding the
/// side's activations to T in basis coordinates (k' = k A_S^-1 and v' = v A_S^-1 stored, mapped back
/// by A_S; with BD on Q/K also q' = q A_S^T, mapped back by A_S^-T) exceeds rounding them in the dense
/// coordinates, in root-mean-square. Each stored activation entry carries an independent relative
/// error of size u, so the mapped error's energy is sum_i E[a'_i^2] ||M_i||^2 (a' the stored
/// activation, M the map back) against the dense sum_j E[a_j^2]. E[a^2] = c^T S c for an activation
/// a = [x, 1] c (c: a weight column with its bias), S the second moment of the layer input [x, 1]:
/// moments[l], (d_model + 1) square, measured on the data (any scale); without it, x isotropic and
/// biases ignored (S = diag(I, 0)), an assumption rather than a measurement. g (above) covers the
/// weights; this term is what BD changes in the activations' rounding.
template <class Layers, class Stored>
double worst_activation_gain(const Layers& attn, Stored&& stored, const std::vector<Eigen::MatrixXd>& moments = {}) {
  using T = std::remove_const_t<std::remove_reference_t<decltype(*attn[0].q.weight.data())>>;
  double h = 0;
  for (std::size_t l = 0; l < attn.size(); ++l) {
    const auto& L = attn[l];
    const stored_attention st = stored(static_cast<index_t>(l));
    const basisattn::bd::mha_weights<float> w = st.weights();
    const index_t dm = L.config.d_model, d = L.config.head_dim, Hkv = L.config.n_kv_heads, grp = L.config.n_heads / Hkv;
    Eigen::MatrixXd S = Eigen::MatrixXd::Identity(dm + 1, dm + 1);
    S(dm, dm) = 0;
    if (!moments.empty()) {
      REQUIRE(moments.size() == attn.size());
      REQUIRE(moments[l].rows() == dm + 1);
      S = moments[l];
    }
    // Columns [W; b] of a weight block (b: its bias, or zero).
    auto aug = [&](const Eigen::MatrixXd& wb, const float* b) {
      Eigen::MatrixXd c = Eigen::MatrixXd::Zero(dm + 1, wb.cols());
      c.topRows(dm) = wb;
      if (b)
        for (index_t j = 0; j < wb.cols(); ++j) c(dm, j) = b[j];
      return c;
    };
    auto energy = [&](const Eigen::VectorXd& c) { return c.dot(S * c); };
    auto side = [&](const basisattn::bd::any_projection<T>& pr, matrix_view<const float> wa, const float* ba,
                    bool with_q) {
      const auto* p = std::get_if<basisattn::bd::bd_projection<T>>(&pr);
      if (!p) return;
      double num = 0, den = 0, num_q = 0, den_q = 0;
      for (index_t g = 0; g < Hkv; ++g) {
        const Eigen::MatrixXd a = basisattn::bd::detail::to_double(wa.block(0, g * d, dm, d));
        Eigen::MatrixXd ap = aug(basisattn::bd::detail::stored_a(pr, g, dm, d), nullptr);
        if (!p->bias.empty())
          for (index_t i = 0; i < d; ++i)
            ap(dm, i) = static_cast<double>(basisattn::detail::to_compute<float>(p->bias[std::size_t(g * d + i)]));
        const Eigen::MatrixXd ad = aug(a, ba ? ba + g * d : nullptr);
        Eigen::MatrixXd as(d, d);
        for (index_t i = 0; i < d; ++i) as.row(i) = a.row(p->basis_of(g)[i]);
        for (index_t i = 0; i < d; ++i) num += energy(ap.col(i)) * as.row(i).squaredNorm(), den += energy(ad.col(i));
        if (!with_q) continue;
        const Eigen::MatrixXd inv = as.inverse();
        for (index_t hq = g * grp; hq < (g + 1) * grp; ++hq) {
          const Eigen::MatrixXd qd = aug(basisattn::bd::detail::to_double(w.wq.block(0, hq * d, dm, d)),
                                         w.bq ? w.bq + hq * d : nullptr),
                                qp = qd * as.transpose();
          for (index_t i = 0; i < d; ++i)
            num_q += energy(qp.col(i)) * inv.col(i).squaredNorm(), den_q += energy(qd.col(i));
        }
      }
      h = std::max(h, std::sqrt(num / den));
      if (with_q) h = std::max(h, std::sqrt(num_q / den_q));
    };
    side(L.k, w.wk, w.bk, true);
    side(L.v, w.wv, w.bv, false);
  }
  return h;
}

// ---------------------------------------------------------------------------------------------
// Perplexity: per-token NLL and paired statistics

/// NLL of a model over independent sequences (documents or windows), kept per predicted token.
struct ppl_result {
  double nll_sum = 0;
  std::int64_t tokens = 0;
  std::vector<double> nll;          ///< -log p of every predicted token, in order
  std::vector<std::size_t> starts;  ///< index in nll of each sequence's first prediction
  double mean() const { return nll_sum / double(tokens); }
  double perplexity() const { return std::exp(mean()); }
  /// Sequence `ids` (positions from 0): the logits of ids[:-1] predict ids[1:] (as models::nll_sum,
  /// one token at a time). Returns the logits.
  template <class M>
  matrix<float> add(const M& m, const std::vector<std::int32_t>& ids) {
    if (ids.size() < 2) return {};
    matrix<float> lg = m.logits(std::vector<std::int32_t>(ids.begin(), ids.end() - 1));
    starts.push_back(nll.size());
    double sum = 0;
    for (index_t t = 0; t + 1 < static_cast<index_t>(ids.size()); ++t) {
      double mx = -INFINITY, z = 0;
      for (index_t v = 0; v < lg.cols(); ++v) mx = std::max(mx, double(lg(t, v)));
      for (index_t v = 0; v < lg.cols(); ++v) z += std::exp(double(lg(t, v)) - mx);
      const double e = -(double(lg(t, ids[std::size_t(t + 1)])) - mx - std::log(z));
      nll.push_back(e);
      sum += e;
    }
    nll_sum += sum;
    tokens += static_cast<std::int64_t>(ids.size()) - 1;
    return lg;
  }
};

/// Per-token differences x - y of two runs over the same sequences.
inline std::vector<double> difference(const ppl_result& x, const ppl_result& y) {
  REQUIRE(x.starts == y.starts);
  REQUIRE(x.nll.size() == y.nll.size());
  std::vector<double> d(x.nll.size());
  for (std::size_t t = 0; t < d.size(); ++t) d[t] = x.nll[t] - y.nll[t];
  return d;
}

/// Blocks for standard errors, as boundaries in token indices (the first token of each block, then
/// the end). Neighbouring tokens share context, so per-token differences are not independent; block
/// sums nearly are. sequence_blocks: whole sequences (documents or windows, which share no context).
inline std::vector<std::size_t> sequence_blocks(const ppl_result& r) {
  std::vector<std::size_t> b = r.starts;
  b.push_back(r.nll.size());
  return b;
}
/// fixed_blocks: consecutive blocks of `block` tokens (for runs of few, long sequences).
inline std::vector<std::size_t> fixed_blocks(std::size_t n, std::size_t block) {
  REQUIRE(block > 0);
  REQUIRE(n % block == 0);
  std::vector<std::size_t> b;
  for (std::size_t t = 0; t <= n; t += block) b.push_back(t);
  return b;
}

/// A paired statistic: the mean and RMS of per-token differences d, the RMS within each block, and
/// the standard error of the mean from the block sums D_b over n_b tokens (N in all, B blocks; the
/// cluster estimator
///   se^2 = B / (B - 1) sum_b (D_b - mean n_b)^2 / N^2,
/// which for equal blocks is the variance of the block means over B).
struct paired {
  double mean = 0, rms = 0, se = 0;
  std::size_t blocks = 0;
  std::vector<double> block_rms;
};
inline paired paired_difference(const std::vector<double>& d, const std::vector<std::size_t>& bounds) {
  REQUIRE(bounds.size() >= 3);  // two blocks at least
  REQUIRE(bounds.back() == d.size());
  paired p;
  const double N = double(d.size());
  for (const double x : d) p.mean += x / N, p.rms += x * x / N;
  p.rms = std::sqrt(p.rms);
  p.blocks = bounds.size() - 1;
  double var = 0;
  for (std::size_t b = 0; b < p.blocks; ++b) {
    double s = 0, sq = 0;
    for (std::size_t t = bounds[b]; t < bounds[b + 1]; ++t) s += d[t], sq += d[t] * d[t];
    var += std::pow(s - p.mean * double(bounds[b + 1] - bounds[b]), 2);
    p.block_rms.push_back(std::sqrt(sq / double(bounds[b + 1] - bounds[b])));
  }
  p.se = std::sqrt(double(p.blocks) / double(p.blocks - 1) * var) / N;
  return p;
}

/// Ratio of means R = mean(b) / mean(a) over paired samples (one per sentence or block), and its
/// standard error by the delta method: se^2 = var(b_i - R a_i) / (n mean(a)^2).
struct ratio {
  double value = 0, se = 0;
};
inline ratio ratio_of_means(const std::vector<double>& b, const std::vector<double>& a) {
  REQUIRE(a.size() == b.size());
  REQUIRE(a.size() >= 2);
  const double n = double(a.size());
  double ma = 0, mb = 0;
  for (std::size_t i = 0; i < a.size(); ++i) ma += a[i] / n, mb += b[i] / n;
  ratio r;
  r.value = mb / ma;
  double var = 0;
  for (std::size_t i = 0; i < a.size(); ++i) var += std::pow(b[i] - r.value * a[i], 2) / (n - 1);
  r.se = std::sqrt(var / n) / ma;
  return r;
}

/// R = RMS(a) / RMS(c) over the same tokens and its standard error: R^2 is the ratio of means of
/// the block sums A_b, C_b of a^2 and c^2 (ratio_of_means over the blocks), se(R) = se(R^2) / (2 R).
inline ratio rms_ratio(const std::vector<double>& a, const std::vector<double>& c,
                       const std::vector<std::size_t>& bounds) {
  REQUIRE(a.size() == c.size());
  const std::size_t B = bounds.size() - 1;
  std::vector<double> A(B), C(B);
  for (std::size_t b = 0; b < B; ++b)
    for (std::size_t t = bounds[b]; t < bounds[b + 1]; ++t) A[b] += a[t] * a[t], C[b] += c[t] * c[t];
  const ratio r2 = ratio_of_means(A, C);
  ratio r;
  r.value = std::sqrt(r2.value);
  r.se = r2.se / (2 * r.value);
  return r;
}

/// The four runs of a BD perplexity comparison, over the same sequences.
struct bd_perplexity {
  ppl_result dense32, bd32, dense16, bd16;
};

/// How a model's fp16 comparison is held (check_bd_perplexity says why).
struct fp16_claims {
  /// The sample resolves the paper's FP16 figure (4 standard errors of the paired mean well below
  /// 2e-4): assert |mean| + 4 SE <= 2e-4 + 4 realization_sd. Otherwise |mean| <= 2e-4 + 4 SE.
  bool resolves_figure = true;
  /// g of the fp16 BD model (worst_product_error_ratio); NaN: not measured, no error-model bound.
  double g = NAN;
  /// A fixed bound on the RMS ratio, derived at the call; infinity: none.
  double rms_ratio_limit = INFINITY;
  /// The fewest blocks the standard errors may rest on.
  std::size_t min_blocks = 2;
  /// Standard deviation of the paired mean over rounding realizations of the BD weights, which the
  /// SE does not see (measured at the call: the same preparation with the error-aware rounding's
  /// target A_S B perturbed by 1e-7 relative, entrywise times (1 + 1e-7 N(0, 1)) with seeded draws,
  /// or computed in float: a stand-in for another machine's float arithmetic, which changes the
  /// descent's Gram matrices and gradients by as little); 0: not measured.
  double realization_sd = 0;
};

/// The statistics check_bd_perplexity printed and checked (for a caller's own figures).
struct bd_perplexity_stats {
  paired bd32, bd16, dense16;  ///< BD - dense in fp32 and fp16; dense fp16 - dense fp32
  ratio rms;                   ///< RMS(BD - dense, fp16) / RMS(dense fp16 - dense fp32)
};

/// BD against dense on perplexity, in fp32 and fp16, over the same sequences; blocks: the standard
/// errors' blocks (sequence_blocks or fixed_blocks). Printed, then checked on the paired per-token
/// NLL differences (the whole-corpus perplexity change is mostly rounding noise in fp16:
/// activations are rounded to fp16 between layers, and another ISA, thread count or GEMM blocking
/// rounds differently, so a fixed bound on it holds or fails by the machine).
inline bd_perplexity_stats check_bd_perplexity(const char* name, const bd_perplexity& r,
                                               const std::vector<std::size_t>& blocks, const fp16_claims& c) {
  bd_perplexity_stats s;
  s.bd32 = paired_difference(difference(r.bd32, r.dense32), blocks);
  const std::vector<double> dbd = difference(r.bd16, r.dense16), dst = difference(r.dense16, r.dense32);
  s.bd16 = paired_difference(dbd, blocks);
  s.dense16 = paired_difference(dst, blocks);
  s.rms = rms_ratio(dbd, dst, blocks);
  const double c32 = r.bd32.perplexity() / r.dense32.perplexity() - 1,
               c16 = r.bd16.perplexity() / r.dense16.perplexity() - 1;
  const double bound = std::sqrt(1 + std::max(c.g * c.g, 1.0));
  std::printf(
      "%s perplexity over %zu predicted tokens: fp32 dense %.6f, BD %.6f (%+.6f%%); fp16 dense %.6f (%+.4f%% vs "
      "fp32), BD %.6f (%+.6f%%)\n",
      name, dbd.size(), r.dense32.perplexity(), r.bd32.perplexity(), 100 * c32, r.dense16.perplexity(),
      100 * (r.dense16.perplexity() / r.dense32.perplexity() - 1), r.bd16.perplexity(), 100 * c16);
  std::printf(
      "%s per-token NLL differences (mean +- standard error over %zu blocks, RMS):\n"
      "  BD - dense, fp32:        %+.3e +- %.3e, RMS %.3e\n"
      "  BD - dense, fp16:        %+.3e +- %.3e, RMS %.3e (mean / SE %+.2f)\n"
      "  dense fp16 - dense fp32: %+.3e +- %.3e, RMS %.3e\n"
      "  RMS ratio (BD - dense fp16) / (dense fp16 - fp32): %.3f +- %.3f",
      name, s.bd16.blocks, s.bd32.mean, s.bd32.se, s.bd32.rms, s.bd16.mean, s.bd16.se, s.bd16.rms,
      s.bd16.mean / s.bd16.se, s.dense16.mean, s.dense16.se, s.dense16.rms, s.rms.value, s.rms.se);
  if (!std::isnan(c.g)) std::printf("; g %.3f, bound sqrt(1 + max(g^2, 1)) = %.3f", c.g, bound);
  if (std::isfinite(c.rms_ratio_limit)) std::printf("; limit %.2f", c.rms_ratio_limit);
  std::printf("\n");
  INFO(name << ": fp32 change " << c32 << " (per token " << s.bd32.mean << " +- " << s.bd32.se << "); fp16 mean "
            << s.bd16.mean << " +- " << s.bd16.se << ", RMS ratio " << s.rms.value << " +- " << s.rms.se << ", g "
            << c.g);
  REQUIRE(s.bd16.blocks >= c.min_blocks);
  // fp32: BD is an exact reparametrisation. The paper's FP32 figure, +0.0004%, as the bound; the
  // noise of the paired mean must be far below it for the check to mean anything (4 SE).
  CHECK(std::abs(c32) <= 4e-6);
  CHECK(4 * s.bd32.se <= 4e-6);
  // fp16 (a): the perplexity change, exp(mean) - 1 = mean to first order, within the paper's FP16
  //     figure, +0.02%, with room for 4 standard errors of sampling noise. Not |mean| <= 4 SE: part
  //     of the mean is common to all blocks and changes with the machine's arithmetic, which the SE
  //     does not see (e.g. the first layer's rounding errors depend on the token alone, or token and
  //     position, and recur wherever it does). Measured between the AVX-512 and the generic x86-64
  //     builds: fp32 BD - dense +4.1e-8 +- 0.7e-8 vs -4.7e-8 +- 0.7e-8 (stories260K), fp16
  //     +4.3e-5 vs +1.6e-5 +- 1.3e-5 (stories260K), -0.2e-5 vs +1.0e-5 +- 0.9e-5 (slm4096): moves
  //     of up to 2 SE, 2.7e-5.
  //     Where the sample resolves the figure, |mean| + 4 SE <= 2e-4 + 4 realization_sd: measured
  //     at most 9.5e-5 (stories260K; slm4096 4.5e-5) on this code's own rounding, but the
  //     error-aware rounding's descent lands on one of many near-equal optima, and which one moves
  //     with the arithmetic: perturbing its target by 1e-7 relative (float instead of double, or
  //     seeded noise) moved stories260K's mean between -2.7e-5 and +1.5e-4 over 8 draws (mean
  //     6.6e-5, SD 6.7e-5), which a bound of 2e-4 alone would fail on about one machine in six
  //     (mean > 1.3e-4). With the realizations' spread the bound allows |mean| up to about 4e-4 on
  //     stories260K (0.04%, twice the paper's figure; 5 SD above the realizations' mean) and
  //     keeps the figure on slm4096 (2.2e-4); part (b) below still bounds the size of the change.
  //     Where it does not (SmolLM2's 1,022 tokens: SE ~2e-4, as large as the figure, so a fixed
  //     bound on the change holds or fails by the machine's rounding), |mean| <= 2e-4 + 4 SE.
  if (c.resolves_figure) {
    CHECK(std::abs(s.bd16.mean) + 4 * s.bd16.se <= 2e-4 + 4 * c.realization_sd);
  } else {
    CHECK(std::abs(s.bd16.mean) <= 2e-4 + 4 * s.bd16.se);
  }
  // fp16 (b): its size is at the rounding level. Error model, to first order in the perturbations:
  //     dense fp16 - fp32 = P + W + A, where P is the effect of rounding the BD-eligible products
  //     (A_g B_h of measure.hpp) to fp16, W that of rounding the other weights and A that of
  //     rounding activations and logits; BD fp16 - dense fp16 = (BD's product errors, at most g
  //     times P's) - P + (re-rounding of the activations on a slightly different trajectory). With
  //     independent rounding errors, RMS(BD - dense)^2 <= (1 + g^2) P^2 + 2 A^2
  //     <= (1 + max(g^2, 1)) RMS(dense fp16 - fp32)^2. Asserted where g is measured: the RMS ratio
  //     within that bound plus 4 of its standard errors (delta method over the blocks). Measured:
  //     stories260K 1.115 +- 0.006 (AVX-512 build), 1.126 +- 0.007 (generic x86-64 build) against
  //     1.567 (g 1.207); slm4096 1.278, 1.236 +- 0.104 against 1.621 (g 1.275). Where the caller
  //     derives a fixed limit (rms_ratio_limit), the ratio within it.
  if (!std::isnan(c.g)) CHECK(s.rms.value <= bound + 4 * s.rms.se);
  if (std::isfinite(c.rms_ratio_limit)) CHECK(s.rms.value <= c.rms_ratio_limit);
  return s;
}

}  // namespace test::real
