//! ggml tensor types, block formats, activation quantisation and dot products.
//!
//! Everything here reproduces what llama.cpp's x86 CPU backend computes when built for AVX2 + FMA + F16C
//! (`-march=native` with GCC, as the reference build is), bit for bit:
//!
//! - Weight blocks are ggml's (`block_q4_0`, `block_q4_1`, `block_q5_0`, `block_q5_1`, `block_q8_0`),
//!   read from little-endian, unaligned GGUF bytes; dequantisation follows `ggml-quants.c` (built
//!   without FMA contraction). Q5_0 / Q5_1 are Q4_0 / Q4_1 with a fifth bit per weight in `qh`
//!   (ggml's `bytes_from_bits_32`): the formats `llama-quantize` falls back to for rows that are not
//!   whole K-quant super-blocks (every 576-wide row of the default model in a Q4_K_M file).
//! - Activations are quantised like `quantize_row_q8_0` / `quantize_row_q8_1` of `ggml-cpu/arch/x86`:
//!   `amax` by `maxps` in ggml's lane order, `d = amax / 127`, `id = 127 / amax`, `q = round-half-even(x * id)`
//!   (`_mm256_round_ps`), `cvtps_epi32` then saturating packs (so a NaN/inf product becomes `-128`), and
//!   for Q8_1 `s = f16(d * Σq)` with the f32 `d`.
//! - The dot products keep ggml's AVX2 accumulation: per 32-block, eight i32 lane sums (elements
//!   `4l..4l+4`, via the `maddubs`/`madd` sign trick for signed weights), converted to f32 and
//!   accumulated lane-wise with FMA by the block scale, then ggml's `hsum_float_8`. For Q4_1 / Q5_1 the
//!   `m·s` terms go to a separate f32 sum with FMA (GCC contracts `summs += m*s`), added last. The
//!   f16/bf16/f32 dots follow `ggml_vec_dot_f16/bf16/f32` (4×8 FMA accumulators, their reductions, and
//!   their leftovers: in f64 for f16/bf16; for f32 unfused then fused, as GCC vectorised that loop).
//!
//! The scalar kernels ([`scalar`]) emulate that order exactly, so the scalar and AVX2 paths agree bit
//! for bit, and a result depends only on the two rows (never on batch size, threads or chunking).
//! `tests/ggml_golden.rs` checks all of this against outputs of the real ggml build.
//!
//! The 32-element formats share one AVX2 kernel per shape, generic over the block format (`Block32`:
//! how to unpack a block's codes, signed or with a minimum). Three shapes, the same per-pair
//! arithmetic: one weight row x one activation row ([`vec_dot_with`]), a run of consecutive weight
//! rows x one activation row (decode: four rows at a time share the activation loads, and the weights,
//! streamed from DRAM at batch 1, are software-prefetched two four-row groups ahead, which doubles
//! the decode matmul throughput on Zen 3), and the panel: one weight row x many groups of four
//! activation rows (prefill and batches: the row's codes, `|codes|` and scales unpacked once for all
//! the groups, the activations' scales pre-converted to f32, every pair scale `dw * da` formed four
//! at a time before the integer work). The K-quants have a panel too (one super-block unpacked for
//! four activation rows, [`kquant`]).
//!
//! Activation quantisation has a scalar and an AVX2 version (ggml's x86 code), chosen like the dot
//! products by the caller's [`Path`] (see [`crate::simd`]); both write the same bytes.
//!
//! The K-quant types (Q4_K, Q5_K, Q6_K weights, Q8_K activations; 256-element super-blocks) are
//! implemented in [`crate::kquant`]; [`GgmlType`] and the entry points here dispatch to it, so the
//! matmul and row lookup take them like any other type.

use half::f16;

use crate::kquant::{self, KType, Q8K_BYTES, QK_K};
use crate::simd::{self, Path};

/// A ggml tensor element type, with ggml's numeric ids (as stored in GGUF).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    /// 5-bit blocks: `Q4_0` with a fifth bit per weight (`qh`), values `-16..16`.
    Q5_0,
    /// 5-bit blocks with a minimum: `Q4_1` with a fifth bit per weight, values `0..32`.
    Q5_1,
    Q8_0,
    Q8_1,
    BF16,
    /// K-quant super-blocks of 256 weights ([`crate::kquant`]).
    Q4_K,
    Q5_K,
    Q6_K,
    /// K-quant activations (the vec-dot type of Q4_K, Q5_K and Q6_K); not a weight type.
    Q8_K,
}

impl GgmlType {
    /// Maps a ggml type id to a supported type; `None` for ids this build does not support.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            9 => Self::Q8_1,
            12 => Self::Q4_K,
            13 => Self::Q5_K,
            14 => Self::Q6_K,
            15 => Self::Q8_K,
            30 => Self::BF16,
            _ => return None,
        })
    }

    /// ggml's numeric id of this type.
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q5_0 => 6,
            Self::Q5_1 => 7,
            Self::Q8_0 => 8,
            Self::Q8_1 => 9,
            Self::Q4_K => 12,
            Self::Q5_K => 13,
            Self::Q6_K => 14,
            Self::Q8_K => 15,
            Self::BF16 => 30,
        }
    }

    /// ggml's name for the type (`"q4_1"`, `"q4_K"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Q4_0 => "q4_0",
            Self::Q4_1 => "q4_1",
            Self::Q5_0 => "q5_0",
            Self::Q5_1 => "q5_1",
            Self::Q8_0 => "q8_0",
            Self::Q8_1 => "q8_1",
            Self::BF16 => "bf16",
            Self::Q4_K => "q4_K",
            Self::Q5_K => "q5_K",
            Self::Q6_K => "q6_K",
            Self::Q8_K => "q8_K",
        }
    }

    /// Elements per block.
    pub fn block_size(self) -> usize {
        match self {
            Self::F32 | Self::F16 | Self::BF16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 | Self::Q8_0 | Self::Q8_1 => 32,
            Self::Q4_K | Self::Q5_K | Self::Q6_K | Self::Q8_K => QK_K,
        }
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q8_0 => 34,
            Self::Q8_1 => 36,
            Self::Q4_K => KType::Q4K.type_size(),
            Self::Q5_K => KType::Q5K.type_size(),
            Self::Q6_K => KType::Q6K.type_size(),
            Self::Q8_K => Q8K_BYTES,
        }
    }

    /// Bytes of a row of `n` elements; `None` if `n` is not a whole number of blocks.
    pub fn row_bytes(self, n: usize) -> Option<usize> {
        n.is_multiple_of(self.block_size())
            .then(|| n / self.block_size() * self.type_size())
    }

    /// The type activations are converted to before a dot product with a row of this type (ggml's
    /// `vec_dot_type`); `None` for types that are not used as matmul weights (Q8_1, Q8_K).
    pub fn vec_dot_type(self) -> Option<GgmlType> {
        Some(match self {
            Self::F32 => Self::F32,
            Self::F16 => Self::F16,
            Self::BF16 => Self::BF16,
            Self::Q4_0 | Self::Q5_0 | Self::Q8_0 => Self::Q8_0,
            Self::Q4_1 | Self::Q5_1 => Self::Q8_1,
            Self::Q4_K | Self::Q5_K | Self::Q6_K => Self::Q8_K,
            Self::Q8_1 | Self::Q8_K => return None,
        })
    }

    /// The K-quant weight format of this type (Q4_K, Q5_K, Q6_K), if it is one.
    pub fn ktype(self) -> Option<KType> {
        match self {
            Self::Q4_K => Some(KType::Q4K),
            Self::Q5_K => Some(KType::Q5K),
            Self::Q6_K => Some(KType::Q6K),
            _ => None,
        }
    }
}

/// Name of a ggml type id for error messages, including types this build does not support.
pub fn ggml_type_name(id: u32) -> String {
    const NAMES: &[(u32, &str)] = &[
        (0, "f32"),
        (1, "f16"),
        (2, "q4_0"),
        (3, "q4_1"),
        (6, "q5_0"),
        (7, "q5_1"),
        (8, "q8_0"),
        (9, "q8_1"),
        (10, "q2_K"),
        (11, "q3_K"),
        (12, "q4_K"),
        (13, "q5_K"),
        (14, "q6_K"),
        (15, "q8_K"),
        (16, "iq2_xxs"),
        (17, "iq2_xs"),
        (18, "iq3_xxs"),
        (19, "iq1_s"),
        (20, "iq4_nl"),
        (21, "iq3_s"),
        (22, "iq2_s"),
        (23, "iq4_xs"),
        (24, "i8"),
        (25, "i16"),
        (26, "i32"),
        (27, "i64"),
        (28, "f64"),
        (29, "iq1_m"),
        (30, "bf16"),
        (34, "tq1_0"),
        (35, "tq2_0"),
        (39, "mxfp4"),
    ];
    NAMES
        .iter()
        .find(|(i, _)| *i == id)
        .map(|(_, n)| n.to_string())
        .unwrap_or_else(|| format!("type id {id}"))
}

// ---------------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------------

/// Shape and type errors of the kernel entry points that callers can reach with bad input (a tensor
/// whose shape or byte size does not match its type).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KernelError {
    #[error("{ty} rows of {cols} elements: {cols} is not a multiple of the block size {block}")]
    NotBlockAligned {
        ty: &'static str,
        cols: usize,
        block: usize,
    },
    #[error("{ty} weight data is {got} bytes, expected {expected} ({rows} rows x {cols} columns)")]
    WeightBytes {
        ty: &'static str,
        rows: usize,
        cols: usize,
        got: usize,
        expected: usize,
    },
    #[error("{what} has {got} elements, expected {expected}")]
    Length {
        what: &'static str,
        got: usize,
        expected: usize,
    },
    #[error("row {row} out of range for a tensor of {rows} rows")]
    RowOutOfRange { row: usize, rows: usize },
    #[error("{0} tensors cannot be used as matmul weights")]
    UnsupportedWeightType(&'static str),
    #[error("kernel path {0} is not available on this CPU")]
    PathUnavailable(&'static str),
}

// ---------------------------------------------------------------------------------------------------
// Block layouts
// ---------------------------------------------------------------------------------------------------

/// Elements per block of every quantised type here.
pub const QK: usize = 32;

#[inline(always)]
fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

#[inline(always)]
fn le_f16(b: &[u8], at: usize) -> f16 {
    f16::from_bits(le_u16(b, at))
}

/// ggml `block_q4_0`: 32 weights `(nibble - 8) * d`; byte `j` of `qs` holds element `j` in its low
/// nibble and element `j + 16` in its high nibble. 18 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ4_0 {
    pub d: f16,
    pub qs: [u8; 16],
}

/// ggml `block_q4_1`: 32 weights `nibble * d + m`, nibbles as in [`BlockQ4_0`]. 20 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ4_1 {
    pub d: f16,
    pub m: f16,
    pub qs: [u8; 16],
}

/// ggml `block_q8_0`: 32 values `qs[i] * d`. 34 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; 32],
}

/// ggml `block_q8_1`: 32 values `qs[i] * d`, plus `s = d * Σ qs` (as computed by the quantiser). 36 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ8_1 {
    pub d: f16,
    pub s: f16,
    pub qs: [i8; 32],
}

const _: () = assert!(std::mem::size_of::<BlockQ4_0>() == 18);
const _: () = assert!(std::mem::size_of::<BlockQ4_1>() == 20);
const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);
const _: () = assert!(std::mem::size_of::<BlockQ8_1>() == 36);

fn i8s<const N: usize>(b: &[u8]) -> [i8; N] {
    let mut out = [0i8; N];
    for (o, &v) in out.iter_mut().zip(b) {
        *o = v as i8;
    }
    out
}

impl BlockQ4_0 {
    /// Bytes of one block in GGUF data.
    pub const BYTES: usize = 18;

    /// Parses a block from the first [`Self::BYTES`] bytes of `b` (little-endian, any alignment).
    pub fn read(b: &[u8]) -> Self {
        let mut qs = [0u8; 16];
        qs.copy_from_slice(&b[2..18]);
        Self {
            d: le_f16(b, 0),
            qs,
        }
    }

    /// Writes the block into the first [`Self::BYTES`] bytes of `out`.
    pub fn write(&self, out: &mut [u8]) {
        out[0..2].copy_from_slice(&self.d.to_bits().to_le_bytes());
        out[2..18].copy_from_slice(&self.qs);
    }

    /// The 4-bit code of element `i` (0..32).
    pub fn nibble(&self, i: usize) -> u8 {
        if i < 16 {
            self.qs[i] & 0x0F
        } else {
            self.qs[i - 16] >> 4
        }
    }
}

impl BlockQ4_1 {
    /// Bytes of one block in GGUF data.
    pub const BYTES: usize = 20;

    /// Parses a block from the first [`Self::BYTES`] bytes of `b` (little-endian, any alignment).
    pub fn read(b: &[u8]) -> Self {
        let mut qs = [0u8; 16];
        qs.copy_from_slice(&b[4..20]);
        Self {
            d: le_f16(b, 0),
            m: le_f16(b, 2),
            qs,
        }
    }

    /// Writes the block into the first [`Self::BYTES`] bytes of `out`.
    pub fn write(&self, out: &mut [u8]) {
        out[0..2].copy_from_slice(&self.d.to_bits().to_le_bytes());
        out[2..4].copy_from_slice(&self.m.to_bits().to_le_bytes());
        out[4..20].copy_from_slice(&self.qs);
    }

    /// The 4-bit code of element `i` (0..32).
    pub fn nibble(&self, i: usize) -> u8 {
        if i < 16 {
            self.qs[i] & 0x0F
        } else {
            self.qs[i - 16] >> 4
        }
    }
}

impl BlockQ8_0 {
    /// Bytes of one block in GGUF data.
    pub const BYTES: usize = 34;

    /// Parses a block from the first [`Self::BYTES`] bytes of `b` (little-endian, any alignment).
    pub fn read(b: &[u8]) -> Self {
        Self {
            d: le_f16(b, 0),
            qs: i8s(&b[2..34]),
        }
    }

    /// Writes the block into the first [`Self::BYTES`] bytes of `out`.
    pub fn write(&self, out: &mut [u8]) {
        out[0..2].copy_from_slice(&self.d.to_bits().to_le_bytes());
        for (o, &q) in out[2..34].iter_mut().zip(&self.qs) {
            *o = q as u8;
        }
    }
}

impl BlockQ8_1 {
    /// Bytes of one block in GGUF data.
    pub const BYTES: usize = 36;

    /// Parses a block from the first [`Self::BYTES`] bytes of `b` (little-endian, any alignment).
    pub fn read(b: &[u8]) -> Self {
        Self {
            d: le_f16(b, 0),
            s: le_f16(b, 2),
            qs: i8s(&b[4..36]),
        }
    }

    /// Writes the block into the first [`Self::BYTES`] bytes of `out`.
    pub fn write(&self, out: &mut [u8]) {
        out[0..2].copy_from_slice(&self.d.to_bits().to_le_bytes());
        out[2..4].copy_from_slice(&self.s.to_bits().to_le_bytes());
        for (o, &q) in out[4..36].iter_mut().zip(&self.qs) {
            *o = q as u8;
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Scalar conversions
// ---------------------------------------------------------------------------------------------------

/// f16 bits to f32 (exact).
#[inline]
pub fn f16_to_f32(bits: u16) -> f32 {
    f16::from_bits(bits).to_f32()
}

/// bf16 bits to f32 (exact).
#[inline]
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// f32 to f16 bits as ggml's portable `GGML_FP32_TO_FP16`: round to nearest even; every NaN becomes
/// the quiet NaN `0x7E00` (with its sign).
#[inline]
pub fn f32_to_f16_ggml(x: f32) -> u16 {
    if x.is_nan() {
        ((x.to_bits() >> 16) as u16 & 0x8000) | 0x7E00
    } else {
        f16::from_f32(x).to_bits()
    }
}

/// f32 to f16 bits as the F16C instruction `vcvtps2ph` (round to nearest even; a NaN keeps its sign and
/// top payload bits, made quiet).
#[inline]
pub fn f32_to_f16_hw(x: f32) -> u16 {
    f16::from_f32(x).to_bits()
}

/// f32 to bf16 bits as ggml's `GGML_FP32_TO_BF16`: round to nearest even; a NaN is truncated and made
/// quiet.
#[inline]
pub fn f32_to_bf16(x: f32) -> u16 {
    let u = x.to_bits();
    if (u & 0x7fff_ffff) > 0x7f80_0000 {
        return ((u >> 16) | 64) as u16;
    }
    (u.wrapping_add(0x7fff + ((u >> 16) & 1)) >> 16) as u16
}

/// Converts a row of f32 to little-endian f16 bytes as `ggml_cpu_fp32_to_fp16` does on AVX2 + F16C:
/// hardware conversion for the first `n & !3` elements, ggml's portable one for the rest (the two
/// differ only in NaN payloads).
pub fn f32_to_f16_row(x: &[f32], dst: &mut [u8]) {
    assert_eq!(
        dst.len(),
        x.len() * 2,
        "f32_to_f16_row: dst must be 2 bytes per element"
    );
    let hw = x.len() & !3;
    for (i, (&v, o)) in x.iter().zip(dst.chunks_exact_mut(2)).enumerate() {
        let h = if i < hw {
            f32_to_f16_hw(v)
        } else {
            f32_to_f16_ggml(v)
        };
        o.copy_from_slice(&h.to_le_bytes());
    }
}

/// Converts a row of f32 to little-endian bf16 bytes as `ggml_cpu_fp32_to_bf16`.
pub fn f32_to_bf16_row(x: &[f32], dst: &mut [u8]) {
    assert_eq!(
        dst.len(),
        x.len() * 2,
        "f32_to_bf16_row: dst must be 2 bytes per element"
    );
    for (&v, o) in x.iter().zip(dst.chunks_exact_mut(2)) {
        o.copy_from_slice(&f32_to_bf16(v).to_le_bytes());
    }
}

// ---------------------------------------------------------------------------------------------------
// Dequantisation
// ---------------------------------------------------------------------------------------------------

/// The 5-bit code (`0..32`) of element `e` of a Q5_0 / Q5_1 block: its nibble (`qs`: low nibbles are
/// elements 0..16, high nibbles 16..32) and bit `e` of `qh` as the fifth bit.
#[inline(always)]
pub(crate) fn q5_code(qs: &[u8], qh: u32, e: usize) -> u8 {
    let nib = if e < 16 {
        qs[e] & 0x0F
    } else {
        qs[e - 16] >> 4
    };
    nib | ((((qh >> e) & 1) as u8) << 4)
}

/// Dequantises one row of `dst.len()` elements of type `ty` from its GGUF bytes, as ggml's `to_float`.
///
/// # Panics
/// If `dst.len()` is not a whole number of blocks or `src` is not exactly that many blocks' bytes.
pub fn dequantize_row(ty: GgmlType, src: &[u8], dst: &mut [f32]) {
    let n = dst.len();
    let bytes = ty.row_bytes(n).unwrap_or_else(|| {
        panic!(
            "dequantize_row: {n} is not a whole number of {} blocks",
            ty.name()
        )
    });
    assert_eq!(
        src.len(),
        bytes,
        "dequantize_row: {} row of {n} elements",
        ty.name()
    );
    match ty {
        GgmlType::F32 => {
            for (o, b) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *o = f16_to_f32(le_u16(b, 0));
            }
        }
        GgmlType::BF16 => {
            for (o, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *o = bf16_to_f32(le_u16(b, 0));
            }
        }
        GgmlType::Q4_0 => {
            for (y, b) in dst
                .chunks_exact_mut(QK)
                .zip(src.chunks_exact(BlockQ4_0::BYTES))
            {
                let d = f16_to_f32(le_u16(b, 0));
                for j in 0..16 {
                    let q = b[2 + j];
                    y[j] = ((q & 0x0F) as i32 - 8) as f32 * d;
                    y[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
                }
            }
        }
        GgmlType::Q4_1 => {
            for (y, b) in dst
                .chunks_exact_mut(QK)
                .zip(src.chunks_exact(BlockQ4_1::BYTES))
            {
                let d = f16_to_f32(le_u16(b, 0));
                let m = f16_to_f32(le_u16(b, 2));
                for j in 0..16 {
                    let q = b[4 + j];
                    // Two roundings, as ggml-base (built without FMA contraction).
                    y[j] = (q & 0x0F) as f32 * d + m;
                    y[j + 16] = (q >> 4) as f32 * d + m;
                }
            }
        }
        GgmlType::Q5_0 => {
            for (y, b) in dst.chunks_exact_mut(QK).zip(src.chunks_exact(22)) {
                let d = f16_to_f32(le_u16(b, 0));
                let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                for (e, o) in y.iter_mut().enumerate() {
                    *o = (q5_code(&b[6..22], qh, e) as i32 - 16) as f32 * d;
                }
            }
        }
        GgmlType::Q5_1 => {
            for (y, b) in dst.chunks_exact_mut(QK).zip(src.chunks_exact(24)) {
                let d = f16_to_f32(le_u16(b, 0));
                let m = f16_to_f32(le_u16(b, 2));
                let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
                for (e, o) in y.iter_mut().enumerate() {
                    // Two roundings, as ggml-base (built without FMA contraction).
                    *o = q5_code(&b[8..24], qh, e) as f32 * d + m;
                }
            }
        }
        GgmlType::Q8_0 => {
            for (y, b) in dst
                .chunks_exact_mut(QK)
                .zip(src.chunks_exact(BlockQ8_0::BYTES))
            {
                let d = f16_to_f32(le_u16(b, 0));
                for (o, &q) in y.iter_mut().zip(&b[2..34]) {
                    *o = (q as i8) as f32 * d;
                }
            }
        }
        GgmlType::Q8_1 => {
            for (y, b) in dst
                .chunks_exact_mut(QK)
                .zip(src.chunks_exact(BlockQ8_1::BYTES))
            {
                let d = f16_to_f32(le_u16(b, 0));
                for (o, &q) in y.iter_mut().zip(&b[4..36]) {
                    *o = (q as i8) as f32 * d;
                }
            }
        }
        GgmlType::Q4_K => kquant::dequantize_row_k(KType::Q4K, src, dst),
        GgmlType::Q5_K => kquant::dequantize_row_k(KType::Q5K, src, dst),
        GgmlType::Q6_K => kquant::dequantize_row_k(KType::Q6K, src, dst),
        GgmlType::Q8_K => {
            // ggml's `dequantize_row_q8_K`: `d * q` with the f32 `d`.
            for (y, b) in dst.chunks_exact_mut(QK_K).zip(src.chunks_exact(Q8K_BYTES)) {
                let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                for (o, &q) in y.iter_mut().zip(&b[4..4 + QK_K]) {
                    *o = d * (q as i8) as f32;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Activation quantisation (ggml-cpu/arch/x86/quants.c, AVX2 branch)
// ---------------------------------------------------------------------------------------------------

/// `maxps(a, b)`: `a > b ? a : b` (so a NaN in either operand yields `b`).
#[inline(always)]
fn maxps(a: f32, b: f32) -> f32 {
    if a > b {
        a
    } else {
        b
    }
}

#[inline(always)]
fn abs_bits(x: f32) -> f32 {
    f32::from_bits(x.to_bits() & 0x7fff_ffff)
}

/// `_mm256_cvtps_epi32` of an already rounded value: out-of-range and NaN give `i32::MIN`.
#[inline(always)]
fn cvtps_epi32(v: f32) -> i32 {
    if v.is_nan() || !(-2_147_483_648.0..2_147_483_648.0).contains(&v) {
        i32::MIN
    } else {
        v as i32
    }
}

/// One 32-element block quantised as ggml's AVX2 `quantize_row_q8_0/1`: the f32 scale `d`, the
/// quants, and the wrapping i32 sum of the (pre-saturation) quants.
struct Q8Block {
    d: f32,
    qs: [i8; QK],
    sum: i32,
}

fn quantize_block_q8(x: &[f32]) -> Q8Block {
    debug_assert_eq!(x.len(), QK);
    // amax in the order of the AVX2 code: four 8-lane vectors, then 8 -> 4 -> 2 -> 1.
    let mut lanes = [0f32; 8];
    for (l, m) in lanes.iter_mut().enumerate() {
        let mut v = abs_bits(x[l]);
        for g in 1..4 {
            v = maxps(v, abs_bits(x[8 * g + l]));
        }
        *m = v;
    }
    let m4: [f32; 4] = std::array::from_fn(|i| maxps(lanes[4 + i], lanes[i]));
    let m2 = [maxps(m4[0], m4[2]), maxps(m4[1], m4[3])];
    let amax = maxps(m2[0], m2[1]);

    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mut qs = [0i8; QK];
    let mut sum = 0i32;
    for (q, &v) in qs.iter_mut().zip(x) {
        let i = cvtps_epi32((v * id).round_ties_even());
        sum = sum.wrapping_add(i);
        // packs_epi32 then packs_epi16: signed saturation to i8.
        *q = i.clamp(-128, 127) as i8;
    }
    Q8Block { d, qs, sum }
}

/// Checks the sizes of a Q8_0/Q8_1 activation row (`bs`: bytes per block).
fn check_quantize_args(what: &str, x: &[f32], dst: &[u8], bs: usize) {
    assert_eq!(
        x.len() % QK,
        0,
        "{what}: length {} is not a multiple of 32",
        x.len()
    );
    assert_eq!(dst.len(), x.len() / QK * bs, "{what}: dst size");
}

/// Quantises a row of f32 (a multiple of 32 elements) to Q8_0 blocks exactly as ggml's AVX2
/// `quantize_row_q8_0`, on kernel path `path` (both give the same bytes).
///
/// # Panics
/// If `x.len()` is not a multiple of 32 or `dst` is not `x.len() / 32 * 34` bytes, or if `path` is
/// not available on this CPU.
pub fn quantize_row_q8_0_with(path: Path, x: &[f32], dst: &mut [u8]) {
    quantize_row_q8_with::<false>("quantize_row_q8_0", path, x, dst)
}

/// Quantises a row of f32 (a multiple of 32 elements) to Q8_1 blocks exactly as ggml's AVX2
/// `quantize_row_q8_1` (`s = f16(d * Σq)` with the unrounded f32 `d`), on kernel path `path` (both
/// give the same bytes).
///
/// # Panics
/// If `x.len()` is not a multiple of 32 or `dst` is not `x.len() / 32 * 36` bytes, or if `path` is
/// not available on this CPU.
pub fn quantize_row_q8_1_with(path: Path, x: &[f32], dst: &mut [u8]) {
    quantize_row_q8_with::<true>("quantize_row_q8_1", path, x, dst)
}

/// The Q8_0 (`Q8_1 = false`) or Q8_1 row quantiser on `path`: the same blocks, Q8_1 adding
/// `s = f16(d * Σq)` after `d`.
fn quantize_row_q8_with<const Q8_1: bool>(what: &str, path: Path, x: &[f32], dst: &mut [u8]) {
    let block_bytes = if Q8_1 {
        BlockQ8_1::BYTES
    } else {
        BlockQ8_0::BYTES
    };
    check_quantize_args(what, x, dst, block_bytes);
    match path {
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 => {
            assert!(
                simd::avx2_available(),
                "{what}: AVX2 path requested but not available"
            );
            // SAFETY: `x` holds `nb` blocks and `dst` `nb` output blocks (checked above); CPU support
            // checked just above.
            unsafe { avx2::quantize_q8::<Q8_1>(x.len() / QK, x.as_ptr(), dst.as_mut_ptr()) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        Path::Avx2 => panic!("{what}: AVX2 path requested but not available"),
        Path::Scalar => {
            for (xb, out) in x.chunks_exact(QK).zip(dst.chunks_exact_mut(block_bytes)) {
                let b = quantize_block_q8(xb);
                out[0..2].copy_from_slice(&f32_to_f16_ggml(b.d).to_le_bytes());
                let qs = if Q8_1 {
                    out[2..4].copy_from_slice(&f32_to_f16_ggml(b.d * b.sum as f32).to_le_bytes());
                    &mut out[4..]
                } else {
                    &mut out[2..]
                };
                for (o, &q) in qs.iter_mut().zip(&b.qs) {
                    *o = q as u8;
                }
            }
        }
    }
}

/// Converts an activation row to `ty` (one of the vec-dot types F32, F16, BF16, Q8_0, Q8_1, Q8_K)
/// as ggml's `from_float` does before a matmul, on kernel path `path` (every path gives the same
/// bytes). `dst` must be `ty.row_bytes(x.len())` bytes.
///
/// # Panics
/// On a size mismatch, if `ty` is not an activation type, or if `path` is not available on this
/// CPU.
pub fn quantize_activation_row_with(path: Path, ty: GgmlType, x: &[f32], dst: &mut [u8]) {
    match ty {
        GgmlType::F32 => {
            assert_eq!(dst.len(), x.len() * 4, "quantize_activation_row: dst size");
            for (&v, o) in x.iter().zip(dst.chunks_exact_mut(4)) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        GgmlType::F16 => f32_to_f16_row(x, dst),
        GgmlType::BF16 => f32_to_bf16_row(x, dst),
        GgmlType::Q8_0 => quantize_row_q8_0_with(path, x, dst),
        GgmlType::Q8_1 => quantize_row_q8_1_with(path, x, dst),
        GgmlType::Q8_K => kquant::quantize_row_q8_k_with(path, x, dst),
        GgmlType::Q4_0
        | GgmlType::Q4_1
        | GgmlType::Q5_0
        | GgmlType::Q5_1
        | GgmlType::Q4_K
        | GgmlType::Q5_K
        | GgmlType::Q6_K => {
            panic!(
                "quantize_activation_row: {} is not an activation type",
                ty.name()
            )
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Dot products: dispatch
// ---------------------------------------------------------------------------------------------------

/// Checks the byte lengths of a weight row of type `ty` and an activation row of its vec-dot type,
/// both of `n` elements.
fn check_dot_args(ty: GgmlType, n: usize, w: &[u8], a: &[u8]) {
    let at = ty
        .vec_dot_type()
        .unwrap_or_else(|| panic!("vec_dot: {} has no dot product", ty.name()));
    let wb = ty.row_bytes(n);
    let ab = at.row_bytes(n);
    assert!(
        wb == Some(w.len()) && ab == Some(a.len()),
        "vec_dot {}: n = {n}, weight row {} bytes (expected {wb:?}), activation row {} bytes (expected {ab:?})",
        ty.name(),
        w.len(),
        a.len()
    );
}

/// Checks the byte lengths of `n`-element weight rows of `ty` and activation rows of its vec-dot type
/// cheaply, for the hot multi-row entry points (the matmul has validated the shapes; this keeps the
/// kernels in bounds). Panics, out of line, on a mismatch.
#[inline]
fn check_rows_fast(ty: GgmlType, n: usize, w: &[&[u8]], a: &[&[u8]]) {
    let Some(at) = ty.vec_dot_type() else {
        bad_rows(ty, n)
    };
    let (bs, wts, ats) = (ty.block_size(), ty.type_size(), at.type_size());
    if bs == 1 {
        for wr in w {
            for ar in a {
                check_dot_args(ty, n, wr, ar);
            }
        }
        return;
    }
    let nb = n / bs;
    if !n.is_multiple_of(bs)
        || w.iter().any(|r| r.len() != nb * wts)
        || a.iter().any(|r| r.len() != nb * ats)
    {
        bad_rows(ty, n);
    }
}

#[cold]
#[inline(never)]
fn bad_rows(ty: GgmlType, n: usize) -> ! {
    panic!(
        "vec_dot {}: row byte lengths do not match n = {n}",
        ty.name()
    )
}

/// Dot product of a weight row of type `ty` with an activation row of `ty.vec_dot_type()`, both `n`
/// elements, on kernel path `path`. Equal, bit for bit, to ggml's `vec_dot` on AVX2 (on both
/// paths).
///
/// # Panics
/// If the byte lengths do not match `n`, `ty` has no vec-dot type, or `path` is not available on
/// this CPU.
pub fn vec_dot_with(path: Path, ty: GgmlType, n: usize, w: &[u8], a: &[u8]) -> f32 {
    check_dot_args(ty, n, w, a);
    match path {
        Path::Scalar => scalar::vec_dot_unchecked(ty, n, w, a),
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 => {
            assert!(
                simd::avx2_available(),
                "vec_dot: AVX2 path requested but not available"
            );
            // SAFETY: lengths checked by `check_dot_args`, CPU support just above.
            unsafe { avx2::vec_dot_unchecked(ty, n, w, a) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        Path::Avx2 => panic!("vec_dot: AVX2 path requested but not available"),
    }
}

/// `out.len()` consecutive weight rows (`w`: `rb` bytes each, type `ty`, `n` elements) dotted with one
/// activation row; `out[r]` equals `vec_dot_with(path, ty, n, row r, a)` bit for bit. The decode
/// (batch 1) matmul: the weights are streamed once, with prefetching.
///
/// # Panics
/// If the rows or `a` do not match `n`.
pub(crate) fn vec_dot_rows_with(
    path: Path,
    ty: GgmlType,
    n: usize,
    w: &[u8],
    rb: usize,
    a: &[u8],
    out: &mut [f32],
) {
    let rows = out.len();
    let w = &w[..rows * rb];
    if rows > 0 {
        check_rows_fast(ty, n, &[&w[..rb]], &[a]);
    }
    match path {
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 => {
            assert!(
                simd::avx2_available(),
                "vec_dot_rows: AVX2 path requested but not available"
            );
            // SAFETY: `w` is `rows` rows of `rb` bytes, and `rb` and `a` match `n` (checked by
            // `check_rows_fast` on the first row); CPU support just above.
            unsafe { avx2::vec_dot_rows_unchecked(ty, n, w, rb, a, out) }
        }
        _ => {
            for (o, wr) in out.iter_mut().zip(w.chunks_exact(rb)) {
                *o = scalar::vec_dot_unchecked(ty, n, wr, a);
            }
        }
    }
}

/// The f32 scales of a group of four quantised activation rows, block-major: `d[4 * b + c]` is the
/// scale `d` of block `b` of row `c` (and `s[4 * b + c]` its Q8_1 `s`), converted exactly from the
/// rows' f16 fields. Lets the tile kernels load them without conversions.
pub(crate) struct ActScales4<'a> {
    pub d: &'a [f32],
    pub s: &'a [f32],
}

impl ActScales4<'_> {
    /// Fills `d` and `s` (`4 * nb` each) from four activation rows of type `at` (Q8_0 or Q8_1).
    pub(crate) fn fill(at: GgmlType, rows: [&[u8]; 4], d: &mut [f32], s: &mut [f32]) {
        let bs = at.type_size();
        for (c, row) in rows.iter().enumerate() {
            for (b, blk) in row.chunks_exact(bs).enumerate() {
                d[4 * b + c] = f16_to_f32(le_u16(blk, 0));
                if at == GgmlType::Q8_1 {
                    s[4 * b + c] = f16_to_f32(le_u16(blk, 2));
                }
            }
        }
    }
}

/// Whether [`vec_dot_panel_with`] has a dedicated kernel for weights of `ty` on `path` (otherwise it
/// falls back to one dot product per pair, which gives the same results).
pub(crate) fn has_tile_kernel(path: Path, ty: GgmlType) -> bool {
    path == Path::Avx2
        && matches!(
            ty,
            GgmlType::Q4_0
                | GgmlType::Q4_1
                | GgmlType::Q5_0
                | GgmlType::Q5_1
                | GgmlType::Q8_0
                | GgmlType::Q4_K
                | GgmlType::Q5_K
                | GgmlType::Q6_K
        )
}

/// One weight row `w` (type `ty`, `n` elements) x activation groups: `act` holds `4 * out.len()`
/// consecutive activation rows of `arb` bytes (`ty`'s vec-dot type), group `g` being rows
/// `4g..4g+4`; `sd` / `ss` hold each group's scales as [`ActScales4`] does (`4 * nb` per group, group
/// after group; empty for K-quants, whose activations carry theirs). `out[g][c]` equals
/// `vec_dot_with(path, ty, n, w, row 4g + c)` bit for bit. The weight row is unpacked once (codes,
/// scales) into `scratch` for all the groups: the prefill GEMM's inner kernel.
#[allow(clippy::too_many_arguments)]
pub(crate) fn vec_dot_panel_with(
    path: Path,
    ty: GgmlType,
    n: usize,
    w: &[u8],
    act: &[u8],
    arb: usize,
    sc: &ActScales4,
    scratch: &mut Vec<u8>,
    out: &mut [[f32; 4]],
) {
    let groups = out.len();
    assert!(act.len() >= 4 * groups * arb, "panel: activations");
    let rows = |g: usize| -> [&[u8]; 4] {
        std::array::from_fn(|c| &act[(4 * g + c) * arb..(4 * g + c + 1) * arb])
    };
    if groups > 0 {
        check_rows_fast(ty, n, &[w], &rows(0));
    }
    #[cfg(target_arch = "x86_64")]
    if has_tile_kernel(path, ty) {
        assert!(
            simd::avx2_available(),
            "AVX2 path requested but not available"
        );
        if let Some(kt) = ty.ktype() {
            for (g, o) in out.iter_mut().enumerate() {
                // SAFETY: the rows are whole super-blocks of `ty` and Q8_K (checked above for the
                // first group; every row has `arb` bytes), CPU support just above.
                *o = unsafe { kquant::avx2::tile4_unchecked(kt, n / QK_K, w, rows(g)) };
            }
            return;
        }
        let nb = n / QK;
        let min = matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1);
        assert!(sc.d.len() >= 4 * nb * groups && (!min || sc.s.len() >= 4 * nb * groups));
        // SAFETY: `w` is `nb` blocks of `ty` and every activation row `nb` blocks of its vec-dot
        // type (`check_rows_fast` on the first group, `arb` bytes each), scales and CPU support
        // just above; `has_tile_kernel` limits `ty` to the 32-element integer formats.
        unsafe { avx2::vec_dot_panel_unchecked(ty, nb, w, act.as_ptr(), arb, sc, scratch, out) };
        return;
    }
    let _ = (sc, scratch);
    for (g, o) in out.iter_mut().enumerate() {
        let a = rows(g);
        *o = a.map(|ar| vec_dot_with(path, ty, n, w, ar));
    }
}

// ---------------------------------------------------------------------------------------------------
// Dot products: scalar reference
// ---------------------------------------------------------------------------------------------------

/// Portable kernels, the numeric reference. They emulate the accumulation order of ggml's AVX2 code
/// (lane-wise FMA, the same horizontal sums), so they equal the SIMD kernels bit for bit.
pub mod scalar {
    use super::{
        bf16_to_f32, f16_to_f32, kquant, le_u16, q5_code, BlockQ4_0, BlockQ4_1, BlockQ8_0,
        BlockQ8_1, GgmlType, KType, QK,
    };

    /// `|x| * sign(y, x)` as `_mm256_sign_epi8` + `_mm256_maddubs_epi16` compute one product: exact
    /// `x * y`, except that `y = -128` with `x < 0` wraps (`-128 * |x|`), as in ggml.
    #[inline(always)]
    fn sign_mul(x: i8, y: i8) -> i32 {
        let sy = match x {
            0 => 0,
            x if x < 0 => y.wrapping_neg(),
            _ => y,
        };
        x.unsigned_abs() as i32 * sy as i32
    }

    // No `maddubs` pair sum can saturate: |x| <= 128 and sign(y, x) in -128..=127 keep a pair of
    // products within -32768..=32512 (and 15 * 127 * 2 for Q4_1), so plain i32 sums are exact.

    /// The eight i32 lane sums of one Q4_0 x Q8_0 block (lane `l` = elements `4l..4l+4`), as ggml's
    /// AVX2 `mul_sum_i8_pairs_float` before its conversion to f32. `w`, `a`: the blocks' bytes.
    pub fn block_lanes_q4_0_q8_0(w: &[u8], a: &[u8]) -> [i32; 8] {
        let wb = BlockQ4_0::read(w);
        let ab = BlockQ8_0::read(a);
        std::array::from_fn(|l| {
            (4 * l..4 * l + 4)
                .map(|e| sign_mul(wb.nibble(e) as i8 - 8, ab.qs[e]))
                .sum()
        })
    }

    /// The eight i32 lane sums of one Q4_1 x Q8_1 block (`Σ nibble * q`, unsigned x signed).
    pub fn block_lanes_q4_1_q8_1(w: &[u8], a: &[u8]) -> [i32; 8] {
        let wb = BlockQ4_1::read(w);
        let ab = BlockQ8_1::read(a);
        std::array::from_fn(|l| {
            (4 * l..4 * l + 4)
                .map(|e| wb.nibble(e) as i32 * ab.qs[e] as i32)
                .sum()
        })
    }

    /// The eight i32 lane sums of one Q8_0 x Q8_0 block.
    pub fn block_lanes_q8_0_q8_0(w: &[u8], a: &[u8]) -> [i32; 8] {
        let wb = BlockQ8_0::read(w);
        let ab = BlockQ8_0::read(a);
        std::array::from_fn(|l| {
            (4 * l..4 * l + 4)
                .map(|e| sign_mul(wb.qs[e], ab.qs[e]))
                .sum()
        })
    }

    /// The eight i32 lane sums of one Q5_0 x Q8_0 block (`Σ (code - 16) * q` by the sign trick).
    pub fn block_lanes_q5_0_q8_0(w: &[u8], a: &[u8]) -> [i32; 8] {
        let qh = u32::from_le_bytes([w[2], w[3], w[4], w[5]]);
        let ab = BlockQ8_0::read(a);
        std::array::from_fn(|l| {
            (4 * l..4 * l + 4)
                .map(|e| sign_mul(q5_code(&w[6..22], qh, e) as i8 - 16, ab.qs[e]))
                .sum()
        })
    }

    /// The eight i32 lane sums of one Q5_1 x Q8_1 block (`Σ code * q`, unsigned x signed).
    pub fn block_lanes_q5_1_q8_1(w: &[u8], a: &[u8]) -> [i32; 8] {
        let qh = u32::from_le_bytes([w[4], w[5], w[6], w[7]]);
        let ab = BlockQ8_1::read(a);
        std::array::from_fn(|l| {
            (4 * l..4 * l + 4)
                .map(|e| q5_code(&w[8..24], qh, e) as i32 * ab.qs[e] as i32)
                .sum()
        })
    }

    /// ggml's `hsum_float_8` ([`crate::reduce::hsum8`]).
    #[inline]
    pub fn hsum_float_8(a: [f32; 8]) -> f32 {
        crate::reduce::hsum8(&a)
    }

    pub use crate::reduce::{reduce_bf16x8x4, reduce_f32x8x4};

    #[inline(always)]
    fn fma_lanes(acc: &mut [f32; 8], d: f32, lanes: [i32; 8]) {
        for (s, q) in acc.iter_mut().zip(lanes) {
            *s = d.mul_add(q as f32, *s);
        }
    }

    /// Q4_0 weights x Q8_0 activations, `n` elements.
    pub fn dot_q4_0_q8_0(n: usize, w: &[u8], a: &[u8]) -> f32 {
        let mut acc = [0f32; 8];
        for b in 0..n / QK {
            let wb = &w[b * BlockQ4_0::BYTES..(b + 1) * BlockQ4_0::BYTES];
            let ab = &a[b * BlockQ8_0::BYTES..(b + 1) * BlockQ8_0::BYTES];
            let d = f16_to_f32(le_u16(wb, 0)) * f16_to_f32(le_u16(ab, 0));
            fma_lanes(&mut acc, d, block_lanes_q4_0_q8_0(wb, ab));
        }
        hsum_float_8(acc)
    }

    /// Q4_1 weights x Q8_1 activations, `n` elements: `hsum(Σ lane-wise fma(dw*da, lanes)) + Σ fma(m, s)`.
    pub fn dot_q4_1_q8_1(n: usize, w: &[u8], a: &[u8]) -> f32 {
        let mut acc = [0f32; 8];
        let mut summs = 0f32;
        for b in 0..n / QK {
            let wb = &w[b * BlockQ4_1::BYTES..(b + 1) * BlockQ4_1::BYTES];
            let ab = &a[b * BlockQ8_1::BYTES..(b + 1) * BlockQ8_1::BYTES];
            let (dw, m) = (f16_to_f32(le_u16(wb, 0)), f16_to_f32(le_u16(wb, 2)));
            let (da, s) = (f16_to_f32(le_u16(ab, 0)), f16_to_f32(le_u16(ab, 2)));
            summs = m.mul_add(s, summs);
            fma_lanes(&mut acc, dw * da, block_lanes_q4_1_q8_1(wb, ab));
        }
        hsum_float_8(acc) + summs
    }

    /// Q8_0 weights x Q8_0 activations, `n` elements.
    pub fn dot_q8_0_q8_0(n: usize, w: &[u8], a: &[u8]) -> f32 {
        let mut acc = [0f32; 8];
        for b in 0..n / QK {
            let wb = &w[b * BlockQ8_0::BYTES..(b + 1) * BlockQ8_0::BYTES];
            let ab = &a[b * BlockQ8_0::BYTES..(b + 1) * BlockQ8_0::BYTES];
            let d = f16_to_f32(le_u16(wb, 0)) * f16_to_f32(le_u16(ab, 0));
            fma_lanes(&mut acc, d, block_lanes_q8_0_q8_0(wb, ab));
        }
        hsum_float_8(acc)
    }

    /// Q5_0 weights x Q8_0 activations, `n` elements (as [`dot_q4_0_q8_0`]).
    pub fn dot_q5_0_q8_0(n: usize, w: &[u8], a: &[u8]) -> f32 {
        let mut acc = [0f32; 8];
        for b in 0..n / QK {
            let wb = &w[b * 22..(b + 1) * 22];
            let ab = &a[b * BlockQ8_0::BYTES..(b + 1) * BlockQ8_0::BYTES];
            let d = f16_to_f32(le_u16(wb, 0)) * f16_to_f32(le_u16(ab, 0));
            fma_lanes(&mut acc, d, block_lanes_q5_0_q8_0(wb, ab));
        }
        hsum_float_8(acc)
    }

    /// Q5_1 weights x Q8_1 activations, `n` elements (as [`dot_q4_1_q8_1`]).
    pub fn dot_q5_1_q8_1(n: usize, w: &[u8], a: &[u8]) -> f32 {
        let mut acc = [0f32; 8];
        let mut summs = 0f32;
        for b in 0..n / QK {
            let wb = &w[b * 24..(b + 1) * 24];
            let ab = &a[b * BlockQ8_1::BYTES..(b + 1) * BlockQ8_1::BYTES];
            let (dw, m) = (f16_to_f32(le_u16(wb, 0)), f16_to_f32(le_u16(wb, 2)));
            let (da, s) = (f16_to_f32(le_u16(ab, 0)), f16_to_f32(le_u16(ab, 2)));
            summs = m.mul_add(s, summs);
            fma_lanes(&mut acc, dw * da, block_lanes_q5_1_q8_1(wb, ab));
        }
        hsum_float_8(acc) + summs
    }

    #[inline(always)]
    fn f16_at(b: &[u8], i: usize) -> f32 {
        f16_to_f32(le_u16(b, 2 * i))
    }

    #[inline(always)]
    fn bf16_at(b: &[u8], i: usize) -> f32 {
        bf16_to_f32(le_u16(b, 2 * i))
    }

    #[inline(always)]
    fn f32_at(b: &[u8], i: usize) -> f32 {
        f32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
    }

    /// The leftovers of `ggml_vec_dot_f16` (elements `from..n`), added in f64 to the vector part `head`.
    pub(crate) fn f16_tail(head: f32, from: usize, n: usize, w: &[u8], a: &[u8]) -> f32 {
        let mut sum = head as f64;
        for i in from..n {
            sum += (f16_at(w, i) * f16_at(a, i)) as f64;
        }
        sum as f32
    }

    /// The leftovers of `ggml_vec_dot_bf16`, added in f64.
    pub(crate) fn bf16_tail(head: f32, from: usize, n: usize, w: &[u8], a: &[u8]) -> f32 {
        let mut sum = head as f64;
        for i in from..n {
            sum += (bf16_at(w, i) * bf16_at(a, i)) as f64;
        }
        sum as f32
    }

    /// The leftovers of `ggml_vec_dot_f32` as GCC compiled them: the first `r & !3` of the `r`
    /// leftover products unfused and added in order, the last `r & 3` fused (FMA).
    pub(crate) fn f32_tail(head: f32, from: usize, n: usize, w: &[u8], a: &[u8]) -> f32 {
        let mut sum = head;
        let unfused = from + ((n - from) & !3);
        for i in from..unfused {
            sum += f32_at(w, i) * f32_at(a, i);
        }
        for i in unfused..n {
            sum = f32_at(w, i).mul_add(f32_at(a, i), sum);
        }
        sum
    }

    /// F16 weights x F16 activations (`ggml_vec_dot_f16`, AVX2): 4x8 FMA accumulators over the first
    /// `n & !31` elements, their reduction, the rest in f64.
    pub fn dot_f16(n: usize, w: &[u8], a: &[u8]) -> f32 {
        let np = n & !31;
        let sum = fma_4x8(np, |e| (f16_at(w, e), f16_at(a, e)));
        f16_tail(reduce_f32x8x4(sum), np, n, w, a)
    }

    /// ggml's 4x8 FMA accumulators over the first `np` (a multiple of 32) elements: element
    /// `i + 8j + l` of each 32-element step goes into accumulator `j`, lane `l`. `xy(e)` gives the pair.
    #[inline(always)]
    fn fma_4x8(np: usize, xy: impl Fn(usize) -> (f32, f32)) -> [[f32; 8]; 4] {
        let mut sum = [[0f32; 8]; 4];
        for i in (0..np).step_by(32) {
            for (j, s) in sum.iter_mut().enumerate() {
                for (l, v) in s.iter_mut().enumerate() {
                    let (x, y) = xy(i + 8 * j + l);
                    *v = x.mul_add(y, *v);
                }
            }
        }
        sum
    }

    /// BF16 weights x BF16 activations (`ggml_vec_dot_bf16`, AVX2 branch; GCC fuses its mul + add).
    pub fn dot_bf16(n: usize, w: &[u8], a: &[u8]) -> f32 {
        let np = n & !31;
        let sum = fma_4x8(np, |e| (bf16_at(w, e), bf16_at(a, e)));
        bf16_tail(reduce_bf16x8x4(sum), np, n, w, a)
    }

    /// F32 x F32 (`ggml_vec_dot_f32`, AVX2).
    pub fn dot_f32(n: usize, w: &[u8], a: &[u8]) -> f32 {
        let np = n & !31;
        let sum = fma_4x8(np, |e| (f32_at(w, e), f32_at(a, e)));
        f32_tail(reduce_f32x8x4(sum), np, n, w, a)
    }

    /// Dispatch on the weight type; lengths already checked.
    pub(crate) fn vec_dot_unchecked(ty: GgmlType, n: usize, w: &[u8], a: &[u8]) -> f32 {
        match ty {
            GgmlType::F32 => dot_f32(n, w, a),
            GgmlType::F16 => dot_f16(n, w, a),
            GgmlType::BF16 => dot_bf16(n, w, a),
            GgmlType::Q4_0 => dot_q4_0_q8_0(n, w, a),
            GgmlType::Q4_1 => dot_q4_1_q8_1(n, w, a),
            GgmlType::Q5_0 => dot_q5_0_q8_0(n, w, a),
            GgmlType::Q5_1 => dot_q5_1_q8_1(n, w, a),
            GgmlType::Q8_0 => dot_q8_0_q8_0(n, w, a),
            GgmlType::Q4_K => kquant::scalar::vec_dot_unchecked(KType::Q4K, n, w, a),
            GgmlType::Q5_K => kquant::scalar::vec_dot_unchecked(KType::Q5K, n, w, a),
            GgmlType::Q6_K => kquant::scalar::vec_dot_unchecked(KType::Q6K, n, w, a),
            GgmlType::Q8_1 | GgmlType::Q8_K => {
                unreachable!("{} has no vec_dot (checked by the caller)", ty.name())
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Dot products: AVX2 + FMA + F16C
// ---------------------------------------------------------------------------------------------------

/// AVX2 + FMA + F16C kernels. The public functions check lengths and CPU support (and panic
/// otherwise); the crate-internal entry points are `unsafe` and leave the checks to the dispatchers.
#[cfg(target_arch = "x86_64")]
pub mod avx2 {
    use super::{
        check_dot_args, kquant, scalar, ActScales4, BlockQ4_0, BlockQ4_1, BlockQ8_0, BlockQ8_1,
        GgmlType, KType, QK,
    };
    use std::arch::x86_64::*;

    /// Checks the rows and CPU support, then runs the kernel.
    fn checked(ty: GgmlType, n: usize, w: &[u8], a: &[u8]) -> f32 {
        check_dot_args(ty, n, w, a);
        assert!(
            crate::simd::avx2_available(),
            "AVX2 + FMA + F16C not available"
        );
        // SAFETY: lengths and CPU support checked just above.
        unsafe { vec_dot_unchecked(ty, n, w, a) }
    }

    /// Q4_0 x Q8_0 (see [`scalar::dot_q4_0_q8_0`]).
    pub fn dot_q4_0_q8_0(n: usize, w: &[u8], a: &[u8]) -> f32 {
        checked(GgmlType::Q4_0, n, w, a)
    }

    /// Q4_1 x Q8_1 (see [`scalar::dot_q4_1_q8_1`]).
    pub fn dot_q4_1_q8_1(n: usize, w: &[u8], a: &[u8]) -> f32 {
        checked(GgmlType::Q4_1, n, w, a)
    }

    /// Q8_0 x Q8_0 (see [`scalar::dot_q8_0_q8_0`]).
    pub fn dot_q8_0_q8_0(n: usize, w: &[u8], a: &[u8]) -> f32 {
        checked(GgmlType::Q8_0, n, w, a)
    }

    /// F16 x F16 (see [`scalar::dot_f16`]).
    pub fn dot_f16(n: usize, w: &[u8], a: &[u8]) -> f32 {
        checked(GgmlType::F16, n, w, a)
    }

    /// BF16 x BF16 (see [`scalar::dot_bf16`]).
    pub fn dot_bf16(n: usize, w: &[u8], a: &[u8]) -> f32 {
        checked(GgmlType::BF16, n, w, a)
    }

    /// F32 x F32 (see [`scalar::dot_f32`]).
    pub fn dot_f32(n: usize, w: &[u8], a: &[u8]) -> f32 {
        checked(GgmlType::F32, n, w, a)
    }

    /// One weight row x one activation row.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C, and `w`, `a` must be `n`-element rows of `ty` and of
    /// its vec-dot type (`ty` not Q8_1).
    pub(crate) unsafe fn vec_dot_unchecked(ty: GgmlType, n: usize, w: &[u8], a: &[u8]) -> f32 {
        debug_assert!(crate::simd::avx2_available());
        let (wp, ap) = (w.as_ptr(), a.as_ptr());
        let nb = n / QK;
        // SAFETY: the caller guarantees CPU support and rows of `nb` blocks (or `n` elements).
        unsafe {
            match ty {
                GgmlType::Q4_0 => dot_rows::<Q4_0, 1>(nb, [wp], ap, wp, 0)[0],
                GgmlType::Q4_1 => dot_rows::<Q4_1, 1>(nb, [wp], ap, wp, 0)[0],
                GgmlType::Q5_0 => dot_rows::<Q5_0, 1>(nb, [wp], ap, wp, 0)[0],
                GgmlType::Q5_1 => dot_rows::<Q5_1, 1>(nb, [wp], ap, wp, 0)[0],
                GgmlType::Q8_0 => dot_rows::<Q8_0, 1>(nb, [wp], ap, wp, 0)[0],
                GgmlType::F16 => dot_f16_k(n, w, a),
                GgmlType::BF16 => dot_bf16_k(n, w, a),
                GgmlType::F32 => dot_f32_k(n, w, a),
                GgmlType::Q4_K => kquant::avx2::vec_dot_unchecked(KType::Q4K, n, w, a),
                GgmlType::Q5_K => kquant::avx2::vec_dot_unchecked(KType::Q5K, n, w, a),
                GgmlType::Q6_K => kquant::avx2::vec_dot_unchecked(KType::Q6K, n, w, a),
                GgmlType::Q8_1 | GgmlType::Q8_K => {
                    unreachable!("{} has no vec_dot (checked by the caller)", ty.name())
                }
            }
        }
    }

    /// Prefetches (into all cache levels) the `L` cache lines at `p`, `p + 64`, ...: never faults,
    /// whatever the address.
    #[inline(always)]
    fn prefetch_lines(p: *const u8, lines: usize) {
        for l in 0..lines {
            // SAFETY: a prefetch is only a hint: it does not fault on any address, and `wrapping_add`
            // makes no claim that the pointer is in bounds.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(64 * l) as *const i8) };
        }
    }

    /// How far ahead (bytes) [`vec_dot_rows_unchecked`] prefetches weights: two groups of four rows
    /// (2.8 KiB for a 576-column Q4_1 row, 4.8 KiB for Q8_0), enough for the lines to arrive from DRAM
    /// in time on Zen 3 (measured: one group ahead is slower, four no faster).
    fn prefetch_distance(rb: usize) -> usize {
        2 * 4 * rb
    }

    /// Consecutive weight rows (`w`: `out.len()` rows of `rb` bytes) x one activation row: `out[r]`
    /// is `vec_dot_unchecked(ty, n, row r, a)` bit for bit. Four rows at a time share the activation
    /// loads, and the weights are prefetched ahead of use (they stream from DRAM at batch 1).
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `w` must hold `out.len()` rows of `rb` bytes, each an
    /// `n`-element row of `ty`, and `a` an `n`-element row of its vec-dot type (`ty` not Q8_1).
    pub(crate) unsafe fn vec_dot_rows_unchecked(
        ty: GgmlType,
        n: usize,
        w: &[u8],
        rb: usize,
        a: &[u8],
        out: &mut [f32],
    ) {
        debug_assert!(crate::simd::avx2_available());
        debug_assert!(w.len() >= out.len() * rb);
        let nb = n / QK;
        let ap = a.as_ptr();
        let dist = prefetch_distance(rb);
        let done = out.len() / 4 * 4;
        let mut quads = out.chunks_exact_mut(4);
        for (q, o) in (&mut quads).enumerate() {
            // SAFETY: rows `4q..4q+4` lie within `w` (caller); the prefetch pointer is only a hint.
            unsafe {
                let wp: [*const u8; 4] = std::array::from_fn(|r| w.as_ptr().add((4 * q + r) * rb));
                let pf = wp[0].wrapping_add(dist);
                // Prefetch lines per block: ⌈4 * block bytes / 64⌉.
                let d = match ty {
                    GgmlType::Q4_0 => dot_rows::<Q4_0, 4>(nb, wp, ap, pf, lines::<Q4_0>()),
                    GgmlType::Q4_1 => dot_rows::<Q4_1, 4>(nb, wp, ap, pf, lines::<Q4_1>()),
                    GgmlType::Q5_0 => dot_rows::<Q5_0, 4>(nb, wp, ap, pf, lines::<Q5_0>()),
                    GgmlType::Q5_1 => dot_rows::<Q5_1, 4>(nb, wp, ap, pf, lines::<Q5_1>()),
                    GgmlType::Q8_0 => dot_rows::<Q8_0, 4>(nb, wp, ap, pf, lines::<Q8_0>()),
                    _ => std::array::from_fn(|r| {
                        let row = &w[(4 * q + r) * rb..(4 * q + r + 1) * rb];
                        vec_dot_unchecked(ty, n, row, a)
                    }),
                };
                o.copy_from_slice(&d);
            }
        }
        for (r, o) in quads.into_remainder().iter_mut().enumerate() {
            let row = &w[(done + r) * rb..(done + r + 1) * rb];
            // SAFETY: as for the caller.
            *o = unsafe { vec_dot_unchecked(ty, n, row, a) };
        }
    }

    /// [`super::vec_dot_panel_with`] on AVX2 for the 32-element formats.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `ty` is Q4_0, Q4_1, Q5_0, Q5_1 or Q8_0; `w` holds
    /// `nb` blocks of `ty`; `act` is readable for `4 * out.len()` rows of `arb` bytes, each `nb`
    /// blocks of the vec-dot type; `sc.d` (and `sc.s` for Q4_1 / Q5_1) hold `4 * nb * out.len()`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn vec_dot_panel_unchecked(
        ty: GgmlType,
        nb: usize,
        w: &[u8],
        act: *const u8,
        arb: usize,
        sc: &ActScales4,
        scratch: &mut Vec<u8>,
        out: &mut [[f32; 4]],
    ) {
        debug_assert!(crate::simd::avx2_available() && w.len() >= nb * ty.type_size());
        // SAFETY: guaranteed by the caller (see above).
        unsafe {
            match ty {
                GgmlType::Q4_0 => panel::<Q4_0>(nb, w.as_ptr(), act, arb, sc, scratch, out),
                GgmlType::Q4_1 => panel::<Q4_1>(nb, w.as_ptr(), act, arb, sc, scratch, out),
                GgmlType::Q5_0 => panel::<Q5_0>(nb, w.as_ptr(), act, arb, sc, scratch, out),
                GgmlType::Q5_1 => panel::<Q5_1>(nb, w.as_ptr(), act, arb, sc, scratch, out),
                GgmlType::Q8_0 => panel::<Q8_0>(nb, w.as_ptr(), act, arb, sc, scratch, out),
                _ => unreachable!("no panel kernel for {}", ty.name()),
            }
        }
    }

    /// One weight row of `T` x `out.len()` groups of four activation rows. The row is unpacked
    /// once into `scratch`: per block its 32 codes (and for signed formats their absolute values,
    /// the sign trick's `|x|`), its `d` and `m` as f32. Per group, the pair scales `dw * da_c` of
    /// every block are formed four at a time into `scratch` before the integer work, which then
    /// reads them by broadcast loads. Per (row, activation) pair the f32 operations and their order
    /// are [`dot_rows`]'s.
    ///
    /// # Safety
    /// As [`vec_dot_panel_unchecked`].
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn panel<T: Block32>(
        nb: usize,
        w: *const u8,
        act: *const u8,
        arb: usize,
        sc: &ActScales4,
        scratch: &mut Vec<u8>,
        out: &mut [[f32; 4]],
    ) {
        let t = f16_table();
        let (_, aq) = act_layout::<T>();
        let codes = if T::SIGNED { 2 } else { 1 };
        // Layout: codes (nb x 32 bytes, then |codes| for signed), dw (nb f32), mw (nb f32),
        // pair scales (4 nb f32).
        let code_bytes = codes * 32 * nb;
        scratch.resize(code_bytes + 4 * (6 * nb) + 32, 0);
        // 32-byte alignment is not needed (unaligned loads) but keeps the f32s 4-aligned.
        let base = scratch.as_mut_ptr();
        let fp = base
            .wrapping_add(code_bytes)
            .wrapping_add(base.wrapping_add(code_bytes).align_offset(4));
        let (dwp, mwp, ddp) = (
            fp as *mut f32,
            (fp as *mut f32).wrapping_add(nb),
            (fp as *mut f32).wrapping_add(2 * nb),
        );
        // SAFETY: `scratch` holds the layout above (resized just before); weight blocks `b < nb`
        // are readable (caller).
        unsafe {
            for b in 0..nb {
                let wb = w.add(b * T::W);
                let qx = T::codes(wb);
                _mm256_storeu_si256(base.add(32 * b) as *mut __m256i, qx);
                if T::SIGNED {
                    let ax = _mm256_sign_epi8(qx, qx);
                    _mm256_storeu_si256(base.add(32 * (nb + b)) as *mut __m256i, ax);
                    *dwp.add(b) = f16_at(t, wb);
                } else {
                    let dm = load_2xf16(wb);
                    *dwp.add(b) = _mm_cvtss_f32(dm);
                    *mwp.add(b) = _mm_cvtss_f32(_mm_movehdup_ps(dm));
                }
            }
        }
        let ones = _mm256_set1_epi16(1);
        let g4 = 4 * nb;
        for (g, o) in out.iter_mut().enumerate() {
            // SAFETY: group `g`'s rows and scales are readable (caller); `scratch` as above.
            unsafe {
                let sd = sc.d.as_ptr().add(g * g4);
                for b in 0..nb {
                    let d4 = _mm_loadu_ps(sd.add(4 * b));
                    _mm_storeu_ps(ddp.add(4 * b), _mm_mul_ps(_mm_set1_ps(*dwp.add(b)), d4));
                }
                // (The `m * s` chain runs inside the main loop, where its latency overlaps.)
                let mut summs = _mm_setzero_ps();
                let ap: [*const u8; 4] = std::array::from_fn(|c| act.add((4 * g + c) * arb + aq));
                let mut acc = [_mm256_setzero_ps(); 4];
                for b in 0..nb {
                    let ab = b * if T::SIGNED {
                        BlockQ8_0::BYTES
                    } else {
                        BlockQ8_1::BYTES
                    };
                    let qx = _mm256_loadu_si256(base.add(32 * b) as *const __m256i);
                    let dp = ddp.add(4 * b);
                    if T::SIGNED {
                        let ax = _mm256_loadu_si256(base.add(32 * (nb + b)) as *const __m256i);
                        for c in 0..4 {
                            let qy = _mm256_loadu_si256(ap[c].add(ab) as *const __m256i);
                            let sy = _mm256_sign_epi8(qy, qx);
                            let p = _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sy), ones);
                            let d = _mm256_broadcast_ss(&*dp.add(c));
                            acc[c] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), acc[c]);
                        }
                    } else {
                        let s4 = _mm_loadu_ps(sc.s.as_ptr().add(g * g4 + 4 * b));
                        summs = _mm_fmadd_ps(_mm_set1_ps(*mwp.add(b)), s4, summs);
                        for c in 0..4 {
                            let qy = _mm256_loadu_si256(ap[c].add(ab) as *const __m256i);
                            let p = _mm256_madd_epi16(_mm256_maddubs_epi16(qx, qy), ones);
                            let d = _mm256_broadcast_ss(&*dp.add(c));
                            acc[c] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), acc[c]);
                        }
                    }
                }
                let mut m = [0f32; 4];
                _mm_storeu_ps(m.as_mut_ptr(), summs);
                *o = std::array::from_fn(|c| {
                    let h = crate::reduce::avx2::hsum8(acc[c]);
                    if T::SIGNED {
                        h
                    } else {
                        h + m[c]
                    }
                });
            }
        }
    }

    /// ggml's AVX2 `quantize_row_q8_0` (`Q81 = false`) or `quantize_row_q8_1` (`Q81 = true`) of `nb`
    /// blocks from `x` into `y`: `amax` by `maxps` in ggml's order, `_mm256_round_ps` to nearest even,
    /// `cvtps_epi32` and saturating packs. The f16 scales go through the same conversion as the
    /// scalar path ([`super::f32_to_f16_ggml`]), so both paths write the same bytes.
    ///
    /// # Safety
    /// `x` must be readable for `32 * nb` f32 and `y` writable for `nb` blocks (34 or 36 bytes each);
    /// the CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn quantize_q8<const Q81: bool>(nb: usize, x: *const f32, y: *mut u8) {
        let (bs, qoff) = if Q81 {
            (BlockQ8_1::BYTES, 4)
        } else {
            (BlockQ8_0::BYTES, 2)
        };
        let sign = _mm256_set1_ps(-0.0);
        let perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for i in 0..nb {
            // SAFETY: block `i < nb` of `x` (32 f32) and of `y` (`bs` bytes) are in the ranges the
            // caller guarantees; all loads and stores are unaligned.
            unsafe {
                let xp = x.add(QK * i);
                let v = [0, 8, 16, 24].map(|o| _mm256_loadu_ps(xp.add(o)));
                let mut max_abs = _mm256_andnot_ps(sign, v[0]);
                for &vj in &v[1..] {
                    max_abs = _mm256_max_ps(max_abs, _mm256_andnot_ps(sign, vj));
                }
                let mut max4 = _mm_max_ps(
                    _mm256_extractf128_ps::<1>(max_abs),
                    _mm256_castps256_ps128(max_abs),
                );
                max4 = _mm_max_ps(max4, _mm_movehl_ps(max4, max4));
                max4 = _mm_max_ss(max4, _mm_movehdup_ps(max4));
                let amax = _mm_cvtss_f32(max4);

                let d = amax / 127.0;
                let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
                let mul = _mm256_set1_ps(id);
                let q = v.map(|vj| {
                    _mm256_cvtps_epi32(_mm256_round_ps::<
                        { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
                    >(_mm256_mul_ps(vj, mul)))
                });
                let yb = y.add(bs * i);
                std::ptr::copy_nonoverlapping(
                    super::f32_to_f16_ggml(d).to_le_bytes().as_ptr(),
                    yb,
                    2,
                );
                if Q81 {
                    let s = _mm256_add_epi32(
                        _mm256_add_epi32(q[0], q[1]),
                        _mm256_add_epi32(q[2], q[3]),
                    );
                    let s4 =
                        _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
                    let s2 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
                    let s1 = _mm_add_epi32(s2, _mm_shuffle_epi32::<0b01>(s2));
                    let sum = _mm_cvtsi128_si32(s1);
                    std::ptr::copy_nonoverlapping(
                        super::f32_to_f16_ggml(d * sum as f32)
                            .to_le_bytes()
                            .as_ptr(),
                        yb.add(2),
                        2,
                    );
                }
                let i01 = _mm256_packs_epi32(q[0], q[1]);
                let i23 = _mm256_packs_epi32(q[2], q[3]);
                let b = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(i01, i23), perm);
                _mm256_storeu_si256(yb.add(qoff) as *mut __m256i, b);
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn lanes(v: __m256) -> [f32; 8] {
        let mut out = [0f32; 8];
        // SAFETY: `out` is 8 writable f32s; the store is unaligned.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), v) };
        out
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn lanes4(v: [__m256; 4]) -> [[f32; 8]; 4] {
        [lanes(v[0]), lanes(v[1]), lanes(v[2]), lanes(v[3])]
    }

    /// Converts the two f16 values at `p` (little-endian, unaligned) to f32 lanes 0 and 1.
    ///
    /// # Safety
    /// `p` must be readable for 4 bytes; the CPU must support F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load_2xf16(p: *const u8) -> __m128 {
        // SAFETY: the caller guarantees 4 readable bytes at `p`; `read_unaligned` has no alignment need.
        let bits = unsafe { std::ptr::read_unaligned(p as *const u32) };
        _mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32))
    }

    /// f16 bits -> f32, all 65536 values (exact; ggml's `ggml_table_f32_f16`). Used for lone f16
    /// scales: converting one with F16C makes LLVM emit a 16-bit insert into an arbitrary xmm register,
    /// a false dependency that can chain a loop's blocks through its accumulator (3x slower).
    fn f16_table() -> &'static [f32; 65536] {
        static TABLE: std::sync::OnceLock<Box<[f32; 65536]>> = std::sync::OnceLock::new();
        TABLE.get_or_init(|| {
            let v: Vec<f32> = (0..=u16::MAX).map(super::f16_to_f32).collect();
            v.into_boxed_slice().try_into().expect("65536 entries")
        })
    }

    /// The f16 at `p` (little-endian, unaligned) as f32, through `t` ([`f16_table`]).
    ///
    /// # Safety
    /// `p` must be readable for 2 bytes.
    #[inline(always)]
    unsafe fn f16_at(t: &[f32; 65536], p: *const u8) -> f32 {
        // SAFETY: the caller guarantees 2 readable bytes at `p`.
        t[unsafe { std::ptr::read_unaligned(p as *const u16) } as usize]
    }

    /// 16 packed nibble bytes to 32 bytes: low nibbles (elements 0..16) in the low lane, high nibbles
    /// (elements 16..32) in the high lane (ggml's `bytes_from_nibbles_32`).
    ///
    /// # Safety
    /// `p` must be readable for 16 bytes; the CPU must support AVX2.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn nibbles_32(p: *const u8) -> __m256i {
        // SAFETY: the caller guarantees 16 readable bytes at `p`; `loadu` has no alignment need.
        let q = unsafe { _mm_loadu_si128(p as *const __m128i) };
        // Both lanes hold the 16 bytes; the high lane is shifted right by 4 (per dword: the bits that
        // come in from the next byte are masked off below).
        let both = _mm256_srlv_epi32(
            _mm256_broadcastsi128_si256(q),
            _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4),
        );
        _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
    }

    /// ggml's `mul_sum_i8_pairs` as 8 i32 lanes: `madd(1, maddubs(|x|, sign(y, x)))`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn mul_sum_i8_pairs(x: __m256i, y: __m256i) -> __m256i {
        let ax = _mm256_sign_epi8(x, x);
        let sy = _mm256_sign_epi8(y, x);
        _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sy), _mm256_set1_epi16(1))
    }

    /// A 32-element ggml weight block format as the integer kernels below see it. Each is dotted with
    /// Q8_0 (signed formats) or Q8_1 (formats with a minimum) activation blocks, with ggml's AVX2
    /// arithmetic per block: signed codes through `mul_sum_i8_pairs` (the sign trick) and
    /// `fma(dw * da, lanes, acc)`; unsigned codes through `maddubs` and `fma(dw * da, lanes, acc)`,
    /// the `m * s` terms fused into a separate sum, added after `hsum_float_8`.
    trait Block32 {
        /// Bytes per weight block.
        const W: usize;
        /// Signed codes (Q4_0, Q5_0, Q8_0 against Q8_0) or unsigned codes with a minimum (Q4_1, Q5_1
        /// against Q8_1).
        const SIGNED: bool;
        /// The 32 codes of the weight block at `p`, element `e` in byte `e`.
        ///
        /// # Safety
        /// `p` readable for [`Self::W`] bytes; AVX2.
        unsafe fn codes(p: *const u8) -> __m256i;
    }

    /// Activation block bytes and the offset of its quants for weights `T`.
    const fn act_layout<T: Block32>() -> (usize, usize) {
        if T::SIGNED {
            (BlockQ8_0::BYTES, 2)
        } else {
            (BlockQ8_1::BYTES, 4)
        }
    }

    /// Cache lines to prefetch per block of four rows of `T`: `⌈4 W / 64⌉`.
    const fn lines<T: Block32>() -> usize {
        (4 * T::W).div_ceil(64)
    }

    struct Q4_0;
    struct Q4_1;
    struct Q5_0;
    struct Q5_1;
    struct Q8_0;

    impl Block32 for Q4_0 {
        const W: usize = BlockQ4_0::BYTES;
        const SIGNED: bool = true;
        #[inline(always)]
        unsafe fn codes(p: *const u8) -> __m256i {
            // SAFETY: 16 nibble bytes at `p + 2` (caller); AVX2 (caller).
            unsafe { _mm256_sub_epi8(nibbles_32(p.add(2)), _mm256_set1_epi8(8)) }
        }
    }

    impl Block32 for Q4_1 {
        const W: usize = BlockQ4_1::BYTES;
        const SIGNED: bool = false;
        #[inline(always)]
        unsafe fn codes(p: *const u8) -> __m256i {
            // SAFETY: 16 nibble bytes at `p + 4` (caller); AVX2 (caller).
            unsafe { nibbles_32(p.add(4)) }
        }
    }

    impl Block32 for Q5_0 {
        const W: usize = 22;
        const SIGNED: bool = true;
        #[inline(always)]
        unsafe fn codes(p: *const u8) -> __m256i {
            // SAFETY: `qh` at `p + 2`, nibbles at `p + 6` (caller); AVX2 (caller). ggml: the code
            // with its fifth bit clear gets 0xF0 or-ed in, i.e. `code - 16` as i8.
            unsafe {
                let hi = _mm256_andnot_si256(bits_32(p.add(2)), _mm256_set1_epi8(0xF0u8 as i8));
                _mm256_or_si256(nibbles_32(p.add(6)), hi)
            }
        }
    }

    impl Block32 for Q5_1 {
        const W: usize = 24;
        const SIGNED: bool = false;
        #[inline(always)]
        unsafe fn codes(p: *const u8) -> __m256i {
            // SAFETY: `qh` at `p + 4`, nibbles at `p + 8` (caller); AVX2 (caller).
            unsafe {
                let hi = _mm256_and_si256(bits_32(p.add(4)), _mm256_set1_epi8(0x10));
                _mm256_or_si256(nibbles_32(p.add(8)), hi)
            }
        }
    }

    impl Block32 for Q8_0 {
        const W: usize = BlockQ8_0::BYTES;
        const SIGNED: bool = true;
        #[inline(always)]
        unsafe fn codes(p: *const u8) -> __m256i {
            // SAFETY: 32 quant bytes at `p + 2` (caller); AVX2 (caller).
            unsafe { _mm256_loadu_si256(p.add(2) as *const __m256i) }
        }
    }

    /// The 32 bits at `p` (little-endian) as 32 bytes, 0xFF where the bit is set (ggml's
    /// `bytes_from_bits_32`).
    ///
    /// # Safety
    /// `p` readable for 4 bytes; AVX2.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn bits_32(p: *const u8) -> __m256i {
        // SAFETY: 4 readable bytes at `p` (caller); unaligned read.
        let x = unsafe { std::ptr::read_unaligned(p as *const u32) };
        let shuf = _mm256_set_epi64x(
            0x0303030303030303,
            0x0202020202020202,
            0x0101010101010101,
            0,
        );
        let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(x as i32), shuf);
        let bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
        _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1))
    }

    /// `R` weight rows of `T` x one activation row of `nb` blocks, prefetching `pfl` lines per block
    /// from `pf` on (a hint, any address).
    ///
    /// # Safety
    /// Each `w[r]` must be readable for `nb` blocks of `T` and `a` for `nb` activation blocks; the
    /// CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_rows<T: Block32, const R: usize>(
        nb: usize,
        w: [*const u8; R],
        a: *const u8,
        pf: *const u8,
        pfl: usize,
    ) -> [f32; R] {
        let t = f16_table();
        let (ab_bytes, aq) = act_layout::<T>();
        let mut acc = [_mm256_setzero_ps(); R];
        // Unsigned formats: lane 1 holds Σ fma(m, s); lane 0 collects unused products.
        let mut summs = [_mm_setzero_ps(); R];
        let ones = _mm256_set1_epi16(1);
        for b in 0..nb {
            prefetch_lines(pf.wrapping_add(b * R * T::W), pfl);
            // SAFETY: block `b < nb` of each row lies within the readable ranges the caller guarantees.
            unsafe {
                let ab = a.add(b * ab_bytes);
                let qy = _mm256_loadu_si256(ab.add(aq) as *const __m256i);
                if T::SIGNED {
                    let da = f16_at(t, ab);
                    for r in 0..R {
                        let wb = w[r].add(b * T::W);
                        let d = _mm256_set1_ps(f16_at(t, wb) * da);
                        let q = _mm256_cvtepi32_ps(mul_sum_i8_pairs(T::codes(wb), qy));
                        acc[r] = _mm256_fmadd_ps(d, q, acc[r]);
                    }
                } else {
                    let ds = load_2xf16(ab); // [d_a, s_a, 0, 0]
                    for r in 0..R {
                        let wb = w[r].add(b * T::W);
                        let dm = load_2xf16(wb); // [d_w, m_w, 0, 0]
                        summs[r] = _mm_fmadd_ps(dm, ds, summs[r]);
                        let d = _mm256_broadcastss_ps(_mm_mul_ss(dm, ds));
                        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(T::codes(wb), qy), ones);
                        acc[r] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), acc[r]);
                    }
                }
            }
        }
        std::array::from_fn(|r| {
            let h = crate::reduce::avx2::hsum8(acc[r]);
            if T::SIGNED {
                h
            } else {
                h + _mm_cvtss_f32(_mm_movehdup_ps(summs[r]))
            }
        })
    }

    /// F16 x F16; `w`, `a` are `2n` bytes.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_f16_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
        assert!(w.len() >= 2 * n && a.len() >= 2 * n);
        let np = n & !31;
        let mut sum = [_mm256_setzero_ps(); 4];
        for i in (0..np).step_by(32) {
            for (j, s) in sum.iter_mut().enumerate() {
                let e = 2 * (i + 8 * j);
                // SAFETY: e + 16 <= 2 * np <= the slices' lengths (asserted above).
                let (x, y) = unsafe {
                    (
                        _mm256_cvtph_ps(_mm_loadu_si128(w.as_ptr().add(e) as *const __m128i)),
                        _mm256_cvtph_ps(_mm_loadu_si128(a.as_ptr().add(e) as *const __m128i)),
                    )
                };
                *s = _mm256_fmadd_ps(x, y, *s);
            }
        }
        scalar::f16_tail(scalar::reduce_f32x8x4(lanes4(sum)), np, n, w, a)
    }

    /// bf16 x 8 (16 bytes at `p`) widened to f32.
    ///
    /// # Safety
    /// `p` must be readable for 16 bytes; the CPU must support AVX2.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load_8xbf16(p: *const u8) -> __m256 {
        // SAFETY: the caller guarantees 16 readable bytes at `p`.
        let h = unsafe { _mm_loadu_si128(p as *const __m128i) };
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
    }

    /// BF16 x BF16; `w`, `a` are `2n` bytes.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_bf16_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
        assert!(w.len() >= 2 * n && a.len() >= 2 * n);
        let np = n & !31;
        let mut sum = [_mm256_setzero_ps(); 4];
        for i in (0..np).step_by(32) {
            for (j, s) in sum.iter_mut().enumerate() {
                let e = 2 * (i + 8 * j);
                // SAFETY: e + 16 <= 2 * np <= the slices' lengths (asserted above).
                let (x, y) = unsafe {
                    (
                        load_8xbf16(w.as_ptr().add(e)),
                        load_8xbf16(a.as_ptr().add(e)),
                    )
                };
                *s = _mm256_fmadd_ps(x, y, *s);
            }
        }
        scalar::bf16_tail(scalar::reduce_bf16x8x4(lanes4(sum)), np, n, w, a)
    }

    /// F32 x F32; `w`, `a` are `4n` bytes.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_f32_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
        assert!(w.len() >= 4 * n && a.len() >= 4 * n);
        let np = n & !31;
        let mut sum = [_mm256_setzero_ps(); 4];
        for i in (0..np).step_by(32) {
            for (j, s) in sum.iter_mut().enumerate() {
                let e = 4 * (i + 8 * j);
                // SAFETY: e + 32 <= 4 * np <= the slices' lengths (asserted above).
                let (x, y) = unsafe {
                    (
                        _mm256_loadu_ps(w.as_ptr().add(e) as *const f32),
                        _mm256_loadu_ps(a.as_ptr().add(e) as *const f32),
                    )
                };
                *s = _mm256_fmadd_ps(x, y, *s);
            }
        }
        scalar::f32_tail(scalar::reduce_f32x8x4(lanes4(sum)), np, n, w, a)
    }
}
