// tools/cuda_emu: ATen/cuda/Exceptions.h for the host-compiled CUDA sources.
#pragma once
#include "../../emu_cuda.h"
