//! EdgePrompt benchmarks. Speed is measured here and reported as numbers and ratios, never asserted in
//! tests.

pub mod batch;
pub mod codecs;
pub mod micro;
pub mod serve;

/// Median of a non-empty list (the lower middle for even lengths).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[(v.len() - 1) / 2]
}
