// Layer level: the BD layer's output equals the dense layer's output up to rounding, for MHA (BD on
// Q/K and V/O), GQA and MQA with RoPE (V/O only) and MLA (joint and per-side bases); both are
// checked against a plain double reference (support/reference_layers.hpp). Shards sum to the layer.
#include <basisattn/cpu/layers.hpp>

#include <catch2/catch.hpp>

#include "reference_layers.hpp"
#include "test_util.hpp"

using namespace basisattn;
using test::index_t;

namespace {

template <class T>
Eigen::RowVectorXd row_of(const std::vector<T>& v) {
  Eigen::RowVectorXd r(static_cast<index_t>(v.size()));
  for (std::size_t i = 0; i < v.size(); ++i) r(static_cast<index_t>(i)) = static_cast<double>(detail::to_compute<compute_t<T>>(v[i]));
  return r;
}

/// Every value that enters the forward pass is stored in T (weights, q, k, v, the attention output)
/// with a relative error <= u each, about eight roundings in a chain. For 16-bit storage the
/// arithmetic is float, so those roundings dominate: 8 u. For float and double the arithmetic runs in
/// the storage precision too, and sums of up to d_model products add about sqrt(d_model) u each:
/// 32 u. The BD layer must stay within the same bound as the dense one (its extra roundings are those
/// of C and B').
template <class T>
double layer_tol() {
  return (std::is_same_v<T, compute_t<T>> ? 32 : 8) * test::u<T>();
}

template <class T>
void mha_case(index_t H, index_t Hkv, bool rope, bool interleaved) {
  test::seed(1000 + 10 * H + Hkv + 100 * rope);
  const index_t dm = 64, d = 16, n = 37;
  const double s = 0.25;
  auto wq = test::random_matrix<T>(dm, H * d, s), wk = test::random_matrix<T>(dm, Hkv * d, s),
       wv = test::random_matrix<T>(dm, Hkv * d, s), wo = test::random_matrix<T>(H * d, dm, s);
  auto bq = test::random_vector<T>(H * d, 0.1), bk = test::random_vector<T>(Hkv * d, 0.1),
       bv = test::random_vector<T>(Hkv * d, 0.1), bo = test::random_vector<T>(dm, 0.1);
  const auto x = test::random_matrix<T>(n, dm);
  bd::mha_weights<T> w{wq.view(), wk.view(), wv.view(), wo.view(), bq.data(), bk.data(), bv.data(), bo.data()};
  bd::mha_config cfg{dm, H, Hkv, d};
  cfg.use_rope = rope;
  cfg.rope.style = interleaved ? rope_style::interleaved : rope_style::half;

  ref::mha_params rp;
  rp.wq = test::to_double(wq), rp.wk = test::to_double(wk), rp.wv = test::to_double(wv), rp.wo = test::to_double(wo);
  rp.bq = row_of(bq), rp.bk = row_of(bk), rp.bv = row_of(bv), rp.bo = row_of(bo);
  rp.heads = H, rp.kv_heads = Hkv, rp.d = d, rp.rope = rope, rp.interleaved = interleaved;
  const Eigen::MatrixXd want = ref::mha(rp, test::to_double(x));

  bd::mha_options dense_opt;
  dense_opt.bd_qk = dense_opt.bd_vo = false;
  bd::mha_options bd_opt;
  bd_opt.bd_qk = !rope;
  const auto Ld = bd::prepare_mha<T>(w, cfg, dense_opt);
  const auto Lb = bd::prepare_mha<T>(w, cfg, bd_opt);
  CHECK(bd::is_bd(Lb.k) == !rope);
  CHECK(bd::is_bd(Lb.v));
  matrix<T> yd(n, dm), yb(n, dm);
  test::poison(yd);
  test::poison(yb);
  bd::forward(cpu{}, Ld, x.view(), yd.view());
  bd::forward(cpu{}, Lb, x.view(), yb.view());
  const double ed = test::rel_error(test::to_double(yd), want), eb = test::rel_error(test::to_double(yb), want);
  INFO(to_string(dtype_of_v<T>) << " H " << H << "/" << Hkv << " rope " << rope << ": dense error " << ed / test::u<T>()
                                << " u, BD error " << eb / test::u<T>() << " u");
  CHECK(ed <= layer_tol<T>());
  CHECK(eb <= layer_tol<T>());
  // Size: K/V projections lose r rows per kv head; nothing else changes.
  CHECK(Ld.bytes() == Ld.dense_bytes());
  const std::size_t saved = std::size_t(d * Hkv * d) * ((rope ? 0 : 1) + 1) * sizeof(T);
  CHECK(Lb.bytes() + saved == Lb.dense_bytes());

  // Tensor-parallel shards (whole kv groups) sum to the layer's output.
  const index_t grp = H / Hkv;
  Eigen::MatrixXd sum = Eigen::MatrixXd::Zero(n, dm);
  index_t shards = 0;
  for (index_t h0 = 0; h0 < H; h0 += grp, ++shards) {
    const auto S = Lb.shard(h0, grp);
    CHECK(S.config.n_heads == grp);
    matrix<T> ys(n, dm);
    test::poison(ys);
    bd::forward(cpu{}, S, x.view(), ys.view());
    sum += test::to_double(ys);
  }
  CHECK(shards == Hkv);
  CHECK(test::rel_error(sum, want) <= layer_tol<T>());
}

template <class T>
void mla_case(bd::basis_sharing sharing) {
  test::seed(2000 + static_cast<int>(sharing));
  const index_t dm = 96, H = 4, Lr = 48, dn = 16, dr = 8, dv = 16, n = 29;
  const double s = 0.2;
  auto wq = test::random_matrix<T>(dm, H * (dn + dr), s), wa = test::random_matrix<T>(dm, Lr + dr, s),
       wb = test::random_matrix<T>(Lr, H * (dn + dv), s), wo = test::random_matrix<T>(H * dv, dm, s);
  std::vector<T> g(static_cast<std::size_t>(Lr));
  for (auto& v : g) v = detail::from_compute<T>(1.0 + 0.2 * test::normal());
  const auto x = test::random_matrix<T>(n, dm);
  bd::mla_weights<T> w{wq.view(), wa.view(), g.data(), wb.view(), wo.view()};
  bd::mla_config cfg{dm, H, Lr, dn, dr, dv};

  ref::mla_params rp;
  rp.wq = test::to_double(wq), rp.wkv_a = test::to_double(wa), rp.wkv_b = test::to_double(wb), rp.wo = test::to_double(wo);
  rp.norm = row_of(g);
  rp.heads = H, rp.lora = Lr, rp.nope = dn, rp.rope_dim = dr, rp.vdim = dv;
  const Eigen::MatrixXd want = ref::mla(rp, test::to_double(x));

  bd::mla_options dense_opt;
  dense_opt.bd = false;
  bd::mla_options bd_opt;
  bd_opt.sharing = sharing;
  const auto Ld = bd::prepare_mla<T>(w, cfg, dense_opt);
  const auto Lb = bd::prepare_mla<T>(w, cfg, bd_opt);
  REQUIRE(bd::is_bd(Lb.k_up));
  CHECK(std::get<bd::bd_projection<T>>(Lb.k_up).basis_leading());
  CHECK(std::get<bd::bd_projection<T>>(Lb.v_up).basis_leading() == (sharing == bd::basis_sharing::joint));
  matrix<T> yd(n, dm), yb(n, dm);
  test::poison(yd);
  test::poison(yb);
  bd::forward(cpu{}, Ld, x.view(), yd.view());
  bd::forward(cpu{}, Lb, x.view(), yb.view());
  const double ed = test::rel_error(test::to_double(yd), want), eb = test::rel_error(test::to_double(yb), want);
  INFO(to_string(dtype_of_v<T>) << " MLA sharing " << static_cast<int>(sharing) << ": dense error " << ed / test::u<T>()
                                << " u, BD error " << eb / test::u<T>() << " u");
  CHECK(ed <= layer_tol<T>());
  CHECK(eb <= layer_tol<T>());
  CHECK(Ld.bytes() == Ld.dense_bytes());
  CHECK(Lb.bytes() + std::size_t(H * (dn * dn + dv * dv)) * sizeof(T) == Lb.dense_bytes());
  Eigen::MatrixXd sum = Eigen::MatrixXd::Zero(n, dm);
  for (index_t h0 = 0; h0 < H; h0 += 2) {
    matrix<T> ys(n, dm);
    bd::forward(cpu{}, Lb.shard(h0, 2), x.view(), ys.view());
    sum += test::to_double(ys);
  }
  CHECK(test::rel_error(sum, want) <= layer_tol<T>());
}

}  // namespace

TEMPLATE_TEST_CASE("MHA layer: BD on Q/K and V/O equals dense and the double reference", "", float, double,
                   Eigen::half, Eigen::bfloat16) {
  mha_case<TestType>(4, 4, false, true);
}

TEMPLATE_TEST_CASE("GQA and MQA layers with RoPE: BD on V/O equals dense and the double reference", "", float, double,
                   Eigen::half, Eigen::bfloat16) {
  mha_case<TestType>(8, 2, true, true);
  mha_case<TestType>(4, 1, true, false);
  mha_case<TestType>(6, 3, false, true);
}

TEMPLATE_TEST_CASE("MLA layer: BD on K-nope and V equals dense and the double reference", "", float, double,
                   Eigen::half, Eigen::bfloat16) {
  mla_case<TestType>(bd::basis_sharing::joint);
  mla_case<TestType>(bd::basis_sharing::per_side);
}
