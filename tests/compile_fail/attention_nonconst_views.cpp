// Must not compile: views of non-const data do not deduce T (expected: one plain static_assert).
#include <basisattn/attention.hpp>

int main() {
  float buf[64] = {};
  basisattn::tensor3_view<float> q(buf, 4, 2, 8), k(buf, 4, 2, 8), v(buf, 4, 2, 8), out(buf, 4, 2, 8);
  basisattn::attention(basisattn::cpu{}, q, k, v, out);
}
