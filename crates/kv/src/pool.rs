//! The block pool: fixed-size KV blocks inside a hard byte budget.
//!
//! A block holds `block_tokens` consecutive token positions of one sequence for every layer: per layer a
//! K and a V slab of `block_tokens × kv_width` values in the configured dtype. Storage is laid out layer by
//! layer (all blocks of layer 0, then layer 1, …) so that one layer's attention touches one region.
//! The pool allocates its whole budget once (`n_blocks = budget / block_bytes`); it cannot grow, so the
//! budget holds by construction. Blocks are reference-counted: a block shared by several sequences (a
//! common prompt prefix) and by the prefix cache is stored once.

use ep_kernels::paged::{KvChunk, KvDtype, KvRows};
use half::slice::HalfBitsSliceExt;
use half::{bf16, f16};

use crate::KvError;

/// Index of a block in the pool.
pub type BlockId = u32;

/// Geometry of the KV: what one block holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvLayout {
    pub n_layer: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    /// Token positions per block (a multiple of 8, so attention lanes line up with block starts).
    pub block_tokens: usize,
    pub dtype: KvDtype,
}

impl KvLayout {
    pub fn kv_width(&self) -> usize {
        self.n_head_kv * self.head_dim
    }
    /// Values of one block's K (or V) slab in one layer.
    pub fn slab_len(&self) -> usize {
        self.block_tokens * self.kv_width()
    }
    /// Bytes of one block over all layers, K and V.
    pub fn block_bytes(&self) -> usize {
        2 * self.n_layer * self.slab_len() * self.dtype.bytes()
    }
    /// Blocks needed to hold `tokens` positions.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_tokens)
    }
}

/// One layer's K (or V) storage. Half-precision values are kept as raw bits so the allocation is a
/// zeroed one the OS maps lazily: a large budget costs memory only as blocks are written.
enum Slabs {
    F32(Vec<f32>),
    F16(Vec<u16>),
    Bf16(Vec<u16>),
}

impl Slabs {
    fn zeroed(dtype: KvDtype, n: usize) -> Self {
        match dtype {
            KvDtype::F32 => Slabs::F32(vec![0.0; n]),
            KvDtype::F16 => Slabs::F16(vec![0; n]),
            KvDtype::Bf16 => Slabs::Bf16(vec![0; n]),
        }
    }

    fn write(&mut self, at: usize, src: &[f32]) {
        match self {
            Slabs::F32(d) => d[at..at + src.len()].copy_from_slice(src),
            Slabs::F16(d) => {
                for (o, &x) in d[at..at + src.len()].iter_mut().zip(src) {
                    *o = f16::from_f32(x).to_bits();
                }
            }
            Slabs::Bf16(d) => {
                for (o, &x) in d[at..at + src.len()].iter_mut().zip(src) {
                    *o = bf16::from_f32(x).to_bits();
                }
            }
        }
    }

    fn rows(&self, range: std::ops::Range<usize>) -> KvRows<'_> {
        match self {
            Slabs::F32(d) => KvRows::F32(&d[range]),
            Slabs::F16(d) => KvRows::F16(d[range].reinterpret_cast()),
            Slabs::Bf16(d) => KvRows::Bf16(d[range].reinterpret_cast()),
        }
    }

    /// Values `at..at + n` as little-endian bytes of the stored dtype, appended to `out`.
    fn read_bytes(&self, at: usize, n: usize, out: &mut Vec<u8>) {
        match self {
            Slabs::F32(d) => d[at..at + n]
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            Slabs::F16(d) | Slabs::Bf16(d) => d[at..at + n]
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        }
    }

    /// Stores little-endian bytes of the stored dtype at value `at` (`src.len()` a multiple of the
    /// value size).
    fn write_bytes(&mut self, at: usize, src: &[u8]) {
        match self {
            Slabs::F32(d) => {
                for (o, b) in d[at..at + src.len() / 4]
                    .iter_mut()
                    .zip(src.chunks_exact(4))
                {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            Slabs::F16(d) | Slabs::Bf16(d) => {
                for (o, b) in d[at..at + src.len() / 2]
                    .iter_mut()
                    .zip(src.chunks_exact(2))
                {
                    *o = u16::from_le_bytes([b[0], b[1]]);
                }
            }
        }
    }

    fn copy_within(&mut self, from: usize, to: usize, n: usize) {
        match self {
            Slabs::F32(d) => d.copy_within(from..from + n, to),
            Slabs::F16(d) | Slabs::Bf16(d) => d.copy_within(from..from + n, to),
        }
    }
}

/// Fixed-size KV blocks with reference counts, inside a byte budget.
pub struct BlockPool {
    layout: KvLayout,
    n_blocks: usize,
    budget_bytes: usize,
    /// Per layer: K and V of every block.
    k: Vec<Slabs>,
    v: Vec<Slabs>,
    refs: Vec<u32>,
    free: Vec<BlockId>,
}

impl BlockPool {
    /// A pool of as many blocks as fit in `budget_bytes`. Errors when not even one block fits or the
    /// layout is unusable.
    pub fn new(layout: KvLayout, budget_bytes: usize) -> Result<Self, KvError> {
        if layout.block_tokens == 0 || !layout.block_tokens.is_multiple_of(8) {
            return Err(KvError::Config(format!(
                "block size must be a positive multiple of 8 tokens, got {}",
                layout.block_tokens
            )));
        }
        if layout.n_layer == 0 || layout.kv_width() == 0 {
            return Err(KvError::Config("empty KV layout".into()));
        }
        let n_blocks = budget_bytes / layout.block_bytes();
        if n_blocks == 0 {
            return Err(KvError::Config(format!(
                "a KV budget of {budget_bytes} bytes holds no block (one block of {} tokens needs {} bytes)",
                layout.block_tokens,
                layout.block_bytes()
            )));
        }
        if n_blocks > BlockId::MAX as usize {
            return Err(KvError::Config(format!("{n_blocks} blocks is too many")));
        }
        let per_layer = n_blocks * layout.slab_len();
        let k = (0..layout.n_layer)
            .map(|_| Slabs::zeroed(layout.dtype, per_layer))
            .collect();
        let v = (0..layout.n_layer)
            .map(|_| Slabs::zeroed(layout.dtype, per_layer))
            .collect();
        Ok(Self {
            layout,
            n_blocks,
            budget_bytes,
            k,
            v,
            refs: vec![0; n_blocks],
            // Pop from the end: hand out low ids first.
            free: (0..n_blocks as BlockId).rev().collect(),
        })
    }

    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }
    pub fn n_blocks(&self) -> usize {
        self.n_blocks
    }
    pub fn n_free(&self) -> usize {
        self.free.len()
    }
    pub fn budget_bytes(&self) -> usize {
        self.budget_bytes
    }
    /// Bytes of the blocks currently referenced (never more than the budget).
    pub fn used_bytes(&self) -> usize {
        (self.n_blocks - self.free.len()) * self.layout.block_bytes()
    }

    /// Takes a free block (reference count 1), or `None` when the pool is full.
    pub fn alloc(&mut self) -> Option<BlockId> {
        let b = self.free.pop()?;
        debug_assert_eq!(self.refs[b as usize], 0);
        self.refs[b as usize] = 1;
        Some(b)
    }

    /// Adds a reference to a live block.
    pub fn retain(&mut self, b: BlockId) {
        let r = &mut self.refs[b as usize];
        assert!(*r > 0, "retain of free block {b}");
        *r += 1;
    }

    /// Drops a reference; the block returns to the free list at zero.
    pub fn release(&mut self, b: BlockId) {
        let r = &mut self.refs[b as usize];
        assert!(*r > 0, "release of free block {b}");
        *r -= 1;
        if *r == 0 {
            self.free.push(b);
        }
    }

    pub fn ref_count(&self, b: BlockId) -> u32 {
        self.refs[b as usize]
    }

    /// Stores K and V rows (`n × kv_width` f32 each, converted to the pool's dtype) for layer `layer`
    /// into block `b` from slot `slot` on.
    pub fn write(&mut self, layer: usize, b: BlockId, slot: usize, k: &[f32], v: &[f32]) {
        let w = self.layout.kv_width();
        assert_eq!(k.len(), v.len());
        assert!(
            slot * w + k.len() <= self.layout.slab_len(),
            "write past block end"
        );
        let at = b as usize * self.layout.slab_len() + slot * w;
        self.k[layer].write(at, k);
        self.v[layer].write(at, v);
    }

    /// The first `n_keys` positions of block `b` in `layer`, for KV head `kv_head`.
    pub fn chunk(&self, layer: usize, b: BlockId, n_keys: usize, kv_head: usize) -> KvChunk<'_> {
        let sl = self.layout.slab_len();
        let range = b as usize * sl..(b as usize + 1) * sl;
        KvChunk {
            k: self.k[layer].rows(range.clone()),
            v: self.v[layer].rows(range),
            n_keys: n_keys.min(self.layout.block_tokens),
            stride: self.layout.kv_width(),
            off: kv_head * self.layout.head_dim,
        }
    }

    /// Copies the first `n` slots of block `from` into block `to`, every layer (copy-on-write of a
    /// partly filled shared block).
    pub fn copy_block(&mut self, from: BlockId, to: BlockId, n: usize) {
        let sl = self.layout.slab_len();
        let len = n.min(self.layout.block_tokens) * self.layout.kv_width();
        for l in 0..self.layout.n_layer {
            self.k[l].copy_within(from as usize * sl, to as usize * sl, len);
            self.v[l].copy_within(from as usize * sl, to as usize * sl, len);
        }
    }

    /// Copies the first `n` slots of block `from` into block `to` in one layer.
    pub fn copy_block_layer(&mut self, layer: usize, from: BlockId, to: BlockId, n: usize) {
        let sl = self.layout.slab_len();
        let len = n.min(self.layout.block_tokens) * self.layout.kv_width();
        self.k[layer].copy_within(from as usize * sl, to as usize * sl, len);
        self.v[layer].copy_within(from as usize * sl, to as usize * sl, len);
    }

    /// Appends the stored K (to `k`) and V (to `v`) of slots `slot..slot + n` of block `b` in `layer`,
    /// as little-endian bytes of the stored dtype (no conversion).
    pub fn read_raw(
        &self,
        layer: usize,
        b: BlockId,
        slot: usize,
        n: usize,
        k: &mut Vec<u8>,
        v: &mut Vec<u8>,
    ) {
        let w = self.layout.kv_width();
        assert!(slot + n <= self.layout.block_tokens, "read past block end");
        let at = b as usize * self.layout.slab_len() + slot * w;
        self.k[layer].read_bytes(at, n * w, k);
        self.v[layer].read_bytes(at, n * w, v);
    }

    /// Stores K and V rows given as little-endian bytes of the stored dtype (`n × kv_width` values
    /// each) into slots `slot..` of block `b` in `layer`.
    pub fn write_raw(&mut self, layer: usize, b: BlockId, slot: usize, k: &[u8], v: &[u8]) {
        let w = self.layout.kv_width();
        let vb = self.layout.dtype.bytes();
        assert_eq!(k.len(), v.len());
        assert!(k.len().is_multiple_of(w * vb), "partial row");
        assert!(
            slot * w * vb + k.len() <= self.layout.slab_len() * vb,
            "write past block end"
        );
        let at = b as usize * self.layout.slab_len() + slot * w;
        self.k[layer].write_bytes(at, k);
        self.v[layer].write_bytes(at, v);
    }

    /// Raw K/V of one block in one layer as f32 (tests and the wire format).
    pub fn read_f32(&self, layer: usize, b: BlockId) -> (Vec<f32>, Vec<f32>) {
        let sl = self.layout.slab_len();
        let range = b as usize * sl..(b as usize + 1) * sl;
        let conv = |s: &Slabs| -> Vec<f32> {
            match s.rows(range.clone()) {
                KvRows::F32(d) => d.to_vec(),
                KvRows::F16(d) => d.iter().map(|x| x.to_f32()).collect(),
                KvRows::Bf16(d) => d.iter().map(|x| x.to_f32()).collect(),
            }
        };
        (conv(&self.k[layer]), conv(&self.v[layer]))
    }
}
