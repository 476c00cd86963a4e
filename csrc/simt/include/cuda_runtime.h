// The SIMT interpreter's stand-in for CUDA's cuda_runtime.h: the same names, for host C++.
#pragma once

#include "simt/cuda_shim.h"
