//! The edge: the OpenAI-compatible server users talk to. Cloud prompts arrive as signed,
//! content-addressed KV from the cloud ([`fetch`]); everything the user sends — messages, edge prompts —
//! is tokenized, prefilled and decoded here and never leaves the edge.

pub mod fetch;
