//! EdgePrompt model layer: GGUF files and Hugging Face model directories, tokenizer, chat templates, the Llama-family forward pass and
//! sampling.

use std::path::PathBuf;

pub mod chat;
pub mod config;
pub mod generate;
#[allow(unsafe_code)] // the read-only mmap of the model file
pub mod gguf;
#[allow(unsafe_code)] // the read-only mmaps of the safetensors files
pub mod hf;
mod hf_tokenizer;
pub mod kv;
pub mod llama;
pub mod paths;
pub mod sampling;
pub mod spm;
pub mod tokenizer;

pub use config::ModelConfig;
pub use hf::{load_model_dir_or_gguf, ModelBundle};
pub use llama::{BatchSeq, IdentityFacts, LayerTimes, LogitsFor, Model};

/// Errors of the model layer. Messages name the file or the value at fault.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] gguf::GgufError),
    #[error("{path}: architecture '{arch}' is not supported (supported: {})", config::SUPPORTED_ARCHS.join(", "))]
    UnsupportedArch { path: PathBuf, arch: String },
    #[error("{path}: architecture '{arch}' is not supported (supported: {})", hf::SUPPORTED_HF_ARCHS.join(", "))]
    UnsupportedHfArch { path: PathBuf, arch: String },
    #[error("{path}: tensor '{name}' is missing")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: {what}")]
    Invalid { path: PathBuf, what: String },
    /// A part of a model (tokenizer, chat template) that failed to load, with what went wrong.
    #[error("{path}: {what}")]
    Load { path: PathBuf, what: String },
    #[error(transparent)]
    Kernel(#[from] ep_kernels::matmul::KernelError),
    #[error(transparent)]
    Tokenizer(#[from] tokenizer::TokenizerError),
    #[error(transparent)]
    Chat(#[from] chat::ChatError),
    #[error(transparent)]
    Sampling(#[from] sampling::SamplingError),
    #[error("KV store: {0}")]
    Kv(String),
    #[error("invalid batch: {0}")]
    Batch(String),
    #[error("context is full: {needed} tokens needed, the context holds {max}")]
    ContextFull { needed: usize, max: usize },
    #[error("{0}")]
    Request(String),
}
