//! Runtime CPU feature detection and the choice of kernel path.
//!
//! The SIMD kernels need AVX2, FMA and F16C together (every x86-64 CPU since Haswell / Zen 1 has all
//! three). They are detected once, at first use. The scalar path can be forced:
//!
//! - by the environment variable `EDGEPROMPT_FORCE_SCALAR=1` (read once, at first use), or
//! - by [`set_force_scalar`] (tests, benchmarks), which overrides the environment variable.
//!
//! Both paths give bit-identical results (the scalar kernels emulate the SIMD accumulation order), so
//! the choice changes speed only.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Once, OnceLock};

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
}

static AVX2: OnceLock<bool> = OnceLock::new();
static FORCE_SCALAR: AtomicBool = AtomicBool::new(false);
static FORCE_FROM_ENV: Once = Once::new();

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

fn init_force_from_env() {
    FORCE_FROM_ENV.call_once(|| {
        if env_forces_scalar() {
            FORCE_SCALAR.store(true, Ordering::Relaxed);
        }
    });
}

/// Forces (or stops forcing) the scalar path for every later dispatch, process-wide. Overrides
/// `EDGEPROMPT_FORCE_SCALAR`.
pub fn set_force_scalar(force: bool) {
    init_force_from_env();
    FORCE_SCALAR.store(force, Ordering::Relaxed);
}

/// Whether the scalar path is currently forced.
pub fn force_scalar() -> bool {
    init_force_from_env();
    FORCE_SCALAR.load(Ordering::Relaxed)
}

/// The path the dispatching functions use now: the best available one unless the scalar path is forced.
pub fn path() -> Path {
    if !force_scalar() && avx2_available() {
        Path::Avx2
    } else {
        Path::Scalar
    }
}

/// Name of the active path for logs: `"avx2"` or `"scalar"`.
pub fn active_path() -> &'static str {
    path().name()
}
