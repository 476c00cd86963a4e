// The SIMT interpreter's stand-in for CUDA's cuda_fp16.h: the same names, for host C++.
#pragma once

#include "simt/cuda_shim.h"
