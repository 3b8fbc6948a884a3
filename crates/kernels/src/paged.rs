//! TEMPORARY interface stub (replaced by the real kernel).
use half::{bf16, f16};

use crate::attention::{attend_head, HeadScratch, KvView};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvDtype {
    F32,
    F16,
    Bf16,
}

impl KvDtype {
    pub fn bytes(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            _ => 2,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
            KvDtype::Bf16 => "bf16",
        }
    }
}

impl std::str::FromStr for KvDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(KvDtype::F32),
            "f16" => Ok(KvDtype::F16),
            "bf16" => Ok(KvDtype::Bf16),
            _ => Err(format!(
                "unknown KV dtype '{s}' (expected f32, f16 or bf16)"
            )),
        }
    }
}

#[derive(Clone, Copy)]
pub enum KvRows<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    Bf16(&'a [bf16]),
}

#[derive(Clone, Copy)]
pub struct KvChunk<'a> {
    pub k: KvRows<'a>,
    pub v: KvRows<'a>,
    pub n_keys: usize,
    pub stride: usize,
    pub off: usize,
}

#[derive(Default)]
pub struct GroupScratch {
    k: Vec<f16>,
    v: Vec<f16>,
    q: Vec<f16>,
    head: HeadScratch,
}

fn to16(r: KvRows<'_>, i: usize) -> f16 {
    match r {
        KvRows::F32(x) => f16::from_f32(x[i]),
        KvRows::F16(x) => x[i],
        KvRows::Bf16(x) => f16::from_f32(x[i].to_f32()),
    }
}

pub fn attend_group(
    q: &[f32],
    head_dim: usize,
    chunks: &[KvChunk<'_>],
    scale: f32,
    s: &mut GroupScratch,
    out: &mut [f32],
    lse: &mut [f32],
) {
    s.k.clear();
    s.v.clear();
    let mut n = 0;
    for c in chunks {
        for j in 0..c.n_keys {
            for d in 0..head_dim {
                s.k.push(to16(c.k, j * c.stride + c.off + d));
                s.v.push(to16(c.v, j * c.stride + c.off + d));
            }
        }
        n += c.n_keys;
    }
    for (h, (o, l)) in out.chunks_mut(head_dim).zip(lse.iter_mut()).enumerate() {
        s.q.clear();
        s.q.extend(
            q[h * head_dim..(h + 1) * head_dim]
                .iter()
                .map(|&x| f16::from_f32(x)),
        );
        let view = KvView {
            k: &s.k,
            v: &s.v,
            n_keys: n,
            stride: head_dim,
            off: 0,
        };
        *l = attend_head(&s.q, view, scale, &mut s.head, o);
    }
}
