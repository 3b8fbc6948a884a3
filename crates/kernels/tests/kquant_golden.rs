//! Bit-exact comparison of the K-quant kernels (Q4_K, Q5_K, Q6_K, Q8_K) with the real ggml build
//! (libggml-base + libggml-cpu, x86 AVX2 + FMA + F16C, GCC), on both kernel paths.
//!
//! `tests/data/kquant_golden.bin` holds ggml's outputs for inputs that this test regenerates with the
//! same PRNG as `tests/data/gen_kquant_golden.c` (see that file for the layout and how to rebuild it).

use ep_kernels::kquant::{self, KType, Q8K_BYTES, QK_K};
use ep_kernels::simd::Path;

const GOLDEN: &[u8] = include_bytes!("data/kquant_golden.bin");

// Mirrors of the generator's constants.
const NQ8: usize = 24;
const NA: usize = 5;
const NB: usize = 8;
const NWQ: usize = 3;
const NWR: usize = 3;
const NW: usize = NWQ + NWR;
const NDQ: usize = 3;
const DOT_NB: [usize; 3] = [1, 3, 8];

/// splitmix64, as in the generator.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u32) -> u32 {
        (self.next_u64() % n as u64) as u32
    }
    fn unit(&mut self) -> f32 {
        (((self.next_u64() >> 40) as i32) - (1 << 23)) as f32 * (1.0 / 8_388_608.0)
    }
    fn f16_bits(&mut self, exp_lo: u32, exp_n: u32, allow_neg: bool) -> u16 {
        let sign = if allow_neg { self.below(2) } else { 0 };
        let exp = exp_lo + self.below(exp_n);
        let man = self.below(1024);
        ((sign << 15) | (exp << 10) | man) as u16
    }
}

const SCALES: [f32; 8] = [1.0, 0.01, 3.7, 100.0, 1e-4, 1e30, 1e-30, 0.5];

fn gen_act_block(r: &mut Rng, x: &mut [f32], special: bool) {
    let x = &mut x[..QK_K];
    match r.below(if special { 12 } else { 10 }) {
        0 => x.fill(0.0),
        1 => {
            for v in x.iter_mut() {
                *v = (r.below(254) as i32 - 127) as f32 + 0.5;
            }
            x[r.below(256) as usize] = -127.0;
        }
        2 => {
            for v in x.iter_mut() {
                *v = r.unit() * 3.0;
            }
            x[r.below(128) as usize] = 4.0;
            x[128 + r.below(128) as usize] = -4.0;
        }
        3 => {
            for v in x.iter_mut() {
                *v = r.unit() * 0.01;
            }
            x[r.below(256) as usize] = 50.0;
        }
        4 => {
            for v in x.iter_mut() {
                *v = r.unit() * 0.5 + 0.5;
            }
        }
        5 => {
            for v in x.iter_mut() {
                *v = r.unit() * 1e-37;
            }
        }
        10 => {
            for v in x.iter_mut() {
                *v = r.unit();
            }
            x[r.below(256) as usize] = f32::NAN;
        }
        11 => {
            for v in x.iter_mut() {
                *v = r.unit();
            }
            let neg = r.below(2) == 1;
            x[r.below(256) as usize] = if neg {
                f32::NEG_INFINITY
            } else {
                f32::INFINITY
            };
        }
        _ => {
            let s = SCALES[r.below(8) as usize];
            for v in x.iter_mut() {
                *v = r.unit() * s;
            }
        }
    }
}

fn gen_weight_bytes(r: &mut Rng, ty: KType, w: &mut [u8]) {
    for p in w.chunks_exact_mut(ty.type_size()) {
        for b in p.iter_mut() {
            *b = r.below(256) as u8;
        }
        if ty == KType::Q6K {
            let d = r.f16_bits(3, 12, true);
            p[208..210].copy_from_slice(&d.to_le_bytes());
        } else {
            let d = r.f16_bits(3, 12, true);
            let m = r.f16_bits(3, 12, true);
            p[0..2].copy_from_slice(&d.to_le_bytes());
            p[2..4].copy_from_slice(&m.to_le_bytes());
        }
    }
}

/// Sequential reader of the golden file.
struct Golden<'a>(&'a [u8]);

impl<'a> Golden<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        assert!(self.0.len() >= n, "golden file truncated");
        let (h, t) = self.0.split_at(n);
        self.0 = t;
        h
    }
    fn f32s(&mut self, n: usize) -> Vec<f32> {
        self.take(4 * n)
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
}

struct TypeData {
    ty: KType,
    rows: Vec<Vec<u8>>,
    dequant: Vec<f32>,
    dots: Vec<f32>,
}

struct Data {
    q8_inputs: Vec<f32>,
    q8_golden: Vec<u8>,
    acts: Vec<f32>,
    acts_golden: Vec<u8>,
    types: Vec<TypeData>,
}

fn load() -> Data {
    let mut g = Golden(GOLDEN);
    assert_eq!(g.take(4), b"EPK1");
    let mut r = Rng(0x4B_5155_4131);
    let mut q8_inputs = vec![0f32; NQ8 * QK_K];
    for b in q8_inputs.chunks_exact_mut(QK_K) {
        gen_act_block(&mut r, b, true);
    }
    let q8_golden = g.take(NQ8 * Q8K_BYTES).to_vec();
    let mut r = Rng(0x4B_5155_4132);
    let mut acts = vec![0f32; NA * NB * QK_K];
    for b in acts.chunks_exact_mut(QK_K) {
        gen_act_block(&mut r, b, false);
    }
    let acts_golden = g.take(NA * NB * Q8K_BYTES).to_vec();
    let mut types = Vec::new();
    for (ti, ty) in KType::ALL.into_iter().enumerate() {
        let rb = NB * ty.type_size();
        let mut rows: Vec<Vec<u8>> = (0..NWQ).map(|_| g.take(rb).to_vec()).collect();
        let mut r = Rng(0x4B_5155_4152 + ti as u64);
        for _ in NWQ..NW {
            let mut w = vec![0u8; rb];
            gen_weight_bytes(&mut r, ty, &mut w);
            rows.push(w);
        }
        let dequant = g.f32s(NW * NDQ * QK_K);
        let dots = g.f32s(NW * NA * DOT_NB.len());
        types.push(TypeData {
            ty,
            rows,
            dequant,
            dots,
        });
    }
    assert_eq!(g.take(4), b"END!");
    assert!(g.0.is_empty(), "trailing bytes in the golden file");
    Data {
        q8_inputs,
        q8_golden,
        acts,
        acts_golden,
        types,
    }
}

fn paths() -> Vec<Path> {
    let mut p = vec![Path::Scalar];
    if Path::Avx2.is_available() {
        p.push(Path::Avx2);
    } else {
        eprintln!("AVX2 + FMA + F16C not available: only the scalar path is checked");
    }
    p
}

fn bits(x: f32) -> u32 {
    x.to_bits()
}

#[test]
fn q8k_quantisation_matches_ggml() {
    let d = load();
    for path in paths() {
        for (b, (x, want)) in d
            .q8_inputs
            .chunks_exact(QK_K)
            .zip(d.q8_golden.chunks_exact(Q8K_BYTES))
            .enumerate()
        {
            let mut got = vec![0xAAu8; Q8K_BYTES];
            kquant::quantize_row_q8_k_with(path, x, &mut got);
            assert_eq!(got, want, "{path:?}: Q8_K block {b}");
        }
        let mut got = vec![0xAAu8; d.acts_golden.len()];
        kquant::quantize_row_q8_k_with(path, &d.acts, &mut got);
        assert_eq!(got, d.acts_golden, "{path:?}: Q8_K activation rows");
    }
}

#[test]
fn golden_covers_edge_cases() {
    // The Q8_K test blocks include a zero block, a negative d (first max positive), a NaN-derived
    // quant and an infinite d; check that the inputs really exercise them.
    let d = load();
    let ds: Vec<f32> = d
        .q8_golden
        .chunks_exact(Q8K_BYTES)
        .map(|b| f32::from_le_bytes(b[..4].try_into().unwrap()))
        .collect();
    assert!(ds.contains(&0.0), "no zero block");
    assert!(
        ds.iter().any(|&v| v < 0.0 && v.is_finite()),
        "no negative d"
    );
    assert!(
        ds.iter().any(|&v| v > 0.0 && v.is_finite()),
        "no positive d"
    );
    assert!(ds.iter().any(|&v| v.is_infinite()), "no infinite d");
    assert!(d.q8_inputs.iter().any(|v| v.is_nan()), "no NaN input");
}

#[test]
fn dequantisation_matches_ggml() {
    let d = load();
    for t in &d.types {
        for (r, row) in t.rows.iter().enumerate() {
            let mut got = vec![0f32; NDQ * QK_K];
            kquant::dequantize_row_k(t.ty, &row[..NDQ * t.ty.type_size()], &mut got);
            let want = &t.dequant[r * NDQ * QK_K..(r + 1) * NDQ * QK_K];
            for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
                assert_eq!(
                    bits(g),
                    bits(w),
                    "{}: row {r} element {i}: {g} vs ggml {w}",
                    t.ty.name()
                );
            }
        }
    }
}

fn check_dots(d: &Data, dot: impl Fn(KType, usize, &[u8], &[u8]) -> f32, what: &str) {
    let arow = NB * Q8K_BYTES;
    for t in &d.types {
        let mut k = 0;
        for (r, row) in t.rows.iter().enumerate() {
            for a in 0..NA {
                for &nb in &DOT_NB {
                    let n = nb * QK_K;
                    let w = &row[..nb * t.ty.type_size()];
                    let act = &d.acts_golden[a * arow..a * arow + nb * Q8K_BYTES];
                    let got = dot(t.ty, n, w, act);
                    let want = t.dots[k];
                    k += 1;
                    assert_eq!(
                        bits(got),
                        bits(want),
                        "{what}: {} row {r} act {a} n {n}: {got:e} vs ggml {want:e}",
                        t.ty.name()
                    );
                }
            }
        }
    }
}

#[test]
fn dot_products_match_ggml() {
    let d = load();
    for path in paths() {
        check_dots(
            &d,
            |ty, n, w, a| kquant::vec_dot_k_with(path, ty, n, w, a),
            path.name(),
        );
    }
    check_dots(
        &d,
        kquant::scalar::vec_dot_unchecked,
        "scalar::vec_dot_unchecked",
    );
    #[cfg(target_arch = "x86_64")]
    if Path::Avx2.is_available() {
        check_dots(
            &d,
            |ty, n, w, a| match ty {
                KType::Q4K => kquant::avx2::dot_q4_k_q8_k(n, w, a),
                KType::Q5K => kquant::avx2::dot_q5_k_q8_k(n, w, a),
                KType::Q6K => kquant::avx2::dot_q6_k_q8_k(n, w, a),
            },
            "avx2::dot_*",
        );
    }
}

/// The path a model would use ([`Path::detect`]), passed on like a model passes it.
#[test]
fn detected_path_matches_ggml() {
    let d = load();
    let path = Path::detect();
    assert!(path.is_available());
    let what = format!("detected path ({})", path.name());
    check_dots(
        &d,
        |ty, n, w, a| kquant::vec_dot_k_with(path, ty, n, w, a),
        &what,
    );
    let mut got = vec![0u8; d.acts_golden.len()];
    kquant::quantize_row_q8_k_with(path, &d.acts, &mut got);
    assert_eq!(got, d.acts_golden, "{what}: Q8_K activation rows");
}

#[test]
fn type_metadata() {
    let sizes: Vec<usize> = KType::ALL.iter().map(|t| t.type_size()).collect();
    assert_eq!(sizes, [144, 176, 210]);
    let ids: Vec<u32> = KType::ALL.iter().map(|t| t.ggml_id()).collect();
    assert_eq!(ids, [12, 13, 14]);
    for t in KType::ALL {
        assert_eq!(KType::from_ggml_id(t.ggml_id()), Some(t));
        assert_eq!(t.row_bytes(512), Some(2 * t.type_size()));
        assert_eq!(t.row_bytes(100), None);
    }
    assert_eq!(KType::from_ggml_id(2), None);
    assert_eq!(kquant::q8k_row_bytes(768), Some(3 * Q8K_BYTES));
}
