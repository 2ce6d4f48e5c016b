//! Train-time weight clustering by soft (attention) k-means: DKM, IDKM and
//! IDKM-JFB. The math is in `shared/DESIGN.md`.
//!
//! - [`config`]: what to cluster and how ([`KmeansConfig`]).
//! - [`reference`]: composed candle ops with autograd; DKM is this unrolled.
//! - [`streaming`]: the CPU twins of the CUDA kernels; never stores m x k.
//! - [`binned`]: k-means steps on scalar weights grouped into narrow bins.
//! - [`solve`]: adjoint solvers (CG, GMRES, Neumann).
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
pub mod init;
pub mod layer;
pub mod ops;
pub mod reference;
pub mod solve;
pub mod streaming;

pub use config::{Distance, Init, KmeansConfig, Method, Solver};
pub use layer::ClusteredWeight;
