// basisattn/bd/layers.hpp - prepared attention layers, dense or BD: MHA/GQA/MQA and MLA.
//
// Weights are given as views in `y = x W` form (W: in x out; a PyTorch (out, in) weight is
// `matrix_view(ptr, out, in).t()`), in any storage type; the prepared layer owns copies in T.
//
// MHA / GQA / MQA (prepare_mha): n_heads query heads, n_kv_heads key/value heads of head_dim.
//   bd_qk: K side of every kv head g is BD'd: A_g = W_K^g (d_model x d), paired with W_Q^h of
//          every query head h of the group (W_Q^h <- W_Q^h A_S^T, b_Q^h <- b_Q^h A_S^T,
//          b_K^g <- b_K^g A_S^-1). Exact only when nothing sits between the projection and q.k:
//          with RoPE on q/k it is refused (errc::invalid_argument).
//   bd_vo: V side: A_g = W_V^g, paired with the rows of W_O of every query head of the group
//          (W_O^h <- A_S W_O^h, b_V^g <- b_V^g A_S^-1). Exact with any positional scheme.
//   mha_options::grouping decides per side whether one basis is shared by all kv heads (each of the
//   K and V projections is then one GEMM) or each kv head gets its own (one gather + GEMM per kv
//   head; bd_projection::groups = n_kv_heads). basis_grouping::automatic (default) factorizes both
//   and keeps per-kv-head bases only where the shared basis's estimated error growth (RMS over heads
//   of head_diagnostics::error_growth) exceeds the per-head one by more than per_head_gain.
// MLA, DeepSeek-V2 layout (prepare_mla): q_proj (nope | rope slices per head), kv_a_proj_with_mqa
//   (latent | shared rope key), RMSNorm on the latent, kv_b_proj (k_nope | v per head), o_proj.
//   BD on the K-nope and V up-projections from the latent: A_h = W_UK^h or W_UV^h (L x d), paired
//   with the nope columns of q_proj and the rows of o_proj. The latent channels are permuted at
//   preparation (columns of kv_a_proj and the RMSNorm weight) so that the K basis channels come first
//   and the K projection reads the latent without any gather. basis_sharing::per_side (default)
//   gives K and V their own basis (the V side gathers its 512 - 128 channels, ~1% of its GEMM);
//   basis_sharing::joint uses one basis for all K and V heads (no gather at all, but with twice the
//   heads sharing it the coefficients grow: on DeepSeek-V2-Lite shapes max |C| 23 vs 14-17).
//
// Every prepared layer reports bytes() (its weights) and dense_bytes() (the same layer dense, in
// T), and shard(first_head, count) returns a self-contained layer for those query heads whose
// output is a partial sum: summing the shards' outputs gives the layer's output (o's bias is kept
// by the shard that holds head 0). For GQA a shard must hold whole kv groups.
// The CPU forward passes are in <basisattn/cpu/layers.hpp>.
#pragma once

#include <basisattn/attention/rope.hpp>
#include <basisattn/bd/factorize.hpp>
#include <basisattn/bd/options.hpp>
#include <basisattn/bd/projection.hpp>
#include <basisattn/core/config.hpp>
#include <basisattn/core/error.hpp>
#include <basisattn/core/parallel.hpp>
#include <basisattn/core/view.hpp>
#include <basisattn/core/workspace.hpp>

#include <cmath>
#include <cstddef>
#include <exception>
#include <variant>
#include <vector>

BASISATTN_BEGIN_NAMESPACE
namespace bd {

/// A projection that is either dense or BD.
template <class T>
using any_projection = std::variant<dense_projection<T>, bd_projection<T>>;

template <class T>
std::size_t bytes_of(const any_projection<T>& p) {
  return std::visit([](const auto& q) { return q.bytes(); }, p);
}
template <class T>
bool is_bd(const any_projection<T>& p) {
  return std::holds_alternative<bd_projection<T>>(p);
}

// ------------------------------------------------------------------------------------------------
// MHA / GQA / MQA

/// Shape and attention settings of a multi-head attention layer.
struct mha_config {
  index_t d_model = 0, n_heads = 0, n_kv_heads = 0, head_dim = 0;
  bool causal = true;
  double scale = 0;       ///< softmax scale; 0 selects 1/sqrt(head_dim)
  bool use_rope = false;  ///< apply RoPE to q and k (then only V/O may be BD)
  rope_params rope = {};
};

/// Dense weights of an MHA/GQA layer, y = x W form; biases may be null.
template <class T>
struct mha_weights {
  matrix_view<const T> wq;  ///< d_model x (n_heads head_dim)
  matrix_view<const T> wk;  ///< d_model x (n_kv_heads head_dim)
  matrix_view<const T> wv;  ///< d_model x (n_kv_heads head_dim)
  matrix_view<const T> wo;  ///< (n_heads head_dim) x d_model
  const T* bq = nullptr;
  const T* bk = nullptr;
  const T* bv = nullptr;
  const T* bo = nullptr;
};

/// Whether the kv heads of a BD'd side share one basis (see the top of this header).
enum class basis_grouping {
  automatic,    ///< per side, from the error estimate (mha_options::per_head_gain)
  shared,       ///< one basis for all kv heads: one GEMM per projection
  per_kv_head,  ///< one basis per kv head: one gather + GEMM per kv head
};

inline const char* to_string(basis_grouping g) noexcept {
  return g == basis_grouping::automatic ? "automatic" : g == basis_grouping::shared ? "shared" : "per_kv_head";
}

/// What to BD when preparing an MHA layer.
struct mha_options {
  bool bd_qk = true;  ///< BD on the Q/K pair (refused with RoPE)
  bool bd_vo = true;  ///< BD on the V/O pair
  basis_grouping grouping = basis_grouping::automatic;
  /// automatic: per-kv-head bases are chosen when the shared basis's estimated error growth exceeds
  /// theirs by more than this factor (>= 1). A factor, not an absolute margin: the estimate tracks
  /// the measured product error's trend (docs/fidelity), not its value.
  double per_head_gain = 1.1;
  prepare_options prepare = {};
};

/// A prepared MHA/GQA/MQA layer (dense, BD on Q/K, on V/O, or both).
template <class T>
struct mha_layer {
  mha_config config;
  dense_projection<T> q;  ///< d_model -> n_heads d (transformed when K is BD)
  any_projection<T> k;    ///< d_model -> n_kv_heads d
  any_projection<T> v;    ///< d_model -> n_kv_heads d
  dense_projection<T> o;  ///< n_heads d -> d_model (transformed when V is BD)

  std::size_t bytes() const { return q.bytes() + bytes_of(k) + bytes_of(v) + o.bytes(); }
  /// Bytes of the same layer stored dense in T (weights and the biases this layer has).
  std::size_t dense_bytes() const {
    const index_t dm = config.d_model, hd = config.n_heads * config.head_dim, kd = config.n_kv_heads * config.head_dim;
    std::size_t n = static_cast<std::size_t>(dm * hd * 2 + dm * kd * 2);
    n += q.bias.size() + o.bias.size();
    auto kv_bias = [&](const any_projection<T>& p) {
      return std::visit([](const auto& x) { return x.bias.size(); }, p);
    };
    n += kv_bias(k) + kv_bias(v);
    return n * sizeof(T);
  }
  /// Query heads [first, first + count) as a self-contained layer; outputs of the shards sum to the
  /// layer's output. first and count must be multiples of n_heads / n_kv_heads.
  mha_layer shard(index_t first, index_t count) const;
};

namespace detail {
template <class T>
any_projection<T> slice_kv(const any_projection<T>& p, index_t g0, index_t ng, index_t d) {
  if (const auto* b = std::get_if<bd_projection<T>>(&p)) return slice_heads(*b, g0, ng);
  return slice_columns(std::get<dense_projection<T>>(p), g0 * d, ng * d);
}
/// Error-aware rounding of head g of a basis (shared_basis::round_pair): B_g is the column-wise
/// concatenation of `src` (each r x n_k); the rounded C_g goes to coeff_dst ((m - r) x r) and the
/// blocks of B'_g to `dst` (shaped like src; may be strided or transposed views).
template <class T, class TI>
void round_head(const shared_basis& sb, index_t g, const std::vector<matrix_view<const TI>>& src,
                const std::vector<matrix_view<T>>& dst, matrix_view<T> coeff_dst, int alternations = 2) {
  const index_t r = sb.rank();
  index_t n = 0;
  for (const auto& v : src) n += v.cols;
  // B exactly, in the rounding's working precision (work_t) unless TI is double, read along the
  // view's contiguous direction (the Q/K pair's blocks are transposed views).
  using W = std::conditional_t<std::is_same_v<TI, double>, double, work_t<T>>;
  Eigen::Matrix<W, Eigen::Dynamic, Eigen::Dynamic> b(r, n);
  index_t c0 = 0;
  for (const auto& v : src) {
    if (v.col_stride == 1) {
      for (index_t i = 0; i < r; ++i)
        for (index_t j = 0; j < v.cols; ++j) b(i, c0 + j) = static_cast<W>(::basisattn::detail::to_compute<W>(v(i, j)));
    } else {
      for (index_t j = 0; j < v.cols; ++j)
        for (index_t i = 0; i < r; ++i) b(i, c0 + j) = static_cast<W>(::basisattn::detail::to_compute<W>(v(i, j)));
    }
    c0 += v.cols;
  }
  const rounded_pair<T> rp = sb.template round_pair<T>(g, b, alternations, false);
  for (index_t i = 0; i < coeff_dst.rows; ++i)
    for (index_t j = 0; j < r; ++j) coeff_dst(i, j) = rp.coeff(i, j);
  c0 = 0;
  for (const auto& v : dst) {
    for (index_t i = 0; i < r; ++i)
      for (index_t j = 0; j < v.cols; ++j) v(i, j) = rp.b_prime(i, c0 + j);
    c0 += v.cols;
  }
}

/// RMS over heads of a basis's estimated error growth (head_diagnostics::error_growth).
inline double rms_growth(const std::vector<shared_basis>& bases) {
  double s = 0;
  index_t n = 0;
  for (const shared_basis& b : bases)
    for (const head_diagnostics& h : b.report().heads) s += h.error_growth * h.error_growth, ++n;
  return n ? std::sqrt(s / static_cast<double>(n)) : 0.0;
}

/// The bases of one side's kv heads as opt.grouping asks: one shared basis, or one per head. With
/// automatic, both are factorized (the per-head ones in parallel: the factorization's cost about
/// doubles), and a grouping whose factorization raises (a refusal: errc::singular_basis,
/// rank_deficient, error growth over the limit) loses to the other; when both raise, the shared
/// one's error is raised. Built without exceptions, a refusal aborts as everywhere else. grams: one
/// pair Gram per kv head (factorize's pair_grams).
template <class TS, class TI>
std::vector<shared_basis> choose_bases(const std::vector<matrix_view<const TI>>& heads, const prepare_options& prep,
                                       const mha_options& opt, const std::vector<Eigen::MatrixXd>& grams) {
  BASISATTN_REQUIRE(opt.per_head_gain >= 1 && std::isfinite(opt.per_head_gain), invalid_argument,
                    "prepare_mha: per_head_gain ", opt.per_head_gain, " must be finite and >= 1");
  const index_t G = static_cast<index_t>(heads.size());
  auto per_head = [&] {
    std::vector<shared_basis> b(static_cast<std::size_t>(G));
    ::basisattn::detail::parallel_for(G, [&](index_t g) {
      b[static_cast<std::size_t>(g)] = factorize<TS>(
          std::vector<matrix_view<const TI>>{heads[std::size_t(g)]}, prep,
          grams.empty() ? std::vector<Eigen::MatrixXd>{} : std::vector<Eigen::MatrixXd>{grams[std::size_t(g)]});
    });
    return b;
  };
  if (G == 1 || opt.grouping == basis_grouping::shared) return {factorize<TS>(heads, prep, grams)};
  if (opt.grouping == basis_grouping::per_kv_head) return per_head();
  std::vector<shared_basis> shared, each;
#if BASISATTN_HAS_EXCEPTIONS
  std::exception_ptr shared_error;
  try {
    shared = {factorize<TS>(heads, prep, grams)};
  } catch (const ::basisattn::error&) {
    shared_error = std::current_exception();
  }
  try {
    each = per_head();
  } catch (const ::basisattn::error&) {
    if (shared_error) std::rethrow_exception(shared_error);
    return shared;
  }
#else  // a refusal aborts (core/error.hpp): no fallback to the other grouping
  const bool shared_error = false;
  shared = {factorize<TS>(heads, prep, grams)};
  each = per_head();
#endif
  if (shared_error || rms_growth(shared) > opt.per_head_gain * rms_growth(each)) return each;
  return shared;
}

template <class TI>
std::vector<const TI*> head_pointers(const TI* b, index_t heads, index_t d) {
  std::vector<const TI*> out;
  if (b)
    for (index_t g = 0; g < heads; ++g) out.push_back(b + g * d);
  return out;
}
}  // namespace detail

template <class T>
mha_layer<T> mha_layer<T>::shard(index_t first, index_t count) const {
  const index_t H = config.n_heads, Hkv = config.n_kv_heads, d = config.head_dim, grp = H / Hkv;
  BASISATTN_REQUIRE(first >= 0 && count >= 1 && first + count <= H, invalid_argument, "mha shard: heads [", first, ", ",
                    first + count, ") outside [0, ", H, ")");
  BASISATTN_REQUIRE(first % grp == 0 && count % grp == 0, invalid_argument, "mha shard: heads [", first, ", ",
                    first + count, ") split a kv group of ", grp, " query heads");
  mha_layer s;
  s.config = config;
  s.config.n_heads = count;
  s.config.n_kv_heads = count / grp;
  s.q = slice_columns(q, first * d, count * d);
  s.k = detail::slice_kv(k, first / grp, count / grp, d);
  s.v = detail::slice_kv(v, first / grp, count / grp, d);
  s.o = slice_rows(o, first * d, count * d, first == 0);
  return s;
}

/// Prepare an MHA/GQA/MQA layer: copies the weights into T and applies BD as `opt` asks.
template <class T, class TI>
mha_layer<T> prepare_mha(const mha_weights<TI>& w, const mha_config& cfg, const mha_options& opt = {}) {
  const index_t dm = cfg.d_model, H = cfg.n_heads, Hkv = cfg.n_kv_heads, d = cfg.head_dim;
  BASISATTN_REQUIRE(dm >= 1 && H >= 1 && Hkv >= 1 && d >= 1, invalid_argument, "prepare_mha: d_model ", dm,
                    ", n_heads ", H, ", n_kv_heads ", Hkv, ", head_dim ", d, " must all be >= 1");
  BASISATTN_REQUIRE(H % Hkv == 0, invalid_argument, "prepare_mha: n_heads ", H, " is not a multiple of n_kv_heads ",
                    Hkv);
  auto expect = [](const matrix_view<const TI>& m, index_t r, index_t c, const char* name) {
    BASISATTN_REQUIRE(m.data != nullptr, invalid_argument, "prepare_mha: ", name, " is missing");
    BASISATTN_REQUIRE(m.rows == r && m.cols == c, shape_mismatch, "prepare_mha: ", name, " is ", m.rows, "x", m.cols,
                      ", expected ", r, "x", c, " (y = x W form)");
  };
  expect(w.wq, dm, H * d, "wq");
  expect(w.wk, dm, Hkv * d, "wk");
  expect(w.wv, dm, Hkv * d, "wv");
  expect(w.wo, H * d, dm, "wo");
  BASISATTN_REQUIRE(!(opt.bd_qk && cfg.use_rope), invalid_argument,
                    "prepare_mha: BD on Q/K is not exact with RoPE on q and k (the rotation does not commute with the "
                    "basis change); set bd_qk = false (V/O stays eligible)");
  BASISATTN_REQUIRE(!((opt.bd_qk || opt.bd_vo) && d >= dm), invalid_argument, "prepare_mha: head_dim ", d,
                    " >= d_model ", dm, ": BD needs more input channels than the head dimension");
  const bool fin = opt.prepare.check_finite;
  if (fin) {  // every argument, named as the caller knows it, in the caller's coordinates
    ::basisattn::detail::require_finite(w.wq, "prepare_mha: wq");
    ::basisattn::detail::require_finite(w.wk, "prepare_mha: wk");
    ::basisattn::detail::require_finite(w.wv, "prepare_mha: wv");
    ::basisattn::detail::require_finite(w.wo, "prepare_mha: wo");
    ::basisattn::detail::require_finite(w.bq, H * d, "prepare_mha: bq");
    ::basisattn::detail::require_finite(w.bk, Hkv * d, "prepare_mha: bk");
    ::basisattn::detail::require_finite(w.bv, Hkv * d, "prepare_mha: bv");
    ::basisattn::detail::require_finite(w.bo, dm, "prepare_mha: bo");
  }
  prepare_options scanned = opt.prepare;  // the arguments were scanned above: not again per head
  scanned.check_finite = false;
  const bool weigh_basis = detail::forms_pair_grams(scanned);
  mha_layer<T> L;
  L.config = cfg;
  L.q = make_dense_projection<T>(w.wq, w.bq, false);
  L.o = make_dense_projection<T>(w.wo, w.bo, false);
  const index_t grp = H / Hkv;
  auto side = [&](const matrix_view<const TI>& wa, const TI* ba, bool bd, bool absorb_into_q) -> any_projection<T> {
    if (!bd) return make_dense_projection<T>(wa, ba, false);
    std::vector<matrix_view<const TI>> heads;
    for (index_t g = 0; g < Hkv; ++g) heads.push_back(wa.block(0, g * d, dm, d));
    // B_g, the factor paired with kv head g: for the V/O pair the rows of W_O of the group's query
    // heads; for Q/K the transposed W_Q columns of the group's heads (and their biases, as extra
    // columns: b_Q A_S^T is one more row of W_Q A_S^T). Its Gram weighs the basis choice.
    auto paired = [&](index_t g) {
      std::vector<matrix_view<const TI>> src;
      for (index_t h = g * grp; h < (g + 1) * grp; ++h) {
        if (absorb_into_q) {
          src.push_back(w.wq.block(0, h * d, dm, d).t());
          if (w.bq) src.push_back(matrix_view<const TI>(w.bq + h * d, 1, d).t());
        } else {
          src.push_back(w.wo.block(h * d, 0, d, dm));
        }
      }
      return src;
    };
    std::vector<Eigen::MatrixXd> grams(weigh_basis ? static_cast<std::size_t>(Hkv) : 0);
    ::basisattn::detail::parallel_for(static_cast<index_t>(grams.size()),
                                      [&](index_t g) { grams[static_cast<std::size_t>(g)] = pair_gram(paired(g)); });
    const std::vector<shared_basis> bases = detail::choose_bases<T>(heads, scanned, opt, grams);
    // Head g's basis and its index in it.
    const bool per_head = bases.size() > 1;
    auto basis_of = [&](index_t g) -> const shared_basis& { return bases[per_head ? static_cast<std::size_t>(g) : 0]; };
    auto index_in = [&](index_t g) { return per_head ? index_t(0) : g; };
    bd_projection<T> p = make_bd_projection<T>(bases, detail::head_pointers(ba, Hkv, d));
    if (opt.prepare.round == rounding::error_aware) {
      ::basisattn::detail::parallel_for(Hkv, [&](index_t g) {
        std::vector<matrix_view<T>> dst;  // in the order of paired(g)
        for (index_t h = g * grp; h < (g + 1) * grp; ++h) {
          if (absorb_into_q) {
            dst.push_back(L.q.weight.view().block(0, h * d, dm, d).t());
            if (w.bq) dst.push_back(matrix_view<T>(L.q.bias.data() + h * d, 1, d).t());
          } else {
            dst.push_back(L.o.weight.view().block(h * d, 0, d, dm));
          }
        }
        detail::round_head(basis_of(g), index_in(g), paired(g), dst, p.coeff.view().block(0, g * d, dm - d, d));
      });
      return p;
    }
    ::basisattn::detail::parallel_for(H, [&](index_t h) {
      const shared_basis& sb = basis_of(h / grp);
      const index_t g = index_in(h / grp);
      if (absorb_into_q) {  // W_Q^h A_S^T and b_Q^h A_S^T
        sb.absorb_cols_into(g, w.wq.block(0, h * d, dm, d), L.q.weight.view().block(0, h * d, dm, d));
        if (w.bq)
          sb.absorb_cols_into(g, matrix_view<const TI>(w.bq + h * d, 1, d),
                              matrix_view<T>(L.q.bias.data() + h * d, 1, d));
      } else {  // A_S W_O^h
        sb.absorb_rows_into(g, w.wo.block(h * d, 0, d, dm), L.o.weight.view().block(h * d, 0, d, dm));
      }
    });
    return p;
  };
  L.k = side(w.wk, w.bk, opt.bd_qk, true);
  L.v = side(w.wv, w.bv, opt.bd_vo, false);
  return L;
}

// ------------------------------------------------------------------------------------------------
// MLA (DeepSeek-V2 layout)

/// Shape and attention settings of an MLA layer.
struct mla_config {
  index_t d_model = 0, n_heads = 0;
  index_t kv_lora_rank = 0;  ///< L: latent width (512 in DeepSeek-V2-Lite)
  index_t qk_nope_dim = 0;   ///< 128
  index_t qk_rope_dim = 0;   ///< 64 (even)
  index_t v_head_dim = 0;    ///< 128
  double rms_eps = 1e-6;     ///< RMSNorm epsilon of the latent
  bool causal = true;
  double scale = 0;  ///< 0 selects 1/sqrt(qk_nope_dim + qk_rope_dim)
  rope_params rope = {};
};

/// Dense MLA weights in y = x W form.
template <class T>
struct mla_weights {
  matrix_view<const T> wq;     ///< d_model x H (nope + rope): head h owns [h (nope+rope), (h+1)(nope+rope)), nope first
  matrix_view<const T> wkv_a;  ///< d_model x (L + rope): latent, then the shared rope key
  const T* kv_a_norm = nullptr;  ///< L RMSNorm weights of the latent
  matrix_view<const T> wkv_b;    ///< L x H (nope + v): head h owns [h (nope+v), (h+1)(nope+v)), k_nope first
  matrix_view<const T> wo;       ///< H v x d_model
};

/// How the K-nope and V up-projections share bases in an MLA layer.
enum class basis_sharing {
  per_side,  ///< one basis for the K heads, one for the V heads (V side gathers its basis)
  joint,     ///< one basis for all K and V heads; no gather anywhere, larger coefficients
};

struct mla_options {
  bool bd = true;
  basis_sharing sharing = basis_sharing::per_side;
  prepare_options prepare = {};
};

/// A prepared MLA layer (dense or BD).
template <class T>
struct mla_layer {
  mla_config config;
  dense_projection<T> q;     ///< d_model -> H (nope + rope), nope columns transformed when BD
  dense_projection<T> kv_a;  ///< d_model -> L + rope, latent columns permuted when BD
  std::vector<T> kv_a_norm;  ///< L, permuted like the latent
  any_projection<T> k_up;    ///< latent -> H nope
  any_projection<T> v_up;    ///< latent -> H v
  dense_projection<T> o;     ///< H v -> d_model, rows transformed when BD

  std::size_t bytes() const {
    return q.bytes() + kv_a.bytes() + kv_a_norm.size() * sizeof(T) + bytes_of(k_up) + bytes_of(v_up) + o.bytes();
  }
  std::size_t dense_bytes() const {
    const auto& c = config;
    const index_t H = c.n_heads;
    std::size_t n = static_cast<std::size_t>(
        c.d_model * H * (c.qk_nope_dim + c.qk_rope_dim) + c.d_model * (c.kv_lora_rank + c.qk_rope_dim) +
        c.kv_lora_rank + c.kv_lora_rank * H * (c.qk_nope_dim + c.v_head_dim) + H * c.v_head_dim * c.d_model);
    n += o.bias.size();
    return n * sizeof(T);
  }
  /// Query heads [first, first + count) as a self-contained layer (the latent path is replicated).
  mla_layer shard(index_t first, index_t count) const {
    const auto& c = config;
    BASISATTN_REQUIRE(first >= 0 && count >= 1 && first + count <= c.n_heads, invalid_argument, "mla shard: heads [",
                      first, ", ", first + count, ") outside [0, ", c.n_heads, ")");
    mla_layer s;
    s.config = c;
    s.config.n_heads = count;
    const index_t qd = c.qk_nope_dim + c.qk_rope_dim;
    s.q = slice_columns(q, first * qd, count * qd);
    s.kv_a = kv_a;
    s.kv_a_norm = kv_a_norm;
    s.k_up = detail::slice_kv(k_up, first, count, c.qk_nope_dim);
    s.v_up = detail::slice_kv(v_up, first, count, c.v_head_dim);
    s.o = slice_rows(o, first * c.v_head_dim, count * c.v_head_dim, first == 0);
    return s;
  }
};

/// Prepare an MLA layer (see the top of this header).
template <class T, class TI>
mla_layer<T> prepare_mla(const mla_weights<TI>& w, const mla_config& cfg, const mla_options& opt = {}) {
  const index_t dm = cfg.d_model, H = cfg.n_heads, L = cfg.kv_lora_rank, dn = cfg.qk_nope_dim, dr = cfg.qk_rope_dim,
                dv = cfg.v_head_dim;
  BASISATTN_REQUIRE(dm >= 1 && H >= 1 && L >= 1 && dn >= 1 && dv >= 1 && dr >= 0, invalid_argument,
                    "prepare_mla: d_model ", dm, ", n_heads ", H, ", kv_lora_rank ", L, ", qk_nope_dim ", dn,
                    ", v_head_dim ", dv, " must be >= 1 and qk_rope_dim ", dr, " >= 0");
  BASISATTN_REQUIRE(dr % 2 == 0, invalid_argument, "prepare_mla: qk_rope_dim ", dr, " must be even");
  BASISATTN_REQUIRE(cfg.rms_eps > 0 && std::isfinite(cfg.rms_eps), invalid_argument, "prepare_mla: rms_eps ",
                    cfg.rms_eps, " must be finite and > 0");
  auto expect = [](const matrix_view<const TI>& m, index_t r, index_t c, const char* name) {
    BASISATTN_REQUIRE(m.data != nullptr, invalid_argument, "prepare_mla: ", name, " is missing");
    BASISATTN_REQUIRE(m.rows == r && m.cols == c, shape_mismatch, "prepare_mla: ", name, " is ", m.rows, "x", m.cols,
                      ", expected ", r, "x", c, " (y = x W form)");
  };
  expect(w.wq, dm, H * (dn + dr), "wq");
  expect(w.wkv_a, dm, L + dr, "wkv_a");
  expect(w.wkv_b, L, H * (dn + dv), "wkv_b");
  expect(w.wo, H * dv, dm, "wo");
  BASISATTN_REQUIRE(w.kv_a_norm != nullptr, invalid_argument, "prepare_mla: kv_a_norm is missing");
  BASISATTN_REQUIRE(!opt.bd || (dn < L && dv < L), invalid_argument, "prepare_mla: BD needs qk_nope_dim (", dn,
                    ") and v_head_dim (", dv, ") below kv_lora_rank (", L, ")");
  const bool fin = opt.prepare.check_finite;
  if (fin) {
    ::basisattn::detail::require_finite(w.kv_a_norm, L, "prepare_mla: kv_a_norm");
    ::basisattn::detail::require_finite(w.wq, "prepare_mla: wq");
    ::basisattn::detail::require_finite(w.wkv_a, "prepare_mla: wkv_a");
    ::basisattn::detail::require_finite(w.wkv_b, "prepare_mla: wkv_b");
    ::basisattn::detail::require_finite(w.wo, "prepare_mla: wo");
  }
  prepare_options scanned = opt.prepare;  // the arguments were scanned above: not again per head
  scanned.check_finite = false;
  const bool weigh_basis = detail::forms_pair_grams(scanned);
  mla_layer<T> out;
  out.config = cfg;
  out.kv_a_norm.resize(static_cast<std::size_t>(L));
  for (index_t i = 0; i < L; ++i)
    out.kv_a_norm[static_cast<std::size_t>(i)] =
        ::basisattn::detail::from_compute<T>(::basisattn::detail::to_compute<double>(w.kv_a_norm[i]));
  auto k_head = [&](index_t h) { return w.wkv_b.block(0, h * (dn + dv), L, dn); };
  auto v_head = [&](index_t h) { return w.wkv_b.block(0, h * (dn + dv) + dn, L, dv); };
  if (!opt.bd) {
    out.q = make_dense_projection<T>(w.wq, static_cast<const TI*>(nullptr), false);
    out.kv_a = make_dense_projection<T>(w.wkv_a, static_cast<const TI*>(nullptr), false);
    out.o = make_dense_projection<T>(w.wo, static_cast<const TI*>(nullptr), false);
    dense_projection<T> ku, vu;
    ku.weight = matrix<T>(L, H * dn);
    vu.weight = matrix<T>(L, H * dv);
    for (index_t h = 0; h < H; ++h) {
      ::basisattn::detail::convert_into(ku.weight.view().block(0, h * dn, L, dn), k_head(h));
      ::basisattn::detail::convert_into(vu.weight.view().block(0, h * dv, L, dv), v_head(h));
    }
    out.k_up = std::move(ku);
    out.v_up = std::move(vu);
    return out;
  }
  if (opt.sharing == basis_sharing::joint)
    BASISATTN_REQUIRE(dn == dv, invalid_argument, "prepare_mla: basis_sharing::joint needs qk_nope_dim == v_head_dim (",
                      dn, " vs ", dv, "); use per_side");
  // Factorize.
  std::vector<matrix_view<const TI>> kh, vh;
  for (index_t h = 0; h < H; ++h) kh.push_back(k_head(h)), vh.push_back(v_head(h));
  // The paired factors' Grams (K: the nope columns of q_proj, transposed; V: the rows of o_proj)
  // weigh the basis choice (factorize's pair_grams).
  const index_t qd = dn + dr;
  std::vector<Eigen::MatrixXd> kg(weigh_basis ? static_cast<std::size_t>(H) : 0), vg(kg.size());
  ::basisattn::detail::parallel_for(static_cast<index_t>(2 * kg.size()), [&](index_t i) {
    if (i < H)
      kg[static_cast<std::size_t>(i)] =
          pair_gram(std::vector<matrix_view<const TI>>{w.wq.block(0, i * qd, dm, dn).t()});
    else
      vg[static_cast<std::size_t>(i - H)] =
          pair_gram(std::vector<matrix_view<const TI>>{w.wo.block((i - H) * dv, 0, dv, dm)});
  });
  shared_basis sk, sv;
  bd_projection<T> pk, pv;
  if (opt.sharing == basis_sharing::joint) {
    std::vector<matrix_view<const TI>> all = kh;
    all.insert(all.end(), vh.begin(), vh.end());
    std::vector<Eigen::MatrixXd> ag = kg;
    ag.insert(ag.end(), vg.begin(), vg.end());
    sk = factorize<T>(all, scanned, ag);
    pk = make_bd_projection<T, TI>(sk, {}, 0, H);
    pv = make_bd_projection<T, TI>(sk, {}, H, H);
  } else {
    sk = factorize<T>(kh, scanned, kg);
    sv = factorize<T>(vh, scanned, vg);
    pk = make_bd_projection<T, TI>(sk);
    pv = make_bd_projection<T, TI>(sv);
  }
  const shared_basis& vbasis = opt.sharing == basis_sharing::joint ? sk : sv;
  const index_t v_offset = opt.sharing == basis_sharing::joint ? H : 0;
  // Permute the latent so that the K basis comes first: perm[new] = old.
  std::vector<index_t> perm = sk.basis();
  perm.insert(perm.end(), sk.rest().begin(), sk.rest().end());
  std::vector<index_t> pos(static_cast<std::size_t>(L));
  for (index_t i = 0; i < L; ++i) pos[static_cast<std::size_t>(perm[static_cast<std::size_t>(i)])] = i;
  {
    out.kv_a.weight = matrix<T>(dm, L + dr);
    for (index_t i = 0; i < dm; ++i) {
      for (index_t j = 0; j < L; ++j)
        out.kv_a.weight(i, j) = ::basisattn::detail::from_compute<T>(
            ::basisattn::detail::to_compute<compute_t<TI>>(w.wkv_a(i, perm[static_cast<std::size_t>(j)])));
      for (index_t j = L; j < L + dr; ++j)
        out.kv_a.weight(i, j) =
            ::basisattn::detail::from_compute<T>(::basisattn::detail::to_compute<compute_t<TI>>(w.wkv_a(i, j)));
    }
    std::vector<T> g(static_cast<std::size_t>(L));
    for (index_t j = 0; j < L; ++j)
      g[static_cast<std::size_t>(j)] = out.kv_a_norm[static_cast<std::size_t>(perm[static_cast<std::size_t>(j)])];
    out.kv_a_norm = std::move(g);
  }
  auto remap = [&](bd_projection<T>& p) {
    for (auto& c : p.basis) c = pos[static_cast<std::size_t>(c)];
    for (auto& c : p.rest) c = pos[static_cast<std::size_t>(c)];
  };
  remap(pk);
  remap(pv);
  // Absorb A_S into the nope columns of q (K side) and the rows of o (V side); q's rope columns are
  // copied as they are.
  out.q.weight = matrix<T>(dm, H * qd);
  out.o.weight = matrix<T>(H * dv, dm);
  // With error-aware rounding, each head's C and absorbed block are rounded together (C replaces the
  // nearest-rounded coefficients that make_bd_projection wrote).
  const bool aware = opt.prepare.round == rounding::error_aware;
  ::basisattn::detail::parallel_for(2 * H, [&](index_t h) {
    if (h < H) {
      const auto src = w.wq.block(0, h * qd, dm, dn);
      const auto dst = out.q.weight.view().block(0, h * qd, dm, dn);
      if (aware)
        detail::round_head<T, TI>(sk, h, {src.t()}, {dst.t()}, pk.coeff.view().block(0, h * dn, L - dn, dn));
      else
        sk.absorb_cols_into(h, src, dst);
      ::basisattn::detail::convert_into(out.q.weight.view().block(0, h * qd + dn, dm, dr),
                                        w.wq.block(0, h * qd + dn, dm, dr));
    } else {
      const index_t hv = h - H;
      const auto src = w.wo.block(hv * dv, 0, dv, dm);
      const auto dst = out.o.weight.view().block(hv * dv, 0, dv, dm);
      if (aware)
        detail::round_head<T, TI>(vbasis, v_offset + hv, {src}, {dst}, pv.coeff.view().block(0, hv * dv, L - dv, dv));
      else
        vbasis.absorb_rows_into(v_offset + hv, src, dst);
    }
  });
  out.k_up = std::move(pk);
  out.v_up = std::move(pv);
  return out;
}

/// Options of a layer forward pass.
struct forward_options {
  index_t position_offset = 0;  ///< position of token 0 (RoPE)
  bool check_finite = true;     ///< scan x for NaN/Inf (errc::non_finite)
};

namespace detail {
/// Extents of a forward pass's input and output against the layer's d_model (every backend).
template <class T>
void check_layer_io(const matrix_view<const T>& x, const matrix_view<T>& out, index_t d_model) {
  BASISATTN_REQUIRE(x.cols == d_model, shape_mismatch, "forward: x has ", x.cols, " columns, the layer's d_model is ",
                    d_model);
  BASISATTN_REQUIRE(out.cols == d_model && out.rows == x.rows, shape_mismatch, "forward: out is ", out.rows, "x",
                    out.cols, ", expected ", x.rows, "x", d_model);
  BASISATTN_REQUIRE(x.rows >= 1, invalid_argument, "forward: x has no tokens");
}

/// A forward pass's workspace check on every backend: `need` bytes (workspace_bytes) at `workspace`.
inline void check_forward_workspace(const char* what, const void* workspace, std::size_t bytes, std::size_t need) {
  BASISATTN_REQUIRE(bytes >= need && (need == 0 || workspace), invalid_argument, what, ": workspace of ", bytes,
                    " bytes", workspace ? "" : " (null)", ", ", need, " needed (workspace_bytes)");
}

/// The intermediates of a forward pass over n tokens, carved in this order by w (a counting carver,
/// or one over the caller's workspace): MHA q, k, v, the attention output a; MLA q, the latent kva,
/// k_nope, the keys k (k_nope itself when qk_rope_dim = 0), v, a; then `scratch` bytes that the
/// projections and the attention share (they run one after another). Every backend's forward pass
/// lays its workspace out with these, with its own alignment and scratch size.
template <class T>
struct forward_buffers {
  T *q = nullptr, *k = nullptr, *v = nullptr, *a = nullptr, *kva = nullptr, *knope = nullptr;
  unsigned char* scratch = nullptr;
  std::size_t scratch_bytes = 0, total = 0;
};

template <class T>
forward_buffers<T> carve_forward(const mha_config& c, index_t n, std::size_t scratch,
                                 ::basisattn::detail::workspace_carver w) {
  const index_t H = c.n_heads, Hkv = c.n_kv_heads, d = c.head_dim;
  forward_buffers<T> b;
  b.q = w.take_elems<T>(n * H * d);
  b.k = w.take_elems<T>(n * Hkv * d);
  b.v = w.take_elems<T>(n * Hkv * d);
  b.a = w.take_elems<T>(n * H * d);
  b.scratch = w.take_elems<unsigned char>(static_cast<index_t>(scratch));
  b.scratch_bytes = scratch;
  b.total = w.bytes();
  return b;
}

template <class T>
forward_buffers<T> carve_forward(const mla_config& c, index_t n, std::size_t scratch,
                                 ::basisattn::detail::workspace_carver w) {
  const index_t H = c.n_heads, Lr = c.kv_lora_rank, dn = c.qk_nope_dim, dr = c.qk_rope_dim, dv = c.v_head_dim;
  forward_buffers<T> b;
  b.q = w.take_elems<T>(n * H * (dn + dr));
  b.kva = w.take_elems<T>(n * (Lr + dr));
  b.knope = w.take_elems<T>(n * H * dn);
  b.k = dr > 0 ? w.take_elems<T>(n * H * (dn + dr)) : b.knope;  // no rope: the keys are k_nope itself
  b.v = w.take_elems<T>(n * H * dv);
  b.a = w.take_elems<T>(n * H * dv);
  b.scratch = w.take_elems<unsigned char>(static_cast<index_t>(scratch));
  b.scratch_bytes = scratch;
  b.total = w.bytes();
  return b;
}
}  // namespace detail

}  // namespace bd
BASISATTN_END_NAMESPACE
