//! idkm: compress neural networks by train-time weight clustering with
//! implicit, differentiable k-means, on candle.

pub mod alloc;
pub mod checkpoint;
pub mod cluster;
pub mod data;
pub mod device;
pub mod error;
pub mod hub;
pub mod io;
pub mod loader;
pub mod memory;
pub mod model;
mod names;
pub mod nn;
pub mod profile;
pub mod quantize;
pub mod train;

pub use error::{Error, Result};
