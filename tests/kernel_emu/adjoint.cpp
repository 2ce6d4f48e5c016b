// kernels/adjoint.cu, unmodified, compiled for the CPU emulator (cuda_emu.h).
#include "cuda_emu.h"

#include "../../kernels/adjoint.cu"

EMU_KERNEL_TABLE(emu_table_adjoint,
                 EMU_KERNEL(centroid_cotangent_f32_d1) EMU_KERNEL(centroid_cotangent_f32_d2)
                 EMU_KERNEL(centroid_cotangent_f32_d4) EMU_KERNEL(centroid_cotangent_f32_d8)
                 EMU_KERNEL(adjoint_matvec_f32_d1) EMU_KERNEL(adjoint_matvec_f32_d2)
                 EMU_KERNEL(adjoint_matvec_f32_d4) EMU_KERNEL(adjoint_matvec_f32_d8)
                 EMU_KERNEL(cg_matvec_f32_d1) EMU_KERNEL(cg_matvec_f32_d2)
                 EMU_KERNEL(cg_matvec_f32_d4) EMU_KERNEL(cg_matvec_f32_d8)
                 EMU_KERNEL(weight_grad_f32_d1) EMU_KERNEL(weight_grad_f32_d2)
                 EMU_KERNEL(weight_grad_f32_d4) EMU_KERNEL(weight_grad_f32_d8)
                 EMU_KERNEL(cg_init) EMU_KERNEL(cg_update) EMU_KERNEL(cg_finish))
