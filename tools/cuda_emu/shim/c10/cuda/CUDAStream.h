// tools/cuda_emu: c10/cuda/CUDAStream.h for the host-compiled CUDA sources.
#pragma once
#include "../../emu_cuda.h"
