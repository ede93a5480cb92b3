// capture_check: the attention captures of examples/common/attention_capture.hpp reproduce the
// models' own attention.
//
//   capture_check [--shared DIR] [--cache DIR] [stories260K_n [smollm2_n [slm4096_n]]]
//     defaults: n = 256 (stories260K), 1024 (SmolLM2-135M), 128 (slm4096); DIR defaults are the
//     build's BASISATTN_SHARED_DIR (../shared) and BASISATTN_MODEL_CACHE (.cache/models).
//
// For every available model and every layer: the exact double-precision oracle
// basisattn::attention_reference(q, k, v, {causal, captured scale}) against the captured output of
// the model's forward (relative Frobenius error, ~1e-7 expected: float kernel vs double), and the
// capture's forward check (||W_O out - a|| / ||a|| against the model's attention block output: 0
// when bit for bit). Also per layer: max |q|, max |k|, and the fraction of [token, head] rows of q
// and of k with some |entry| > sqrt(ln n), raw and with the scale split evenly (q sqrt(scale),
// k sqrt(scale), whose dot product is the softmax logit). Missing models are skipped with a
// message. Exit status 1 when an error exceeds 1e-5 (oracle) or 1e-6 (forward check).
#include "attention_capture.hpp"

#include <basisattn/attention/reference.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

/// ||a - b||_F / ||b||_F with a in float, b in double.
double rel_error(const std::vector<float>& a, const std::vector<double>& b) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double e = double(a[i]) - b[i];
    num += e * e;
    den += b[i] * b[i];
  }
  return std::sqrt(num / den);
}

}  // namespace

int main(int argc, char** argv) {
  std::string shared_dir = BASISATTN_SHARED_DIR, model_cache = BASISATTN_MODEL_CACHE;
  std::vector<capture::index_t> ns = {256, 1024, 128};
  std::size_t positional = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--shared" && i + 1 < argc)
      shared_dir = argv[++i];
    else if (a == "--cache" && i + 1 < argc)
      model_cache = argv[++i];
    else if (positional < ns.size() && !a.empty() && a[0] != '-')
      ns[positional++] = std::atol(a.c_str());
    else {
      std::fprintf(stderr, "usage: %s [--shared DIR] [--cache DIR] [stories260K_n [smollm2_n [slm4096_n]]]\n", argv[0]);
      return 2;
    }
  }

  struct job {
    const char* name;
    std::function<std::optional<capture::model_capture>(std::string&)> load;
  };
  const std::vector<job> jobs = {
      {"stories260K", [&](std::string& why) { return capture::load_stories260k_capture(shared_dir, ns[0], why); }},
      {"SmolLM2-135M",
       [&](std::string& why) { return capture::load_smollm2_capture(model_cache, shared_dir, ns[1], why); }},
      {"slm4096", [&](std::string& why) { return capture::load_slm4096_capture(shared_dir, ns[2], why); }},
  };

  const auto t_all = std::chrono::steady_clock::now();
  double worst_ref = 0, worst_fwd = 0;
  int captured = 0;
  for (const job& j : jobs) {
    std::string why;
    const auto t0 = std::chrono::steady_clock::now();
    std::optional<capture::model_capture> mc;
    try {
      mc = j.load(why);
    } catch (const std::exception& e) {
      std::printf("%s: FAILED to capture: %s\n\n", j.name, e.what());
      worst_ref = INFINITY;
      continue;
    }
    if (!mc) {
      std::printf("%s: skipped (%s)\n\n", j.name, why.c_str());
      continue;
    }
    const double t_capture = seconds_since(t0);
    ++captured;
    const capture::index_t n = static_cast<capture::index_t>(mc->ids.size());
    const double thr = std::sqrt(std::log(double(n)));
    std::printf("%s: %s; %s\n", mc->model.c_str(), mc->text.c_str(), mc->positions.c_str());
    std::printf("threshold sqrt(ln n) = %.4f; q', k' = q sqrt(scale), k sqrt(scale)\n", thr);
    std::printf("%-13s %5s %5s %4s %5s %4s %8s %8s %8s %10s %10s %7s %7s %7s %7s\n", "model", "layer", "n", "H_q",
                "H_kv", "d", "scale", "max|q|", "max|k|", "rel.err", "fwd.check", "q>thr", "k>thr", "q'>thr", "k'>thr");
    const auto t1 = std::chrono::steady_clock::now();
    for (const capture::layer_capture& c : mc->layers) {
      std::vector<double> ref(c.out.size());
      basisattn::attention_reference(c.q_view(), c.k_view(), c.v_view(),
                                     basisattn::tensor3_view<double>(ref.data(), c.n, c.h_q, c.d_v), c.options());
      const double err = rel_error(c.out, ref);
      const double rs = std::sqrt(c.scale);
      std::printf("%-13s %5ld %5ld %4ld %5ld %4ld %8.5f %8.3f %8.3f %10.3e %10.3e %7.4f %7.4f %7.4f %7.4f\n",
                  mc->model.c_str(), long(c.layer), long(c.n), long(c.h_q), long(c.h_kv), long(c.d), c.scale,
                  capture::max_abs(c.q), capture::max_abs(c.k), err, c.forward_check,
                  capture::rows_above(c.q_view(), thr), capture::rows_above(c.k_view(), thr),
                  capture::rows_above(c.q_view(), thr / rs), capture::rows_above(c.k_view(), thr / rs));
      worst_ref = std::max(worst_ref, err);
      worst_fwd = std::max(worst_fwd, c.forward_check);
    }
    std::printf("%s: capture (load + forward) %.2f s, reference check %.2f s\n\n", mc->model.c_str(), t_capture,
                seconds_since(t1));
  }
  const bool ok = worst_ref <= 1e-5 && worst_fwd <= 1e-6;
  std::printf("%d model(s) captured; worst oracle error %.3e, worst forward check %.3e: %s (%.1f s in all)\n", captured,
              worst_ref, worst_fwd, ok ? "OK" : "FAILED", seconds_since(t_all));
  return ok ? 0 : 1;
}
