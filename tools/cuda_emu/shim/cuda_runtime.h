// tools/cuda_emu: cuda_runtime.h for the host-compiled CUDA sources.
#pragma once
#include "emu_cuda.h"
