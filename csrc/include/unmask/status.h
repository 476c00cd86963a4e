// Launchers return a Status instead of throwing, so the same headers serve C++, CUDA and
// any binding. A refused call names the params field at fault, its value and the rule it
// broke; the binding turns that into a Python exception that shows all three.
#pragma once

#include "unmask/isa_namespace.h"

namespace unmask {

enum class StatusCode : int {
  kOk = 0,
  kInvalidArgument = 1,  // a params field the launcher cannot accept
  kUnsupported = 2,      // valid, but this build or device does not implement it
  kCudaError = 3,        // the CUDA runtime reported an error; see last_cuda_error()
};

struct Status {
  StatusCode code = StatusCode::kOk;
  const char* field = nullptr;  // the params field at fault (a string literal), or nullptr
  double value = 0.0;           // its value (a null pointer reads as 0)
  const char* rule = nullptr;   // what the launcher expected (a string literal)

  bool ok() const { return code == StatusCode::kOk; }
};

UNMASK_BUILD_NAMESPACE_BEGIN

inline Status ok_status() { return Status{}; }

inline Status invalid_argument(const char* field, double value, const char* rule) {
  return Status{StatusCode::kInvalidArgument, field, value, rule};
}

inline Status unsupported(const char* field, double value, const char* rule) {
  return Status{StatusCode::kUnsupported, field, value, rule};
}

inline Status cuda_error() { return Status{StatusCode::kCudaError, nullptr, 0.0, nullptr}; }

UNMASK_BUILD_NAMESPACE_END

}  // namespace unmask
