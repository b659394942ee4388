// tools/cuda_emu: c10/cuda/CUDAException.h for the host-compiled CUDA sources.
#pragma once
#include "../../emu_cuda.h"
