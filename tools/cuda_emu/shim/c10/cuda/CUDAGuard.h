// tools/cuda_emu: c10/cuda/CUDAGuard.h for the host-compiled CUDA sources.
#pragma once
#include "../../emu_cuda.h"
