// Explicit instantiations of tests/support/instances.hpp for one storage type.
#include "instances.hpp"

BASISATTN_TEST_INSTANCES_DOUBLE()
