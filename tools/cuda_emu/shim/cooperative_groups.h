// tools/cuda_emu: cooperative_groups.h for the host-compiled CUDA sources.
#pragma once
#include "emu_cuda.h"
