// Launchers return a Status instead of throwing, so the same headers serve C++,
// CUDA and any binding. The binding turns a non-OK status into a Python exception.
#pragma once

namespace unmask {

enum class Status : int {
  kOk = 0,
  kInvalidArgument = 1,  // a params field the launcher cannot accept
  kUnsupported = 2,      // valid, but this build or device does not implement it
  kCudaError = 3,        // the CUDA runtime reported an error; see last_cuda_error()
};

inline const char* status_name(Status status) {
  switch (status) {
    case Status::kOk: return "ok";
    case Status::kInvalidArgument: return "invalid argument";
    case Status::kUnsupported: return "unsupported";
    case Status::kCudaError: return "CUDA error";
  }
  return "unknown status";
}

}  // namespace unmask
