//! idkm: compress neural networks by train-time weight clustering with
//! implicit, differentiable k-means, on candle.

pub mod alloc;
pub mod cluster;
pub mod error;

pub use error::{Error, Result};
pub mod io;
