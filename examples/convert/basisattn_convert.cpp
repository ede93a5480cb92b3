// basisattn-convert: a checkpoint in, a BD checkpoint (safetensors + metadata) out.
//
//   basisattn-convert IN OUT [--dtype f32|f16|bf16] [--strategy shared_pivot|residual_min|first_r]
//                            [--rounding error_aware|nearest] [--bases automatic|shared|per_kv_head]
//                            [--config config.json] [--no-qk] [--no-vo]
//
// IN: a llama2.c checkpoint (.bin), a GGUF file (llama/mistral/qwen2), or a safetensors file with
// Hugging Face BERT or Llama tensor names (config.json beside it, or --config). A progress bar goes
// to stderr when it is a terminal; a per-layer summary table (basis conditioning, product error of
// BD and of the dense model in the same dtype) and the totals (bytes, time) go to stdout.
// The library call behind it is io::convert_to_bd (<basisattn/io/convert.hpp>).
#include <basisattn/io/convert.hpp>

#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <string>

using namespace basisattn;

namespace {

void usage(FILE* f) {
  std::fprintf(f,
               "usage: basisattn-convert IN OUT [--dtype f32|f16|bf16] [--strategy shared_pivot|residual_min|first_r]\n"
               "                         [--rounding error_aware|nearest] [--bases automatic|shared|per_kv_head]\n"
               "                         [--config config.json] [--no-qk] [--no-vo]\n"
               "IN: llama2.c .bin, GGUF (llama family) or safetensors (HF BERT / Llama names). OUT: safetensors.\n");
}

void progress_bar(index_t done, index_t total, double seconds) {
  const int width = 40, filled = static_cast<int>(width * done / total);
  std::fprintf(stderr, "\r[%.*s%*s] %lld/%lld layers, %.1f s", filled, "########################################",
               width - filled, "", static_cast<long long>(done), static_cast<long long>(total), seconds);
  if (done == total) std::fprintf(stderr, "\n");
  std::fflush(stderr);
}

std::string side_cell(const io::side_report& s) {
  char buf[160];
  if (!s.bd) {
    std::snprintf(buf, sizeof buf, "%-8s %-32s %9.2e %9.2e %6s", "dense", s.why_dense.c_str(), s.error, s.dense_error,
                  "");
  } else {
    std::snprintf(buf, sizeof buf, "%-8s rcond %8.1e |C| %6.2f est %5.2fx %9.2e %9.2e %5.2fx",
                  s.groups > 1 ? "BD/head" : "BD", s.min_rcond, s.max_abs_coeff, s.error_growth, s.error, s.dense_error,
                  s.dense_error > 0 ? s.error / s.dense_error : 0.0);
  }
  return buf;
}

double mib(std::uint64_t b) { return double(b) / (1024.0 * 1024.0); }

}  // namespace

int main(int argc, char** argv) {
  std::string in, out, config;
  io::convert_options o;
  try {
    for (int i = 1; i < argc; ++i) {
      const std::string a = argv[i];
      auto value = [&]() -> std::string {
        if (i + 1 >= argc) throw std::runtime_error("missing value after " + a);
        return argv[++i];
      };
      if (a == "-h" || a == "--help") {
        usage(stdout);
        return 0;
      } else if (a == "--dtype") {
        const std::string v = value();
        if (v == "f32")
          o.type = io::tensor_type::f32;
        else if (v == "f16")
          o.type = io::tensor_type::f16;
        else if (v == "bf16")
          o.type = io::tensor_type::bf16;
        else
          throw std::runtime_error("--dtype must be f32, f16 or bf16, got '" + v + "'");
      } else if (a == "--strategy") {
        const std::string v = value();
        if (v == "shared_pivot")
          o.prepare.select = bd::strategy::shared_pivot;
        else if (v == "residual_min")
          o.prepare.select = bd::strategy::residual_min;
        else if (v == "first_r")
          o.prepare.select = bd::strategy::first_r;
        else
          throw std::runtime_error("--strategy must be shared_pivot, residual_min or first_r, got '" + v + "'");
      } else if (a == "--rounding") {
        const std::string v = value();
        if (v == "error_aware")
          o.prepare.round = bd::rounding::error_aware;
        else if (v == "nearest")
          o.prepare.round = bd::rounding::nearest;
        else
          throw std::runtime_error("--rounding must be error_aware or nearest, got '" + v + "'");
      } else if (a == "--bases") {
        const std::string v = value();
        if (v == "automatic")
          o.grouping = bd::basis_grouping::automatic;
        else if (v == "shared")
          o.grouping = bd::basis_grouping::shared;
        else if (v == "per_kv_head")
          o.grouping = bd::basis_grouping::per_kv_head;
        else
          throw std::runtime_error("--bases must be automatic, shared or per_kv_head, got '" + v + "'");
      } else if (a == "--config") {
        config = value();
      } else if (a == "--no-qk") {
        o.bd_qk = false;
      } else if (a == "--no-vo") {
        o.bd_vo = false;
      } else if (!a.empty() && a[0] == '-') {
        throw std::runtime_error("unknown option " + a);
      } else if (in.empty()) {
        in = a;
      } else if (out.empty()) {
        out = a;
      } else {
        throw std::runtime_error("unexpected argument " + a);
      }
    }
    if (in.empty() || out.empty()) throw std::runtime_error("IN and OUT are required");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "basisattn-convert: %s\n", e.what());
    usage(stderr);
    return 2;
  }
  try {
    const io::checkpoint c = io::open_checkpoint(in, config);
    const auto& a = c.attention;
    std::printf(
        "%s: %s (%s), %zu layers, d_model %lld, %lld/%lld heads of %lld%s -> %s, strategy %s, rounding %s, bases %s\n",
        in.c_str(), c.format.c_str(), c.architecture.c_str(), c.layers.size(), static_cast<long long>(a.d_model),
        static_cast<long long>(a.n_heads), static_cast<long long>(a.n_kv_heads), static_cast<long long>(a.head_dim),
        a.use_rope ? ", RoPE (Q/K stays dense)" : "", io::to_string(o.type), bd::to_string(o.prepare.select),
        bd::to_string(o.prepare.round), bd::to_string(o.grouping));
    const bool tty = isatty(fileno(stderr)) != 0;
    const auto t0 = std::chrono::steady_clock::now();
    if (tty)
      o.progress = [&](index_t done, index_t total) {
        progress_bar(done, total, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      };
    const io::conversion cv = io::convert_to_bd(c, o);
    io::write_conversion(out, cv);

    std::printf("\n%5s | %-4s | %-8s %-32s %9s %9s %6s\n", "layer", "side", "kind", "basis (min rcond, max |C|, est.)",
                "BD err", "dense err", "ratio");
    double worst = 0;
    for (std::size_t l = 0; l < cv.layers.size(); ++l) {
      const auto& r = cv.layers[l];
      std::printf("%5zu | Q/K  | %s\n", l, side_cell(r.qk).c_str());
      std::printf("%5s | V/O  | %s\n", "", side_cell(r.vo).c_str());
      for (const auto* s : {&r.qk, &r.vo})
        if (s->bd && s->dense_error > 0) worst = std::max(worst, s->error / s->dense_error);
    }
    std::printf("\nattention weights: %.2f MiB dense %s -> %.2f MiB BD (%.1f%% saved)\n", mib(cv.attention_dense),
                io::to_string(o.type), mib(cv.attention_output),
                100.0 * (1.0 - double(cv.attention_output) / double(cv.attention_dense)));
    std::printf("all tensors: %.2f MiB in the source, %.2f MiB dense %s, %.2f MiB written to %s\n",
                mib(cv.source_bytes), mib(cv.dense_bytes), io::to_string(o.type), mib(cv.output_bytes), out.c_str());
    std::printf("worst BD product error / dense %s rounding error: %.2fx; conversion took %.1f s\n",
                io::to_string(o.type), worst, cv.seconds);
    return 0;
  } catch (const basisattn::error& e) {
    std::fprintf(stderr, "basisattn-convert: %s\n", e.what());
    return 1;
  }
}
