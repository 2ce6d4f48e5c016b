//! Typed errors of the library. The binary adds context with `anyhow`.

/// Everything that can go wrong while configuring or running the clustering.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A clustering configuration value is out of its valid range.
    #[error("invalid clustering config: {0}")]
    Config(String),
    /// A name (architecture, method, solver, ...) that is not one of the
    /// known ones.
    #[error("unknown {what} `{got}` (expected one of: {expected})")]
    UnknownName {
        /// What kind of name it is.
        what: &'static str,
        /// The name given.
        got: String,
        /// The known names, comma-separated.
        expected: String,
    },
    /// A model that cannot be built as asked.
    #[error("model: {0}")]
    Model(String),
    /// A computation produced no usable result (a non-finite or singular
    /// system, a missing gradient).
    #[error("numerical failure: {0}")]
    Numerical(String),
    /// Training diverged: a value became NaN or infinite. Nothing of the
    /// step was applied past the stage, and no checkpoint is written.
    #[error(
        "training diverged at step {step}, in the {stage}{}: {detail} (lower the learning rate, or raise tau; the last checkpoint is kept)",
        .layer.as_ref().map(|l| format!(" of `{l}`")).unwrap_or_default()
    )]
    Diverged {
        /// Steps taken before it.
        step: usize,
        /// Where the non-finite value appeared.
        stage: Stage,
        /// The layer (weight name), where known.
        layer: Option<String>,
        /// What became non-finite.
        detail: String,
    },

    /// The tensor cannot be split into vectors of the cluster dimension.
    #[error("tensor `{tensor}` has {numel} elements, which is not divisible by the cluster dimension {dim}")]
    NotDivisible {
        tensor: String,
        numel: usize,
        dim: usize,
    },

    /// Fewer weight vectors than centroids.
    #[error("tensor `{tensor}` has {vectors} weight vectors of dimension {dim}, fewer than the k = {k} centroids asked for (lower --bits or --cluster-dim)")]
    TooFewVectors {
        tensor: String,
        vectors: usize,
        dim: usize,
        k: usize,
    },

    /// NaN or infinity in an input.
    #[error("tensor `{tensor}` holds a non-finite value ({value}) at flat index {index}")]
    NonFinite {
        tensor: String,
        index: usize,
        value: f64,
    },

    /// Shapes that do not fit together.
    #[error("shape mismatch for `{tensor}`: expected {expected}, got {got}")]
    Shape {
        tensor: String,
        expected: String,
        got: String,
    },

    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A file's contents are not what its format requires.
    #[error("{}: {msg}", path.display())]
    Format {
        path: std::path::PathBuf,
        msg: String,
    },

    /// A checkpoint does not fit the model (the message lists the tensors).
    #[error("checkpoint {} does not fit the model:\n{details}", path.display())]
    Checkpoint {
        path: std::path::PathBuf,
        details: String,
    },

    /// A model or data set could not be resolved through the Hugging Face hub.
    #[error("hub: {0}")]
    Hub(String),

    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// A run that cannot be continued from its checkpoint as asked.
    #[error("cannot continue the run: {0}")]
    Resume(String),

    /// A data set or batching request that cannot be served (not a file's fault).
    #[error("data: {0}")]
    Data(String),
}

/// The stage of a training step where a value became non-finite (see
/// [`Error::Diverged`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The forward k-means solve of a clustered layer (its centroids).
    ForwardKmeans,
    /// The loss of the batch.
    Loss,
    /// The implicit backward of a clustered layer (its weight gradient).
    AdjointSolve,
    /// The backward pass of a layer that is not clustered.
    Backward,
    /// The optimiser's update (a parameter after it).
    Optimizer,
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stage::ForwardKmeans => "forward k-means",
            Stage::Loss => "loss",
            Stage::AdjointSolve => "adjoint solve",
            Stage::Backward => "backward",
            Stage::Optimizer => "optimizer",
        })
    }
}

/// Result alias of the library.
pub type Result<T> = std::result::Result<T, Error>;

impl From<Error> for candle_core::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Candle(e) => e,
            other => candle_core::Error::wrap(other),
        }
    }
}
