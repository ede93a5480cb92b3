// Explicit instantiations of tests/common/instances.hpp for one storage type.
#include "instances.hpp"

BASISATTN_TEST_INSTANCES_HALF()
