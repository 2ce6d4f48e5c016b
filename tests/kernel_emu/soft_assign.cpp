// kernels/soft_assign.cu, unmodified, compiled for the CPU emulator (cuda_emu.h).
#include "cuda_emu.h"

#include "../../kernels/soft_assign.cu"

EMU_KERNEL_TABLE(emu_table_soft_assign,
                 EMU_KERNEL(soft_assign_reduce_f32_d1) EMU_KERNEL(soft_assign_reduce_f32_d2)
                 EMU_KERNEL(soft_assign_reduce_f32_d4) EMU_KERNEL(soft_assign_reduce_f32_d8)
                 EMU_KERNEL(reduce_partials) EMU_KERNEL(kmeans_update) EMU_KERNEL(inverse_mass)
                 EMU_KERNEL(soft_assign_output_f32_d1) EMU_KERNEL(soft_assign_output_f32_d2)
                 EMU_KERNEL(soft_assign_output_f32_d4) EMU_KERNEL(soft_assign_output_f32_d8)
                 EMU_KERNEL(hard_assign_f32_d1) EMU_KERNEL(hard_assign_f32_d2)
                 EMU_KERNEL(hard_assign_f32_d4) EMU_KERNEL(hard_assign_f32_d8)
                 EMU_KERNEL(first_non_finite_f32))
