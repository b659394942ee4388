// tools/cuda_emu: cublas_v2.h for the host-compiled CUDA sources.
#pragma once
#include "emu_cuda.h"
