// tools/cuda_emu: cuda/mma.cuh for the host-compiled CUDA sources.
#pragma once
#include "../emu_cuda.h"
