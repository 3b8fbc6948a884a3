//! Runtime CPU feature detection and the choice of kernel path.
//!
//! The SIMD kernels need AVX2, FMA and F16C together (every x86-64 CPU since Haswell / Zen 1 has
//! all three); [`avx2_available`] detects them once. There is no process-wide kernel switch: a
//! caller chooses a [`Path`] once — normally [`Path::detect`], which the model loaders call — and
//! passes it explicitly, as the first argument, to every kernel that dispatches (`matmul_with`,
//! `vec_dot_with`, `attend_head`, `attend_group`, `splice_scores`, `ops::swiglu`, ...). So two
//! paths can run side by side in one process (the tests compare them bit for bit), and nothing
//! global changes under a running computation.
//!
//! [`Path::detect`] picks [`Path::Avx2`] when the CPU has it, unless the environment variable
//! `EDGEPROMPT_FORCE_SCALAR` is `1` (or `true`/`yes`/`on`); it reads the variable at each call.
//!
//! Both paths give bit-identical results (the scalar kernels emulate the SIMD accumulation order), so
//! the choice changes speed only.

use std::sync::OnceLock;

/// Environment variable that forces the scalar kernels when set to `1` (or `true`/`yes`/`on`).
pub const FORCE_SCALAR_ENV: &str = "EDGEPROMPT_FORCE_SCALAR";

/// A kernel implementation family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Path {
    /// Portable Rust, no `unsafe`; the numeric reference.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C.
    Avx2,
}

impl Path {
    /// Short name for logs: `"scalar"` or `"avx2"`.
    pub fn name(self) -> &'static str {
        match self {
            Path::Scalar => "scalar",
            Path::Avx2 => "avx2",
        }
    }

    /// Whether this CPU can run the path.
    pub fn is_available(self) -> bool {
        match self {
            Path::Scalar => true,
            Path::Avx2 => avx2_available(),
        }
    }

    /// The best path this CPU can run, or [`Path::Scalar`] when `EDGEPROMPT_FORCE_SCALAR` is `1`
    /// (or `true`/`yes`/`on`, any case). The variable is read at each call; call this once (a model
    /// does, when it is loaded) and pass the result on.
    pub fn detect() -> Path {
        if !env_forces_scalar() && avx2_available() {
            Path::Avx2
        } else {
            Path::Scalar
        }
    }
}

static AVX2: OnceLock<bool> = OnceLock::new();

/// Whether the CPU has AVX2, FMA and F16C (detected once).
pub fn avx2_available() -> bool {
    *AVX2.get_or_init(detect_avx2)
}

#[cfg(target_arch = "x86_64")]
fn detect_avx2() -> bool {
    std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
        && std::is_x86_feature_detected!("f16c")
}

#[cfg(not(target_arch = "x86_64"))]
fn detect_avx2() -> bool {
    false
}

fn env_forces_scalar() -> bool {
    std::env::var(FORCE_SCALAR_ENV)
        .map(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        })
        .unwrap_or(false)
}
