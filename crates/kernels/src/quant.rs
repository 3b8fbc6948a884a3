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
#[path = "generic/quant.rs"]
pub mod scalar;

// ---------------------------------------------------------------------------------------------------
// Dot products: AVX2 + FMA + F16C
// ---------------------------------------------------------------------------------------------------

/// AVX2 + FMA + F16C kernels. The public functions check lengths and CPU support (and panic
/// otherwise); the crate-internal entry points are `unsafe` and leave the checks to the dispatchers.
#[cfg(target_arch = "x86_64")]
#[path = "x86/quant.rs"]
pub mod avx2;
