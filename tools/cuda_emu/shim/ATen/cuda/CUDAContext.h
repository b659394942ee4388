// tools/cuda_emu: ATen/cuda/CUDAContext.h for the host-compiled CUDA sources.
#pragma once
#include "../../emu_cuda.h"
