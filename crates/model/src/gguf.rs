//! GGUF reader (versions 2 and 3): all metadata, tensor directory, memory-mapped tensor data.
//!
//! The file is mapped read-only; tensor data is borrowed from the map in place, so loading a model costs
//! page faults, not copies. Every offset and size read from the file is checked against the file's length
//! before use: a truncated or corrupt file is an error naming the problem, never a panic.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use ep_kernels::quant::{ggml_type_name, GgmlType};
use memmap2::Mmap;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;

/// Errors reading a GGUF file. Messages name the file and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a GGUF file (magic bytes {found:?}, expected \"GGUF\")")]
    BadMagic { path: PathBuf, found: String },
    #[error("{path}: GGUF version {version} is not supported (only 2 and 3)")]
    Version { path: PathBuf, version: u32 },
    #[error("{path}: file is truncated or corrupt: {what}")]
    Truncated { path: PathBuf, what: String },
    #[error("{path}: {what}")]
    Invalid { path: PathBuf, what: String },
    #[error("{path}: tensor '{tensor}' has type {type_name}, which this build does not support")]
    UnsupportedType {
        path: PathBuf,
        tensor: String,
        type_name: String,
    },
    #[error("{path}: metadata key '{key}' is missing")]
    MissingKey { path: PathBuf, key: String },
    #[error("{path}: metadata key '{key}' has type {found}, expected {expected}")]
    KeyType {
        path: PathBuf,
        key: String,
        found: &'static str,
        expected: &'static str,
    },
}

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<MetaValue>),
}

impl MetaValue {
    /// GGUF's name of the value's type.
    pub fn type_name(&self) -> &'static str {
        match self {
            MetaValue::U8(_) => "u8",
            MetaValue::I8(_) => "i8",
            MetaValue::U16(_) => "u16",
            MetaValue::I16(_) => "i16",
            MetaValue::U32(_) => "u32",
            MetaValue::I32(_) => "i32",
            MetaValue::U64(_) => "u64",
            MetaValue::I64(_) => "i64",
            MetaValue::F32(_) => "f32",
            MetaValue::F64(_) => "f64",
            MetaValue::Bool(_) => "bool",
            MetaValue::String(_) => "string",
            MetaValue::Array(_) => "array",
        }
    }

    /// The value as a signed integer, for any integer type.
    pub fn as_i64(&self) -> Option<i64> {
        Some(match *self {
            MetaValue::U8(v) => v as i64,
            MetaValue::I8(v) => v as i64,
            MetaValue::U16(v) => v as i64,
            MetaValue::I16(v) => v as i64,
            MetaValue::U32(v) => v as i64,
            MetaValue::I32(v) => v as i64,
            MetaValue::U64(v) => i64::try_from(v).ok()?,
            MetaValue::I64(v) => v,
            _ => return None,
        })
    }

    /// The value as a float, for float types.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v as f64),
            MetaValue::F64(v) => Some(v),
            _ => None,
        }
    }
}

impl fmt::Display for MetaValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetaValue::String(s) => write!(f, "{s:?}"),
            MetaValue::Array(a) => write!(f, "[{} items]", a.len()),
            MetaValue::Bool(b) => write!(f, "{b}"),
            MetaValue::F32(v) => write!(f, "{v}"),
            MetaValue::F64(v) => write!(f, "{v}"),
            other => write!(f, "{}", other.as_i64().unwrap_or_default()),
        }
    }
}

/// A tensor's entry in the directory.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the contiguous (innermost) dimension.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Byte offset from the start of the data section.
    pub offset: u64,
    /// Size in bytes.
    pub size: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// An open GGUF file.
pub struct Gguf {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, MetaValue>,
    pub tensors: Vec<TensorInfo>,
    index: BTreeMap<String, usize>,
    data_offset: usize,
    mmap: Mmap,
}

impl fmt::Debug for Gguf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gguf")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn truncated(&self, what: &str) -> GgufError {
        GgufError::Truncated {
            path: self.path.to_path_buf(),
            what: format!(
                "{what} at byte {} runs past the end ({} bytes)",
                self.pos,
                self.buf.len()
            ),
        }
    }

    fn bytes(&mut self, n: usize, what: &str) -> Result<&'a [u8], GgufError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(self.truncated(what)),
        }
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let b = self.bytes(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(b);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A length or count, bounded so that a corrupt value cannot trigger a huge allocation: each counted
    /// item takes at least `min_item_bytes` bytes of the file.
    fn count(&mut self, what: &str, min_item_bytes: usize) -> Result<usize, GgufError> {
        let n = self.u64(what)?;
        let remaining = (self.buf.len() - self.pos) as u64;
        if n.saturating_mul(min_item_bytes.max(1) as u64) > remaining {
            return Err(GgufError::Truncated {
                path: self.path.to_path_buf(),
                what: format!("{what} = {n} does not fit in the rest of the file"),
            });
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let n = self.count(what, 1)?;
        let b = self.bytes(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| GgufError::Invalid {
            path: self.path.to_path_buf(),
            what: format!("{what} is not valid UTF-8"),
        })
    }

    fn value(&mut self, ty: u32, key: &str, depth: u32) -> Result<MetaValue, GgufError> {
        let w = key;
        Ok(match ty {
            0 => MetaValue::U8(self.array::<1>(w)?[0]),
            1 => MetaValue::I8(self.array::<1>(w)?[0] as i8),
            2 => MetaValue::U16(u16::from_le_bytes(self.array(w)?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array(w)?)),
            4 => MetaValue::U32(u32::from_le_bytes(self.array(w)?)),
            5 => MetaValue::I32(i32::from_le_bytes(self.array(w)?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array(w)?)),
            7 => MetaValue::Bool(self.array::<1>(w)?[0] != 0),
            8 => MetaValue::String(self.string(w)?),
            9 => {
                if depth > 0 {
                    return Err(GgufError::Invalid {
                        path: self.path.to_path_buf(),
                        what: format!(
                            "metadata key '{key}' nests arrays, which GGUF does not allow"
                        ),
                    });
                }
                let elem_ty = self.u32(w)?;
                let min = match elem_ty {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    _ => 8,
                };
                let n = self.count(w, min)?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(elem_ty, key, depth + 1)?);
                }
                MetaValue::Array(v)
            }
            10 => MetaValue::U64(u64::from_le_bytes(self.array(w)?)),
            11 => MetaValue::I64(i64::from_le_bytes(self.array(w)?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array(w)?)),
            other => {
                return Err(GgufError::Invalid {
                    path: self.path.to_path_buf(),
                    what: format!("metadata key '{key}' has unknown value type {other}"),
                })
            }
        })
    }
}

impl Gguf {
    /// Opens and maps a GGUF file, reading its metadata and tensor directory.
    pub fn open(path: impl AsRef<Path>) -> Result<Gguf, GgufError> {
        let path = path.as_ref().to_path_buf();
        let io = |source| GgufError::Io {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(io)?;
        if file.metadata().map_err(io)?.is_dir() {
            return Err(GgufError::Invalid {
                path,
                what: "is a directory, not a GGUF file".into(),
            });
        }
        // SAFETY: the map is read-only and private to this process; the model file is not expected to be
        // modified while it is open (the same assumption every mmap-based model loader makes).
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        Self::parse(path, mmap)
    }

    /// Reads a GGUF file held in memory (copied into an anonymous map); `name` stands for its path
    /// in errors. For files that arrive by other means than the file system, and for the fuzzer.
    pub fn from_bytes(name: impl Into<PathBuf>, bytes: &[u8]) -> Result<Gguf, GgufError> {
        let path = name.into();
        if bytes.len() < 4 || &bytes[..4] != MAGIC {
            let found = String::from_utf8_lossy(&bytes[..bytes.len().min(4)]).into_owned();
            return Err(GgufError::BadMagic { path, found });
        }
        let io = |source| GgufError::Io {
            path: path.clone(),
            source,
        };
        let mut map = memmap2::MmapMut::map_anon(bytes.len()).map_err(io)?;
        map.copy_from_slice(bytes);
        let mmap = map.make_read_only().map_err(io)?;
        Self::parse(path, mmap)
    }

    fn parse(path: PathBuf, mmap: Mmap) -> Result<Gguf, GgufError> {
        let buf: &[u8] = &mmap;
        if buf.len() < 4 || &buf[..4] != MAGIC {
            let found = String::from_utf8_lossy(&buf[..buf.len().min(4)]).into_owned();
            return Err(GgufError::BadMagic { path, found });
        }
        let mut c = Cursor {
            buf,
            pos: 4,
            path: &path,
        };
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::Version { path, version });
        }
        let n_tensors = c.count("tensor count", 8)?;
        let n_kv = c.count("metadata count", 8)?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string("metadata key")?;
            let ty = c.u32("metadata value type")?;
            let v = c.value(ty, &key, 0)?;
            metadata.insert(key, v);
        }
        let mut raw = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = c.string("tensor name")?;
            let n_dims = c.u32("tensor dimension count")?;
            if n_dims == 0 || n_dims > 4 {
                return Err(GgufError::Invalid {
                    path: path.clone(),
                    what: format!("tensor '{name}' has {n_dims} dimensions (1 to 4 allowed)"),
                });
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(c.u64("tensor dimension")?);
            }
            let ty = c.u32("tensor type")?;
            let offset = c.u64("tensor offset")?;
            raw.push((name, dims, ty, offset));
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_i64() {
                Some(a) if a > 0 && (a as u64).is_power_of_two() => a as u64,
                _ => {
                    return Err(GgufError::Invalid {
                        path,
                        what: format!("general.alignment = {v} is not a power of two"),
                    })
                }
            },
        };
        let data_offset = (c.pos as u64).div_ceil(alignment) * alignment;
        let data_len = (buf.len() as u64).saturating_sub(data_offset);

        let mut tensors = Vec::with_capacity(raw.len());
        let mut index = BTreeMap::new();
        for (name, dims, ty_id, offset) in raw {
            let ty = GgmlType::from_id(ty_id).ok_or_else(|| GgufError::UnsupportedType {
                path: path.clone(),
                tensor: name.clone(),
                type_name: ggml_type_name(ty_id),
            })?;
            let n: u64 = dims
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .ok_or_else(|| GgufError::Invalid {
                    path: path.clone(),
                    what: format!("tensor '{name}' has an overflowing shape {dims:?}"),
                })?;
            let bs = ty.block_size() as u64;
            if !dims[0].is_multiple_of(bs) {
                return Err(GgufError::Invalid {
                    path: path.clone(),
                    what: format!(
                        "tensor '{name}' row length {} is not a multiple of the {} block size {bs}",
                        dims[0],
                        ty.name()
                    ),
                });
            }
            let size =
                (n / bs)
                    .checked_mul(ty.type_size() as u64)
                    .ok_or_else(|| GgufError::Invalid {
                        path: path.clone(),
                        what: format!("tensor '{name}' has an overflowing size {dims:?}"),
                    })?;
            if offset.checked_add(size).is_none_or(|end| end > data_len) {
                return Err(GgufError::Truncated {
                    path: path.clone(),
                    what: format!(
                        "tensor '{name}' ({size} bytes at data offset {offset}) lies beyond the end of the file"
                    ),
                });
            }
            if index.insert(name.clone(), tensors.len()).is_some() {
                return Err(GgufError::Invalid {
                    path: path.clone(),
                    what: format!("tensor '{name}' appears twice"),
                });
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                offset,
                size,
            });
        }
        Ok(Gguf {
            path,
            version,
            metadata,
            tensors,
            index,
            data_offset: data_offset as usize,
            mmap,
        })
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    fn require(&self, key: &str) -> Result<&MetaValue, GgufError> {
        self.get(key).ok_or_else(|| GgufError::MissingKey {
            path: self.path.clone(),
            key: key.to_string(),
        })
    }

    fn key_type(&self, key: &str, found: &MetaValue, expected: &'static str) -> GgufError {
        GgufError::KeyType {
            path: self.path.clone(),
            key: key.to_string(),
            found: found.type_name(),
            expected,
        }
    }

    /// A string value.
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        match self.require(key)? {
            MetaValue::String(s) => Ok(s),
            v => Err(self.key_type(key, v, "string")),
        }
    }

    /// An integer value of any integer type that fits in u32.
    pub fn get_u32(&self, key: &str) -> Result<u32, GgufError> {
        let v = self.require(key)?;
        v.as_i64()
            .and_then(|i| u32::try_from(i).ok())
            .ok_or_else(|| self.key_type(key, v, "u32"))
    }

    /// A float value (f32 or f64).
    pub fn get_f32(&self, key: &str) -> Result<f32, GgufError> {
        let v = self.require(key)?;
        v.as_f64()
            .map(|f| f as f32)
            .ok_or_else(|| self.key_type(key, v, "f32"))
    }

    /// A bool value.
    pub fn get_bool(&self, key: &str) -> Result<bool, GgufError> {
        match self.require(key)? {
            MetaValue::Bool(b) => Ok(*b),
            v => Err(self.key_type(key, v, "bool")),
        }
    }

    fn get_array(&self, key: &str) -> Result<&[MetaValue], GgufError> {
        match self.require(key)? {
            MetaValue::Array(a) => Ok(a),
            v => Err(self.key_type(key, v, "array")),
        }
    }

    /// An array of strings.
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        self.get_array(key)?
            .iter()
            .map(|v| match v {
                MetaValue::String(s) => Ok(s.as_str()),
                v => Err(self.key_type(key, v, "array of string")),
            })
            .collect()
    }

    /// An array of integers that fit in i32.
    pub fn get_i32_array(&self, key: &str) -> Result<Vec<i32>, GgufError> {
        self.get_array(key)?
            .iter()
            .map(|v| {
                v.as_i64()
                    .and_then(|i| i32::try_from(i).ok())
                    .ok_or_else(|| self.key_type(key, v, "array of i32"))
            })
            .collect()
    }

    /// A tensor's directory entry.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// A tensor's bytes, borrowed from the map (bounds were checked at open).
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        let start = self.data_offset + t.offset as usize;
        &self.mmap[start..start + t.size as usize]
    }

    /// The tensor data section (tensor offsets are relative to its start).
    pub fn data_section(&self) -> &[u8] {
        &self.mmap[self.data_offset.min(self.mmap.len())..]
    }

    /// Total size of the file in bytes.
    pub fn file_len(&self) -> usize {
        self.mmap.len()
    }
}

/// Writes GGUF v3 files: used by tests to build tiny models, and by tools that rewrite metadata.
pub mod writer {
    use super::MetaValue;
    use ep_kernels::GgmlType;

    /// One tensor to write: ggml-order dims, ggml type id and raw bytes in that type.
    pub struct TensorOut {
        pub name: String,
        pub dims: Vec<u64>,
        pub type_id: u32,
        pub data: Vec<u8>,
    }

    impl TensorOut {
        pub fn new(name: impl Into<String>, dims: Vec<u64>, ty: GgmlType, data: Vec<u8>) -> Self {
            Self {
                name: name.into(),
                dims,
                type_id: ty.id(),
                data,
            }
        }
    }

    fn put_str(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    fn type_id(v: &MetaValue) -> u32 {
        match v {
            MetaValue::U8(_) => 0,
            MetaValue::I8(_) => 1,
            MetaValue::U16(_) => 2,
            MetaValue::I16(_) => 3,
            MetaValue::U32(_) => 4,
            MetaValue::I32(_) => 5,
            MetaValue::F32(_) => 6,
            MetaValue::Bool(_) => 7,
            MetaValue::String(_) => 8,
            MetaValue::Array(_) => 9,
            MetaValue::U64(_) => 10,
            MetaValue::I64(_) => 11,
            MetaValue::F64(_) => 12,
        }
    }

    fn put_value(out: &mut Vec<u8>, v: &MetaValue) {
        match v {
            MetaValue::U8(x) => out.push(*x),
            MetaValue::I8(x) => out.push(*x as u8),
            MetaValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::Bool(x) => out.push(*x as u8),
            MetaValue::String(s) => put_str(out, s),
            MetaValue::Array(a) => {
                let elem = a.first().map(type_id).unwrap_or(4);
                out.extend_from_slice(&elem.to_le_bytes());
                out.extend_from_slice(&(a.len() as u64).to_le_bytes());
                for x in a {
                    put_value(out, x);
                }
            }
        }
    }

    /// Serialises metadata and tensors to GGUF v3 bytes (alignment 32).
    pub fn to_bytes(metadata: &[(String, MetaValue)], tensors: &[TensorOut]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for (k, v) in metadata {
            put_str(&mut out, k);
            out.extend_from_slice(&type_id(v).to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offset = 0u64;
        let mut offsets = Vec::with_capacity(tensors.len());
        for t in tensors {
            put_str(&mut out, &t.name);
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.type_id.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offsets.push(offset);
            offset = (offset + t.data.len() as u64).div_ceil(32) * 32;
        }
        while !out.len().is_multiple_of(32) {
            out.push(0);
        }
        let base = out.len();
        for (t, off) in tensors.iter().zip(offsets) {
            out.resize(base + off as usize, 0);
            out.extend_from_slice(&t.data);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::writer::{to_bytes, TensorOut};
    use super::*;

    fn write(bytes: &[u8]) -> tempfile::NamedTempFile {
        use std::io::Write;
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    fn sample() -> Vec<u8> {
        let meta = vec![
            (
                "general.architecture".to_string(),
                MetaValue::String("llama".into()),
            ),
            ("llama.block_count".to_string(), MetaValue::U32(2)),
            ("x.f".to_string(), MetaValue::F32(0.5)),
            (
                "x.arr".to_string(),
                MetaValue::Array(vec![
                    MetaValue::String("a".into()),
                    MetaValue::String("bc".into()),
                ]),
            ),
        ];
        let data: Vec<u8> = (0..4 * 8).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let t = vec![
            TensorOut::new("w", vec![8, 4], GgmlType::F32, data),
            TensorOut::new("b", vec![3], GgmlType::F32, vec![0; 12]),
        ];
        to_bytes(&meta, &t)
    }

    #[test]
    fn round_trip() {
        let f = write(&sample());
        let g = Gguf::open(f.path()).unwrap();
        assert_eq!(g.version, 3);
        assert_eq!(g.get_str("general.architecture").unwrap(), "llama");
        assert_eq!(g.get_u32("llama.block_count").unwrap(), 2);
        assert_eq!(g.get_f32("x.f").unwrap(), 0.5);
        assert_eq!(g.get_str_array("x.arr").unwrap(), vec!["a", "bc"]);
        let w = g.tensor("w").unwrap();
        assert_eq!(w.dims, vec![8, 4]);
        let d = g.tensor_data(w);
        assert_eq!(
            f32::from_le_bytes(d[4 * 9..4 * 10].try_into().unwrap()),
            9.0
        );
        assert_eq!(g.tensor("b").unwrap().offset % 32, 0);
        assert!(matches!(g.get_u32("x.f"), Err(GgufError::KeyType { .. })));
        assert!(matches!(
            g.get_str("nope"),
            Err(GgufError::MissingKey { .. })
        ));
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let bytes = sample();
        for cut in 0..bytes.len() {
            let f = write(&bytes[..cut]);
            let r = Gguf::open(f.path());
            assert!(r.is_err(), "cut at {cut} of {} parsed", bytes.len());
        }
    }

    #[test]
    fn bad_magic_and_version() {
        let mut b = sample();
        b[0] = b'X';
        let e = Gguf::open(write(&b).path()).unwrap_err().to_string();
        assert!(e.contains("not a GGUF file"), "{e}");
        let mut b = sample();
        b[4..8].copy_from_slice(&7u32.to_le_bytes());
        let e = Gguf::open(write(&b).path()).unwrap_err().to_string();
        assert!(e.contains("version 7"), "{e}");
    }

    #[test]
    fn unknown_tensor_type_is_named() {
        let mut b = sample();
        // The first tensor's type id follows its name, n_dims and two dims; patch it to q2_K (10), a
        // type this build does not support.
        let pat = {
            let mut p = Vec::new();
            p.extend_from_slice(&1u64.to_le_bytes());
            p.extend_from_slice(b"w");
            p.extend_from_slice(&2u32.to_le_bytes());
            p.extend_from_slice(&8u64.to_le_bytes());
            p.extend_from_slice(&4u64.to_le_bytes());
            p
        };
        let at = b
            .windows(pat.len())
            .position(|w| w == pat.as_slice())
            .unwrap()
            + pat.len();
        b[at..at + 4].copy_from_slice(&10u32.to_le_bytes());
        let e = Gguf::open(write(&b).path()).unwrap_err().to_string();
        assert!(e.contains("tensor 'w' has type q2_K"), "{e}");
    }

    #[test]
    fn kquant_tensors_open_with_256_element_blocks() {
        let t = |ty: GgmlType, cols: u64, bytes: usize| {
            vec![TensorOut::new("w", vec![cols, 2], ty, vec![0; bytes])]
        };
        for (ty, bs) in [
            (GgmlType::Q4_K, 144),
            (GgmlType::Q5_K, 176),
            (GgmlType::Q6_K, 210),
        ] {
            let g = Gguf::open(write(&to_bytes(&[], &t(ty, 512, 4 * bs))).path()).unwrap();
            let w = g.tensor("w").unwrap();
            assert_eq!((w.ty, w.size), (ty, 4 * bs as u64));
            // A row of 288 elements is not a whole number of super-blocks.
            let e = Gguf::open(write(&to_bytes(&[], &t(ty, 288, 2 * bs))).path());
            assert!(e.is_err(), "{ty:?}");
        }
    }

    #[test]
    fn missing_file_is_named() {
        let e = Gguf::open("/nonexistent/model.gguf")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/model.gguf"), "{e}");
    }
}
