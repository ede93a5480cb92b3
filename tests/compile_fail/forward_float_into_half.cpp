// Must not compile: float activations into an Eigen::half layer (expected: one plain static_assert).
#include <basisattn/bd.hpp>

int main() {
  basisattn::bd::mha_layer<Eigen::half> layer;
  float x[8] = {}, y[8] = {};
  basisattn::bd::forward(basisattn::cpu{}, layer, basisattn::matrix_view<const float>(x, 2, 4),
                         basisattn::matrix_view<float>(y, 2, 4));
}
