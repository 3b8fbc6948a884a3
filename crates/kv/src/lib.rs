//! EdgePrompt KV store: a block pool with a hard byte budget and a prefix tree of shared blocks keyed by
//! chained, salted, process-independent hashes.
//!
//! The engine owns one [`BlockPool`] and one [`PrefixCache`]; sequences hold block tables (lists of
//! [`BlockId`]) into the pool. Scheduling policy (who gets blocks, who is preempted) lives in the engine.
//!
//! [`identity`] defines what KV was computed by (the content identity and the cache root every chain
//! starts from); [`wire`] the byte format KV travels in between processes; [`codec`] the frame payloads
//! (raw, and the lossy int8 / int4 codecs).

pub mod codec;
pub mod identity;
pub mod pool;
pub mod tree;
pub mod wire;

pub use ep_kernels::paged::KvDtype;
pub use identity::{cache_root, ContentIdentity, NUMERICS_VERSION};
pub use pool::{BlockId, BlockPool, KvLayout};
pub use tree::{block_hashes, BlockHash, Hit, PrefixCache};

/// Errors of the KV store.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("KV configuration: {0}")]
    Config(String),
}
