//! Train-time weight clustering by soft (attention) k-means: DKM, IDKM and
//! IDKM-JFB. The math is in `docs/design.md`.
//!
//! - [`config`]: what to cluster and how ([`KmeansConfig`]).
//! - [`reference`]: composed candle ops with autograd; DKM is this unrolled.
//! - [`streaming`]: the CPU twins of the CUDA kernels; never stores m x k.
//! - [`binned`]: k-means passes on scalar weights grouped into narrow bins.
//! - [`temperature`]: the temperature derived from a layer's weights.
//! - [`newton`]: the forward solve for the fixed point (Newton, safeguarded).
//! - [`forward`]: the forward solve on the CPU (bins, weights) and the
//!   factorisation it leaves for the backward.
//! - [`linalg`]: Cholesky, LU and condition estimates of the small systems.
//! - [`solve`]: adjoint solvers (CG, GMRES, Neumann, dense).
//! - [`backward`]: the implicit backward built from the passes.
//! - [`ops`]: candle `CustomOp`s around the passes.
//! - `cuda` (feature `cuda`): launchers of the CUDA kernels, the device twins
//!   of the passes, called from the ops' `cuda_fwd`.
//! - [`layer`]: [`ClusteredWeight`], with warm start and export.

pub mod backward;
pub mod binned;
pub mod config;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod forward;
pub mod init;
pub mod layer;
pub mod linalg;
pub mod newton;
pub mod ops;
pub mod reference;
#[cfg(test)]
mod sample;
pub mod solve;
pub mod streaming;
pub mod temperature;

pub use config::{Distance, Forward, Init, KmeansConfig, Method, Solver};
pub use layer::ClusteredWeight;
pub use newton::ForwardReport;
