//! EdgePrompt CPU kernels.
//!
//! Everything numeric that the model runs sits here, behind plain slice-based functions: the ggml block
//! formats (so GGUF weights are used in place, without conversion), activation quantisation exactly as
//! ggml's x86 CPU backend does it (so the integer dot products match llama.cpp's), the quantised dot
//! products and matmul, the small float ops (RMSNorm, RoPE, softmax, SiLU), and attention over
//! contiguous (`attention`) and paged (`paged`) KV storage, and the same paged attention split into phases
//! that many sequences sharing a key prefix run together (`splice`).
//!
//! Layout: each kernel family's file (`quant.rs`, `kquant.rs`, `attention.rs`, `paged.rs`, `splice.rs`,
//! `reduce.rs`) holds its API, the dispatch on the [`simd::Path`] the caller passes, and the portable
//! code; the x86-64 AVX2 implementations live in `x86/` (room beside it for `arm/`), and where the
//! portable reference is a module of its own it lives in `generic/`. The module paths stay
//! `quant::avx2`, `quant::scalar`, ...
//!
//! The kernels are hand-written rather than taken from a crate: no crate offers ggml's block formats with
//! runtime-dispatched SIMD integer dot products (candle's Q4_1 path is scalar and measured 3–4× slower than
//! llama.cpp on these machines).

#[allow(unsafe_code)] // SIMD
pub mod attention;
#[allow(unsafe_code)] // SIMD
pub mod kquant;
#[allow(unsafe_code)] // the output matrix shared by tasks with disjoint columns
pub mod matmul;
#[allow(unsafe_code)] // SIMD
pub mod ops;
#[allow(unsafe_code)] // SIMD
pub mod paged;
#[allow(unsafe_code)] // SIMD
pub mod quant;
#[allow(unsafe_code)] // SIMD
pub mod reduce;
pub mod simd;
#[allow(unsafe_code)] // SIMD
pub mod splice;

pub use quant::GgmlType;
