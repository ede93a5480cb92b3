// Must not compile: float activations into an Eigen::half projection (expected: one plain static_assert).
#include <basisattn/bd.hpp>

int main() {
  basisattn::bd::bd_projection<Eigen::half> p;
  float x[8] = {}, y[8] = {};
  basisattn::bd::project(basisattn::cpu{}, p, basisattn::matrix_view<const float>(x, 2, 4),
                         basisattn::matrix_view<float>(y, 2, 4));
}
