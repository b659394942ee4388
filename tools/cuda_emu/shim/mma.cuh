// tools/cuda_emu: mma.cuh for the host-compiled CUDA sources.
#pragma once
#include "emu_cuda.h"
