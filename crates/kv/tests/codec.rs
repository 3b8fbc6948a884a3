//! The KV codecs: raw round trips exactly; int8 / int4 round trips within the documented bound of each
//! group's scale; hostile payloads error and never panic; sizes printed.

use ep_kv::codec::{
    self, codec_name, decode, encode, CodecError, QuantSpec, CODECS, CODEC_INT4, CODEC_INT8,
    CODEC_RAW, GROUP,
};
use ep_kv::wire::{validate_frame, Frame, KvHeader, WireLayout};
use ep_kv::KvDtype;
use half::{bf16, f16};
use proptest::prelude::*;

fn layout(n_head_kv: u32, head_dim: u32, dtype: KvDtype) -> WireLayout {
    WireLayout {
        n_layer: 2,
        n_head_kv,
        head_dim,
        block_tokens: 16,
        dtype,
    }
}

fn to_bytes(dtype: KvDtype, xs: &[f32]) -> Vec<u8> {
    let mut o = Vec::new();
    for &x in xs {
        match dtype {
            KvDtype::F32 => o.extend_from_slice(&x.to_le_bytes()),
            KvDtype::F16 => o.extend_from_slice(&f16::from_f32(x).to_le_bytes()),
            KvDtype::Bf16 => o.extend_from_slice(&bf16::from_f32(x).to_le_bytes()),
        }
    }
    o
}

fn from_bytes(dtype: KvDtype, b: &[u8]) -> Vec<f32> {
    match dtype {
        KvDtype::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        KvDtype::F16 => b
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        KvDtype::Bf16 => b
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
    }
}

/// Relative half-ulp of a dtype's rounding.
fn dtype_eps(d: KvDtype) -> f32 {
    match d {
        KvDtype::F32 => 2f32.powi(-24),
        KvDtype::F16 => 2f32.powi(-11),
        KvDtype::Bf16 => 2f32.powi(-8),
    }
}

/// The documented bound for a group with values in `lo..=hi`: half the scale (as stored: f16 min
/// rounded down, f16 scale rounded up) plus f32 arithmetic and the dtype's rounding of x̂.
fn check_group(bits: u8, dtype: KvDtype, xs: &[f32], ys: &[f32]) -> Result<(), String> {
    let lo = xs.iter().copied().fold(f32::INFINITY, f32::min);
    let hi = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let levels = ((1u32 << bits) - 1) as f32;
    let ulp16 = |x: f32| (x.abs() * 2f32.powi(-10)).max(2f32.powi(-24));
    let scale = ((hi - lo) + ulp16(lo)) / levels * (1.0 + 2f32.powi(-9)) + 2f32.powi(-24);
    for (&x, &y) in xs.iter().zip(ys) {
        let tol = scale / 2.0
            + dtype_eps(dtype) * x.abs().max(y.abs())
            + 1e-6 * (lo.abs() + hi.abs())
            + 2f32.powi(-24);
        if (x - y).abs() > tol {
            return Err(format!(
                "x = {x}, x̂ = {y}, |err| = {} > {tol} (group {lo}..={hi}, {bits} bits)",
                (x - y).abs()
            ));
        }
    }
    Ok(())
}

/// Checks int8/int4 against the bound group by group (keys per channel over token groups, values
/// per token over channel groups).
fn check_lossy(
    bits: u8,
    l: &WireLayout,
    n: usize,
    k: &[f32],
    v: &[f32],
    kd: &[f32],
    vd: &[f32],
) -> Result<(), String> {
    let w = l.kv_width() as usize;
    for c in 0..w {
        for t0 in (0..n).step_by(GROUP) {
            let t1 = (t0 + GROUP).min(n);
            let xs: Vec<f32> = (t0..t1).map(|t| k[t * w + c]).collect();
            let ys: Vec<f32> = (t0..t1).map(|t| kd[t * w + c]).collect();
            check_group(bits, l.dtype, &xs, &ys).map_err(|e| format!("K channel {c}: {e}"))?;
        }
    }
    for t in 0..n {
        for (g, (xs, ys)) in v[t * w..(t + 1) * w]
            .chunks(GROUP)
            .zip(vd[t * w..(t + 1) * w].chunks(GROUP))
            .enumerate()
        {
            check_group(bits, l.dtype, xs, ys)
                .map_err(|e| format!("V token {t} group {g}: {e}"))?;
        }
    }
    Ok(())
}

fn dtype_strategy() -> impl Strategy<Value = KvDtype> {
    prop_oneof![Just(KvDtype::F16), Just(KvDtype::Bf16), Just(KvDtype::F32)]
}

/// Values of a realistic spread (magnitude 10^e), some groups constant, occasional outliers.
fn values(n: usize, seed: u64, e: i32) -> Vec<f32> {
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mag = 10f32.powi(e);
    (0..n)
        .map(|i| {
            let r = next();
            let u = (r >> 11) as f32 / (1u64 << 53) as f32 * 2.0 - 1.0;
            match r % 17 {
                0 => u * mag * 20.0,
                1 if i % 3 == 0 => mag,
                _ => u * mag,
            }
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn round_trips(
        n_head_kv in 1u32..4,
        head_dim in prop_oneof![Just(1u32), Just(3), Just(8), Just(33), Just(64)],
        n in 1usize..80,
        dtype in dtype_strategy(),
        seed in any::<u64>(),
        e in -3i32..3,
    ) {
        let l = layout(n_head_kv, head_dim, dtype);
        let w = l.kv_width() as usize;
        // Inputs exactly representable in the dtype.
        let kb = to_bytes(dtype, &values(n * w, seed, e));
        let vb = to_bytes(dtype, &values(n * w, seed ^ 0x9e37_79b9, e));
        let (kf, vf) = (from_bytes(dtype, &kb), from_bytes(dtype, &vb));
        for &c in CODECS {
            let p = encode(c, &l, n, &kb, &vb).unwrap();
            prop_assert!(p.len() as u64 <= codec::max_payload_len(c, &l, n).unwrap());
            let (kd, vd) = decode(c, &l, n, &p).unwrap();
            prop_assert_eq!(kd.len(), kb.len());
            prop_assert_eq!(vd.len(), vb.len());
            // The frame passes the wire's checks.
            let h = KvHeader::new([7; 32], l, vec![1; n]);
            validate_frame(&h, &Frame::new(0, 0, n as u32, dtype, c, p.clone())).unwrap();
            if c == CODEC_RAW {
                prop_assert_eq!(&kd, &kb);
                prop_assert_eq!(&vd, &vb);
                let mut cat = kb.clone();
                cat.extend_from_slice(&vb);
                prop_assert_eq!(p, cat);
            } else {
                let bits = QuantSpec::of(c).unwrap().bits;
                let r = check_lossy(bits, &l, n, &kf, &vf, &from_bytes(dtype, &kd), &from_bytes(dtype, &vd));
                prop_assert!(r.is_ok(), "{} {:?}: {}", codec_name(c).unwrap(), dtype, r.unwrap_err());
                // Deterministic: the same input gives the same payload.
                prop_assert_eq!(encode(c, &l, n, &kb, &vb).unwrap(), p);
            }
        }
    }

    #[test]
    fn hostile_payloads_error_without_panic(
        n in 1usize..70,
        dtype in dtype_strategy(),
        seed in any::<u64>(),
        cut in any::<prop::sample::Index>(),
        flip in any::<prop::sample::Index>(),
        garbage in prop::collection::vec(any::<u8>(), 0..300),
    ) {
        let l = layout(2, 8, dtype);
        let w = l.kv_width() as usize;
        let kb = to_bytes(dtype, &values(n * w, seed, 0));
        let vb = to_bytes(dtype, &values(n * w, !seed, 0));
        let ok_len = |r: &Result<(Vec<u8>, Vec<u8>), CodecError>, n: usize| match r {
            Ok((k, v)) => k.len() == n * w * dtype.bytes() && v.len() == k.len(),
            Err(_) => true,
        };
        for &c in CODECS {
            let p = encode(c, &l, n, &kb, &vb).unwrap();
            // Truncated: always an error.
            let t = cut.index(p.len());
            prop_assert!(decode(c, &l, n, &p[..t]).is_err());
            // Trailing bytes: an error.
            let mut longer = p.clone();
            longer.push(0);
            prop_assert!(decode(c, &l, n, &longer).is_err());
            // Another token count than encoded: an error.
            prop_assert!(decode(c, &l, n + 1, &p).is_err());
            if n > 1 {
                prop_assert!(decode(c, &l, n - 1, &p).is_err());
            }
            // A flipped byte: an error or rows of the right size (the frame digest catches the rest).
            let mut f = p.clone();
            let i = flip.index(f.len());
            f[i] ^= 0x5a;
            prop_assert!(ok_len(&decode(c, &l, n, &f), n));
            // Garbage.
            prop_assert!(ok_len(&decode(c, &l, n, &garbage), n));
        }
    }
}

#[test]
fn huge_claims_fail_before_allocating() {
    let l = layout(4, 64, KvDtype::F16);
    let p = encode(CODEC_INT4, &l, 4, &[0; 4 * 256 * 2], &[0; 4 * 256 * 2]).unwrap();
    for n in [1 << 20, usize::MAX / 2, usize::MAX] {
        for c in CODECS {
            assert!(decode(*c, &l, n, &p).is_err());
        }
    }
    // A declared content size that is not the range's body.
    assert!(matches!(
        decode(CODEC_INT4, &l, 5, &p),
        Err(CodecError::Length { .. })
    ));
    let wide = WireLayout {
        n_head_kv: u32::MAX,
        head_dim: u32::MAX,
        ..l
    };
    assert!(decode(CODEC_INT8, &wide, 1, &p).is_err());
    assert!(decode(CODEC_INT8, &l, 4, &[]).is_err());
    assert_eq!(decode(9, &l, 4, &p), Err(CodecError::Unknown(9)));
    assert!(encode(9, &l, 4, &[], &[]).is_err());
    // Wrong input lengths.
    assert!(matches!(
        encode(CODEC_INT8, &l, 4, &[0; 10], &[0; 10]),
        Err(CodecError::Length { .. })
    ));
}

#[test]
fn unquantisable_values_are_refused() {
    let l = layout(1, 2, KvDtype::F32);
    for bad in [f32::NAN, f32::INFINITY, 1e6] {
        let k = to_bytes(KvDtype::F32, &[bad, 0.0]);
        let v = to_bytes(KvDtype::F32, &[0.0, 0.0]);
        assert!(matches!(
            encode(CODEC_INT4, &l, 1, &k, &v),
            Err(CodecError::NotRepresentable(_))
        ));
        assert!(encode(CODEC_RAW, &l, 1, &k, &v).is_ok());
    }
}

#[test]
fn names_parse_back() {
    for &c in CODECS {
        assert_eq!(codec::parse(codec_name(c).unwrap()), Some(c));
    }
    assert_eq!(codec::parse("int3"), None);
    assert_eq!(codec_name(3), None);
    assert_eq!((CODEC_RAW, CODEC_INT8, CODEC_INT4), (0, 1, 2));
}

#[test]
fn lossy_frames_are_bounded_on_the_wire() {
    let l = layout(2, 8, KvDtype::F16);
    let h = KvHeader::new([1; 32], l, vec![5; 40]);
    let max = codec::max_payload_len(CODEC_INT4, &l, 40).unwrap() as usize;
    for (len, ok) in [(0, false), (1, true), (max, true), (max + 1, false)] {
        let f = Frame::new(0, 0, 40, KvDtype::F16, CODEC_INT4, vec![0; len]);
        assert_eq!(validate_frame(&h, &f).is_ok(), ok, "length {len}");
    }
}

/// Sizes of a 256-token frame of SmolLM2's shape (3 KV heads × 64), Gaussian-like values.
#[test]
fn sizes_reported() {
    let l = layout(3, 64, KvDtype::F16);
    let n = 256;
    let w = l.kv_width() as usize;
    let kb = to_bytes(KvDtype::F16, &values(n * w, 11, 0));
    let vb = to_bytes(KvDtype::F16, &values(n * w, 12, 0));
    let raw = 2 * kb.len();
    for &c in CODECS {
        let p = encode(c, &l, n, &kb, &vb).unwrap();
        let body = QuantSpec::of(c).map_or(raw, |s| s.body_len(w, n).unwrap());
        println!(
            "{:>4}: {:>7} bytes ({:.3} bits/value; body {:.3} bits/value; {:.2}x smaller than f16)",
            codec_name(c).unwrap(),
            p.len(),
            8.0 * p.len() as f64 / (2 * n * w) as f64,
            8.0 * body as f64 / (2 * n * w) as f64,
            raw as f64 / p.len() as f64
        );
        assert!(p.len() <= raw);
    }
}
