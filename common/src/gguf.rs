//! A bounded reader for the header of a GGUF model file: metadata and tensor directory.
//!
//! Follows the GGUF specification (ggml's `docs/gguf.md`, versions 2 and 3, little-endian):
//!
//! ```text
//! magic "GGUF" | version u32 | tensor_count u64 | metadata_kv_count u64
//! metadata_kv_count × (key: string, value_type: u32, value)
//! tensor_count × (name: string, n_dims: u32, dims: n_dims × u64, ggml_type: u32, offset: u64)
//! padding to `general.alignment` (default 32) | tensor data
//! string = length u64 + UTF-8 bytes (no terminator)
//! ```
//!
//! It exists so that a device refuses a broken, truncated or foreign file with a clear error
//! *before* llama.cpp parses it: every length is checked against the bytes that remain, no
//! allocation is sized by an untrusted count, and [`GgufInfo::check_len`] proves that every
//! tensor's data lies inside the file (a truncated download fails there). Large arrays (the
//! tokenizer's vocabulary) are walked, not kept: [`MetaValue::Array`] records their element type
//! and length only.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;

/// Longest string value kept in [`GgufInfo::metadata`] (chat templates are a few KiB); longer
/// ones are walked and kept as [`MetaValue::Skipped`].
const MAX_KEPT_STRING: u64 = 1 << 20;
/// Most dimensions a tensor may have (`GGML_MAX_DIMS`).
const MAX_DIMS: u32 = 4;

/// Why a file is not a GGUF model this reader accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("GGUF at byte {offset}: expected {expected}, found {found}")]
pub struct GgufError {
    /// Byte offset in the file where the problem is.
    pub offset: u64,
    /// What the format requires there.
    pub expected: String,
    /// What the file has.
    pub found: String,
}

/// One metadata value. Arrays are summarised, not kept.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum MetaValue {
    /// An unsigned integer (`UINT8`, `UINT16`, `UINT32`, `UINT64`).
    Uint(u64),
    /// A signed integer (`INT8` … `INT64`).
    Int(i64),
    /// A float (`FLOAT32`, `FLOAT64`).
    Float(f64),
    /// `BOOL`.
    Bool(bool),
    /// `STRING` (invalid UTF-8 replaced).
    String(String),
    /// A string longer than 1 MiB: its length only.
    Skipped(u64),
    /// `ARRAY`: element type code and length.
    Array {
        /// GGUF value type code of the elements.
        element_type: u32,
        /// Number of elements.
        len: u64,
    },
}

/// One tensor's entry in the directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Tensor name (`blk.0.attn_q.weight`, …).
    pub name: String,
    /// Dimensions, innermost first (`ne[0]` …).
    pub dims: Vec<u64>,
    /// `ggml_type` code.
    pub ggml_type: u32,
    /// Offset of the data from the start of the data section, bytes.
    pub offset: u64,
    /// Size of the data, bytes.
    pub nbytes: u64,
}

/// The header of a GGUF file.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufInfo {
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata by key.
    pub metadata: BTreeMap<String, MetaValue>,
    /// The tensor directory, in file order.
    pub tensors: Vec<TensorInfo>,
    /// Alignment of the data section and of each tensor, bytes.
    pub alignment: u64,
    /// Byte offset of the data section in the file.
    pub data_offset: u64,
}

/// `(block size in elements, bytes per block)` of a `ggml_type` (ggml's `type_traits`,
/// sizes from `ggml-common.h`), or `None` for a code this reader does not know.
pub fn ggml_type_layout(ggml_type: u32) -> Option<(u64, u64)> {
    Some(match ggml_type {
        0 => (1, 4),     // F32
        1 => (1, 2),     // F16
        2 => (32, 18),   // Q4_0
        3 => (32, 20),   // Q4_1
        6 => (32, 22),   // Q5_0
        7 => (32, 24),   // Q5_1
        8 => (32, 34),   // Q8_0
        9 => (32, 36),   // Q8_1
        10 => (256, 84), // Q2_K
        11 => (256, 110),
        12 => (256, 144),
        13 => (256, 176),
        14 => (256, 210),
        15 => (256, 292),
        16 => (256, 66), // IQ2_XXS
        17 => (256, 74),
        18 => (256, 98),
        19 => (256, 50),
        20 => (32, 18), // IQ4_NL
        21 => (256, 110),
        22 => (256, 82),
        23 => (256, 136),
        24 => (1, 1), // I8
        25 => (1, 2),
        26 => (1, 4),
        27 => (1, 8),
        28 => (1, 8),    // F64
        29 => (256, 56), // IQ1_M
        30 => (1, 2),    // BF16
        34 => (256, 54), // TQ1_0
        35 => (256, 66), // TQ2_0
        39 => (32, 17),  // MXFP4
        40 => (64, 36),  // NVFP4
        41 => (128, 18), // Q1_0
        42 => (64, 18),  // Q2_0
        _ => return None,
    })
}

/// The name llama.cpp gives a `general.file_type` (`llama_ftype`), e.g. `Q4_1`.
pub fn file_type_name(file_type: u64) -> Option<&'static str> {
    Some(match file_type {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        19 => "IQ2_XXS",
        20 => "IQ2_XS",
        21 => "Q2_K_S",
        22 => "IQ3_XS",
        23 => "IQ3_XXS",
        24 => "IQ1_S",
        25 => "IQ4_NL",
        26 => "IQ3_S",
        27 => "IQ3_M",
        28 => "IQ2_S",
        29 => "IQ2_M",
        30 => "IQ4_XS",
        31 => "IQ1_M",
        32 => "BF16",
        36 => "TQ1_0",
        37 => "TQ2_0",
        38 => "MXFP4_MOE",
        _ => return None,
    })
}

struct Reader<R> {
    inner: R,
    pos: u64,
    len: u64,
}

impl<R: Read> Reader<R> {
    fn err(&self, expected: impl Into<String>, found: impl Into<String>) -> GgufError {
        GgufError {
            offset: self.pos,
            expected: expected.into(),
            found: found.into(),
        }
    }

    fn remaining(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    fn bytes<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let mut b = [0u8; N];
        if self.remaining() < N as u64 {
            return Err(self.err(
                format!("{N} bytes of {what}"),
                format!("the end of the file ({} bytes left)", self.remaining()),
            ));
        }
        self.inner
            .read_exact(&mut b)
            .map_err(|e| self.err(format!("{N} bytes of {what}"), format!("a read error: {e}")))?;
        self.pos += N as u64;
        Ok(b)
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        self.bytes::<4>(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        self.bytes::<8>(what).map(u64::from_le_bytes)
    }

    /// Skips `n` bytes (already checked to be there).
    fn skip(&mut self, n: u64, what: &str) -> Result<(), GgufError> {
        let copied = std::io::copy(&mut (&mut self.inner).take(n), &mut std::io::sink())
            .map_err(|e| self.err(format!("{n} bytes of {what}"), format!("a read error: {e}")))?;
        if copied != n {
            return Err(self.err(
                format!("{n} bytes of {what}"),
                format!("the end of the file after {copied}"),
            ));
        }
        self.pos += n;
        Ok(())
    }

    /// A string's length, checked against what remains.
    fn string_len(&mut self, what: &str) -> Result<u64, GgufError> {
        let n = self.u64(what)?;
        if n > self.remaining() {
            return Err(self.err(
                format!("a {what} of at most the {} bytes left", self.remaining()),
                format!("a length of {n}"),
            ));
        }
        Ok(n)
    }

    fn string(&mut self, what: &str, keep_up_to: u64) -> Result<Result<String, u64>, GgufError> {
        let n = self.string_len(what)?;
        if n > keep_up_to {
            self.skip(n, what)?;
            return Ok(Err(n));
        }
        let mut buf = vec![0u8; usize::try_from(n).unwrap_or(usize::MAX)];
        self.inner
            .read_exact(&mut buf)
            .map_err(|e| self.err(format!("{n} bytes of {what}"), format!("a read error: {e}")))?;
        self.pos += n;
        Ok(Ok(String::from_utf8_lossy(&buf).into_owned()))
    }

    /// Size in bytes of a scalar value type, `None` for STRING and ARRAY.
    fn scalar_size(value_type: u32) -> Option<u64> {
        match value_type {
            0 | 1 | 7 => Some(1),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            _ => None,
        }
    }

    fn value(&mut self, value_type: u32, key: &str) -> Result<MetaValue, GgufError> {
        Ok(match value_type {
            0 => MetaValue::Uint(u64::from(self.bytes::<1>(key)?[0])),
            1 => MetaValue::Int(i64::from(i8::from_le_bytes(self.bytes::<1>(key)?))),
            2 => MetaValue::Uint(u64::from(u16::from_le_bytes(self.bytes::<2>(key)?))),
            3 => MetaValue::Int(i64::from(i16::from_le_bytes(self.bytes::<2>(key)?))),
            4 => MetaValue::Uint(u64::from(self.u32(key)?)),
            5 => MetaValue::Int(i64::from(i32::from_le_bytes(self.bytes::<4>(key)?))),
            6 => MetaValue::Float(f64::from(f32::from_le_bytes(self.bytes::<4>(key)?))),
            7 => {
                let b = self.bytes::<1>(key)?[0];
                if b > 1 {
                    return Err(self.err(format!("a BOOL (0 or 1) for `{key}`"), format!("{b}")));
                }
                MetaValue::Bool(b == 1)
            }
            8 => match self.string(key, MAX_KEPT_STRING)? {
                Ok(s) => MetaValue::String(s),
                Err(n) => MetaValue::Skipped(n),
            },
            9 => {
                let element_type = self.u32(key)?;
                let len = self.u64(key)?;
                self.walk_array(element_type, len, key, true)?;
                MetaValue::Array { element_type, len }
            }
            _ => {
                return Err(self.err(
                    format!("a GGUF value type (0..=12) for `{key}`"),
                    format!("{value_type}"),
                ));
            }
        })
    }

    /// Walks the `len` elements of an array of `element_type` (its header read), checking every
    /// length against what remains. Arrays nest one level deep at most (`nested_ok`).
    fn walk_array(
        &mut self,
        element_type: u32,
        len: u64,
        key: &str,
        nested_ok: bool,
    ) -> Result<(), GgufError> {
        let too_long = |r: &Self, found: String| {
            r.err(
                format!(
                    "an array of `{key}` within the {} bytes left",
                    r.remaining()
                ),
                found,
            )
        };
        if let Some(size) = Self::scalar_size(element_type) {
            let Some(total) = len.checked_mul(size).filter(|&t| t <= self.remaining()) else {
                return Err(too_long(self, format!("{len} elements of {size} bytes")));
            };
            return self.skip(total, key);
        }
        if element_type != 8 && !(element_type == 9 && nested_ok) {
            return Err(self.err(
                format!(
                    "a GGUF value type (0..=12, arrays one level deep) for the elements of `{key}`"
                ),
                format!("{element_type}"),
            ));
        }
        // Each element takes at least 8 bytes: refuse impossible counts up front.
        if len > self.remaining() / 8 {
            return Err(too_long(self, format!("{len} elements")));
        }
        for _ in 0..len {
            if element_type == 8 {
                let n = self.string_len(key)?;
                self.skip(n, key)?;
            } else {
                let inner = self.u32(key)?;
                let inner_len = self.u64(key)?;
                self.walk_array(inner, inner_len, key, false)?;
            }
        }
        Ok(())
    }
}

/// Reads the header of a GGUF file of `len` bytes from `input` (positioned at its start).
///
/// Reads up to the end of the tensor directory, never the tensor data.
///
/// # Errors
/// [`GgufError`] with the byte offset, what was expected and what was found: not GGUF, an
/// unsupported version, a length past the end of the file, an unknown value or tensor type, a
/// tensor whose size overflows or whose offset is not aligned.
pub fn read_header<R: Read>(input: R, len: u64) -> Result<GgufInfo, GgufError> {
    let mut r = Reader {
        inner: input,
        pos: 0,
        len,
    };
    let magic = r.bytes::<4>("the magic")?;
    if &magic != b"GGUF" {
        return Err(GgufError {
            offset: 0,
            expected: "the magic \"GGUF\" (a GGUF model file)".into(),
            found: format!("{magic:02x?}"),
        });
    }
    let version = r.u32("the version")?;
    if !(2..=3).contains(&version) {
        return Err(GgufError {
            offset: 4,
            expected: "GGUF version 2 or 3".into(),
            found: format!("version {version}"),
        });
    }
    let tensor_count = r.u64("the tensor count")?;
    let kv_count = r.u64("the metadata count")?;
    // A key-value pair takes at least 13 bytes, a tensor entry at least 24.
    if kv_count > r.remaining() / 13 || tensor_count > r.remaining() / 24 {
        return Err(r.err(
            format!("counts that fit in the {} bytes left", r.remaining()),
            format!("{kv_count} metadata entries and {tensor_count} tensors"),
        ));
    }
    let mut metadata = BTreeMap::new();
    for _ in 0..kv_count {
        let key = match r.string("a metadata key", 65_536)? {
            Ok(k) => k,
            Err(n) => return Err(r.err("a metadata key of at most 64 KiB", format!("{n} bytes"))),
        };
        let value_type = r.u32(&key)?;
        let value = r.value(value_type, &key)?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(r.err("each metadata key once", format!("`{key}` again")));
        }
    }
    let alignment = match metadata.get("general.alignment") {
        None => 32,
        Some(MetaValue::Uint(a)) if *a > 0 && a.is_power_of_two() && *a <= 1 << 20 => *a,
        Some(other) => {
            return Err(r.err(
                "`general.alignment` a power of two up to 1 MiB",
                format!("{other:?}"),
            ));
        }
    };
    let mut tensors = Vec::with_capacity(usize::try_from(tensor_count.min(4096)).unwrap_or(0));
    for _ in 0..tensor_count {
        let name = match r.string("a tensor name", 4096)? {
            Ok(n) => n,
            Err(n) => return Err(r.err("a tensor name of at most 4 KiB", format!("{n} bytes"))),
        };
        let n_dims = r.u32(&name)?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(r.err(
                format!("1 to {MAX_DIMS} dimensions for tensor `{name}`"),
                format!("{n_dims}"),
            ));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(r.u64(&name)?);
        }
        let ggml_type = r.u32(&name)?;
        let Some((block, type_size)) = ggml_type_layout(ggml_type) else {
            return Err(r.err(
                format!("a ggml tensor type this follower knows for `{name}`"),
                format!("type {ggml_type}"),
            ));
        };
        if dims[0] % block != 0 {
            return Err(r.err(
                format!("a first dimension of `{name}` divisible by its block size {block}"),
                format!("{}", dims[0]),
            ));
        }
        let nbytes = dims[1..]
            .iter()
            .try_fold((dims[0] / block).checked_mul(type_size), |acc, &d| {
                Some(acc?.checked_mul(d))
            })
            .flatten()
            .filter(|&n| n <= len);
        let Some(nbytes) = nbytes else {
            return Err(r.err(
                format!("a size for `{name}` within the file's {len} bytes"),
                format!("dimensions {dims:?} of type {ggml_type}"),
            ));
        };
        let offset = r.u64(&name)?;
        if offset % alignment != 0 {
            return Err(r.err(
                format!("the data offset of `{name}` aligned to {alignment} bytes"),
                format!("{offset}"),
            ));
        }
        tensors.push(TensorInfo {
            name,
            dims,
            ggml_type,
            offset,
            nbytes,
        });
    }
    let data_offset = r.pos.next_multiple_of(alignment);
    Ok(GgufInfo {
        version,
        metadata,
        tensors,
        alignment,
        data_offset,
    })
}

/// Reads the header of the GGUF file at `path` and checks that every tensor's data lies inside
/// the file.
///
/// # Errors
/// The file cannot be opened or read, or a [`GgufError`] as text.
pub fn read_file(path: &std::path::Path) -> Result<GgufInfo, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let meta = file.metadata().map_err(|e| format!("cannot stat: {e}"))?;
    if !meta.is_file() {
        return Err("expected a regular file".into());
    }
    let info = read_header(std::io::BufReader::new(file), meta.len()).map_err(|e| e.to_string())?;
    info.check_len(meta.len()).map_err(|e| e.to_string())?;
    info.check_hyperparameters().map_err(|e| e.to_string())?;
    Ok(info)
}

/// Most transformer blocks llama.cpp accepts (`LLAMA_MAX_LAYERS`; more aborts it).
pub const MAX_BLOCK_COUNT: u64 = 512;
/// Largest training context accepted, tokens (2^24; published models stay far below).
pub const MAX_CONTEXT_LENGTH: u64 = 1 << 24;
/// Largest embedding length accepted.
pub const MAX_EMBEDDING_LENGTH: u64 = 1 << 20;
/// Most experts llama.cpp accepts (`LLAMA_MAX_EXPERTS`).
pub const MAX_EXPERTS: u64 = 512;

impl GgufInfo {
    /// Checks that the data section holds every tensor in a file of `file_len` bytes.
    ///
    /// # Errors
    /// The first tensor whose data ends past the end of the file (a truncated file).
    pub fn check_len(&self, file_len: u64) -> Result<(), GgufError> {
        for t in &self.tensors {
            let end = self
                .data_offset
                .checked_add(t.offset)
                .and_then(|s| s.checked_add(t.nbytes));
            if end.is_none_or(|e| e > file_len) {
                return Err(GgufError {
                    offset: file_len,
                    expected: format!(
                        "the data of tensor `{}` ({} bytes at {}) inside the file",
                        t.name,
                        t.nbytes,
                        self.data_offset.saturating_add(t.offset)
                    ),
                    found: format!("a file of {file_len} bytes (truncated?)"),
                });
            }
        }
        Ok(())
    }

    /// Checks the architecture's hyperparameters against what llama.cpp asserts on (it
    /// aborts the whole process, or our arithmetic overflows, on values such as a
    /// `block_count` of 1000 or a `context_length` of 2^32 − 1 — found by patching a real
    /// model): block count 1..=[`MAX_BLOCK_COUNT`] and equal to the blocks the tensor
    /// directory holds (`blk.N.*`), context length 1..=[`MAX_CONTEXT_LENGTH`], embedding
    /// length 1..=[`MAX_EMBEDDING_LENGTH`], head counts positive with the KV heads dividing
    /// the heads, experts at most [`MAX_EXPERTS`] and used experts at most the experts. Keys a
    /// file does not have are not checked (llama.cpp refuses a model that needs them).
    ///
    /// # Errors
    /// The first value out of range, naming its key.
    pub fn check_hyperparameters(&self) -> Result<(), GgufError> {
        let Some(arch) = self.architecture() else {
            return Ok(());
        };
        let bad = |suffix: &str, expected: String, found: String| GgufError {
            offset: 0,
            expected: format!("`{arch}.{suffix}` {expected}"),
            found,
        };
        let range = |suffix: &str, lo: u64, hi: u64| -> Result<Option<u64>, GgufError> {
            let key = format!("{arch}.{suffix}");
            match self.metadata.get(&key) {
                None | Some(MetaValue::Array { .. }) => Ok(None),
                Some(MetaValue::Uint(v)) if (lo..=hi).contains(v) => Ok(Some(*v)),
                Some(other) => Err(bad(
                    suffix,
                    format!("from {lo} to {hi}"),
                    format!("{other:?}"),
                )),
            }
        };
        let blocks = range("block_count", 1, MAX_BLOCK_COUNT)?;
        range("context_length", 1, MAX_CONTEXT_LENGTH)?;
        range("embedding_length", 1, MAX_EMBEDDING_LENGTH)?;
        let heads = range("attention.head_count", 1, MAX_EMBEDDING_LENGTH)?;
        let kv_heads = range("attention.head_count_kv", 1, MAX_EMBEDDING_LENGTH)?;
        if let (Some(h), Some(kv)) = (heads, kv_heads)
            && h % kv != 0
        {
            return Err(bad(
                "attention.head_count_kv",
                format!("dividing the {h} attention heads"),
                kv.to_string(),
            ));
        }
        if let Some(experts) = range("expert_count", 0, MAX_EXPERTS)? {
            range("expert_used_count", 0, experts)?;
        }
        if let Some(n) = blocks {
            let indices: BTreeSet<u64> = self
                .tensors
                .iter()
                .filter_map(|t| t.name.strip_prefix("blk.")?.split('.').next()?.parse().ok())
                .collect();
            if let Some(&last) = indices.last()
                && (last + 1 != n)
            {
                return Err(bad(
                    "block_count",
                    "equal to the blocks in the tensor directory".into(),
                    format!("{n}, with tensors for blocks 0 to {last}"),
                ));
            }
        }
        Ok(())
    }

    /// The bytes a complete file needs: the end of the last tensor's data (0 without tensors).
    pub fn data_end(&self) -> u64 {
        self.tensors
            .iter()
            .map(|t| {
                self.data_offset
                    .saturating_add(t.offset)
                    .saturating_add(t.nbytes)
            })
            .max()
            .unwrap_or(0)
    }

    /// A string metadata value.
    pub fn string(&self, key: &str) -> Option<&str> {
        match self.metadata.get(key)? {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// An unsigned integer metadata value (a signed one that is not negative too).
    pub fn uint(&self, key: &str) -> Option<u64> {
        match self.metadata.get(key)? {
            MetaValue::Uint(v) => Some(*v),
            MetaValue::Int(v) => u64::try_from(*v).ok(),
            _ => None,
        }
    }

    /// `general.architecture` (`llama`, `qwen2`, …).
    pub fn architecture(&self) -> Option<&str> {
        self.string("general.architecture")
    }

    /// An architecture-scoped value, e.g. `arch_uint("context_length")` reads
    /// `llama.context_length`.
    pub fn arch_uint(&self, suffix: &str) -> Option<u64> {
        self.uint(&format!("{}.{suffix}", self.architecture()?))
    }

    /// The quantization from `general.file_type` (`Q4_1`, `Q4_K_M`, …), else the most common
    /// tensor type's code as `type N`.
    pub fn quantization(&self) -> String {
        if let Some(name) = self.uint("general.file_type").and_then(file_type_name) {
            return name.to_owned();
        }
        let mut counts: BTreeMap<u32, u64> = BTreeMap::new();
        for t in &self.tensors {
            *counts.entry(t.ggml_type).or_default() += t.nbytes;
        }
        counts
            .into_iter()
            .max_by_key(|&(_, n)| n)
            .map_or_else(|| "unknown".into(), |(t, _)| format!("type {t}"))
    }

    /// Number of weights (elements over all tensors).
    pub fn parameters(&self) -> u64 {
        self.tensors
            .iter()
            .map(|t| t.dims.iter().product::<u64>())
            .fold(0u64, u64::saturating_add)
    }

    /// Bytes of KV cache (f16 keys and values) for a context of `n_ctx` tokens: block count ×
    /// `n_ctx` × KV heads × (key head width + value head width) × 2 bytes. Head widths are
    /// `attention.key_length` / `attention.value_length` when the model gives them (Gemma 3:
    /// 256, not its embedding length over its heads, 640 / 4 = 160), else embedding length over
    /// heads — as llama.cpp's `llama_hparams` reads them. Sliding-window layers are counted
    /// at the full context (llama.cpp may keep fewer cells there): an upper bound. `None` when
    /// the metadata lacks the counts.
    pub fn kv_cache_bytes(&self, n_ctx: u64) -> Option<u64> {
        let layers = self.arch_uint("block_count")?;
        let embd = self.arch_uint("embedding_length")?;
        let heads = self.arch_uint("attention.head_count")?.max(1);
        let kv_heads = self.arch_uint("attention.head_count_kv").unwrap_or(heads);
        let head_k = self
            .arch_uint("attention.key_length")
            .unwrap_or(embd / heads);
        let head_v = self
            .arch_uint("attention.value_length")
            .unwrap_or(embd / heads);
        layers
            .checked_mul(n_ctx)?
            .checked_mul(kv_heads)?
            .checked_mul(head_k.checked_add(head_v)?)?
            .checked_mul(2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    /// A minimal GGUF v3 file: two metadata entries, one F32 tensor of 8 elements.
    fn tiny(data_bytes: usize) -> Vec<u8> {
        let mut f = b"GGUF".to_vec();
        f.extend_from_slice(&3u32.to_le_bytes());
        f.extend_from_slice(&1u64.to_le_bytes());
        f.extend_from_slice(&4u64.to_le_bytes());
        string(&mut f, "general.architecture");
        f.extend_from_slice(&8u32.to_le_bytes());
        string(&mut f, "llama");
        string(&mut f, "general.file_type");
        f.extend_from_slice(&4u32.to_le_bytes());
        f.extend_from_slice(&3u32.to_le_bytes());
        string(&mut f, "llama.context_length");
        f.extend_from_slice(&4u32.to_le_bytes());
        f.extend_from_slice(&2048u32.to_le_bytes());
        string(&mut f, "tokenizer.ggml.tokens");
        f.extend_from_slice(&9u32.to_le_bytes());
        f.extend_from_slice(&8u32.to_le_bytes());
        f.extend_from_slice(&2u64.to_le_bytes());
        string(&mut f, "<s>");
        string(&mut f, "a");
        string(&mut f, "w");
        f.extend_from_slice(&1u32.to_le_bytes());
        f.extend_from_slice(&8u64.to_le_bytes());
        f.extend_from_slice(&0u32.to_le_bytes());
        f.extend_from_slice(&0u64.to_le_bytes());
        f.resize(f.len().next_multiple_of(32) + data_bytes, 0);
        f
    }

    #[test]
    fn reads_metadata_and_the_tensor_directory() {
        let f = tiny(32);
        let info = read_header(&f[..], f.len() as u64).unwrap();
        assert_eq!(info.version, 3);
        assert_eq!(info.architecture(), Some("llama"));
        assert_eq!(info.quantization(), "Q4_1");
        assert_eq!(info.arch_uint("context_length"), Some(2048));
        assert_eq!(
            info.metadata["tokenizer.ggml.tokens"],
            MetaValue::Array {
                element_type: 8,
                len: 2
            }
        );
        assert_eq!(info.tensors.len(), 1);
        assert_eq!(info.tensors[0].nbytes, 32);
        assert_eq!(info.data_offset % 32, 0);
        assert_eq!(info.data_end(), f.len() as u64);
        info.check_len(f.len() as u64).unwrap();
    }

    #[test]
    fn a_truncated_file_is_refused_naming_the_tensor() {
        let f = tiny(32);
        let short = &f[..f.len() - 1];
        let info = read_header(short, short.len() as u64).unwrap();
        let e = info.check_len(short.len() as u64).unwrap_err().to_string();
        assert!(e.contains("tensor `w`") && e.contains("truncated"), "{e}");
        // Cut inside the header: the reader says where and what it wanted.
        let e = read_header(&f[..40], 40).unwrap_err();
        assert_eq!(e.offset, 24, "{e}");
        assert_eq!(
            e.to_string(),
            "GGUF at byte 24: expected counts that fit in the 16 bytes left, found 4 metadata entries and 1 tensors"
        );
        let e = read_header(&f[..150], 150).unwrap_err();
        assert!(
            e.found.contains("the end of the file") || e.found.contains("a length of"),
            "{e}"
        );
    }

    #[test]
    fn impossible_lengths_and_types_are_refused_without_allocating() {
        let mut f = tiny(32);
        // The tokens array claims 2^60 strings.
        let at = f.windows(8).position(|w| w == 2u64.to_le_bytes()).unwrap();
        f[at..at + 8].copy_from_slice(&(1u64 << 60).to_le_bytes());
        let e = read_header(&f[..], f.len() as u64).unwrap_err();
        assert!(e.found.contains("1152921504606846976 elements"), "{e}");

        let mut f = tiny(32);
        f[4] = 1;
        assert!(
            read_header(&f[..], f.len() as u64)
                .unwrap_err()
                .to_string()
                .contains("GGUF version 2 or 3, found version 1")
        );
        let mut f = tiny(32);
        f[..4].copy_from_slice(b"PK\x03\x04");
        assert!(
            read_header(&f[..], f.len() as u64)
                .unwrap_err()
                .expected
                .contains("magic")
        );
    }

    #[test]
    fn ggml_layouts_match_known_file_sizes() {
        // SmolLM2-135M Q4_1: a 576×49152 token embedding is 49152 rows of 18 blocks of 20 bytes.
        let (block, size) = ggml_type_layout(3).unwrap();
        assert_eq!(576 / block * size * 49152, 17_694_720);
        assert!(ggml_type_layout(4).is_none(), "Q4_2 was removed from ggml");
    }

    fn model(meta: &[(&str, u64)], blocks: u64) -> GgufInfo {
        let mut metadata = BTreeMap::new();
        metadata.insert(
            "general.architecture".to_owned(),
            MetaValue::String("llama".into()),
        );
        for (k, v) in meta {
            metadata.insert(format!("llama.{k}"), MetaValue::Uint(*v));
        }
        let tensors = (0..blocks)
            .map(|b| TensorInfo {
                name: format!("blk.{b}.attn_q.weight"),
                dims: vec![8],
                ggml_type: 0,
                offset: 0,
                nbytes: 32,
            })
            .collect();
        GgufInfo {
            version: 3,
            metadata,
            tensors,
            alignment: 32,
            data_offset: 0,
        }
    }

    #[test]
    fn hyperparameters_llama_cpp_aborts_on_are_refused_before_it_sees_the_file() {
        let good = [
            ("block_count", 30),
            ("context_length", 8192),
            ("embedding_length", 576),
            ("attention.head_count", 9),
            ("attention.head_count_kv", 3),
        ];
        assert_eq!(model(&good, 30).check_hyperparameters(), Ok(()));
        let with = |key: &'static str, v: u64| {
            let mut m = good.to_vec();
            m.retain(|(k, _)| *k != key);
            m.push((key, v));
            m
        };
        for (meta, blocks, key) in [
            (with("block_count", 1000), 30, "block_count"),
            (with("block_count", 1000), 1000, "block_count"),
            (with("block_count", 40), 30, "block_count"),
            (
                with("context_length", u64::from(u32::MAX)),
                30,
                "context_length",
            ),
            (with("context_length", 0), 30, "context_length"),
            (with("attention.head_count", 0), 30, "attention.head_count"),
            (
                with("attention.head_count_kv", 4),
                30,
                "attention.head_count_kv",
            ),
            (with("embedding_length", 1 << 40), 30, "embedding_length"),
        ] {
            let e = model(&meta, blocks).check_hyperparameters().unwrap_err();
            assert!(e.to_string().contains(&format!("`llama.{key}`")), "{e}");
        }
    }

    /// A header's metadata alone, as `(key, value)` pairs.
    fn info_with(arch: &str, kv: &[(&str, u64)]) -> GgufInfo {
        let mut metadata = BTreeMap::new();
        metadata.insert(
            "general.architecture".to_owned(),
            MetaValue::String(arch.to_owned()),
        );
        for (k, v) in kv {
            metadata.insert(format!("{arch}.{k}"), MetaValue::Uint(*v));
        }
        GgufInfo {
            version: 3,
            metadata,
            tensors: Vec::new(),
            alignment: 32,
            data_offset: 0,
        }
    }

    #[test]
    fn kv_cache_bytes_follow_the_head_widths_the_model_gives() {
        // SmolLM2-135M: 30 layers, 576 wide, 9 heads, 3 KV heads, head width 576 / 9 = 64.
        let smol = info_with(
            "llama",
            &[
                ("block_count", 30),
                ("embedding_length", 576),
                ("attention.head_count", 9),
                ("attention.head_count_kv", 3),
            ],
        );
        assert_eq!(
            smol.kv_cache_bytes(4096),
            Some(30 * 4096 * 3 * (64 + 64) * 2)
        );
        // Gemma 3 270M: 18 layers, 640 wide, 4 heads, 1 KV head, but heads 256 wide (not 160).
        let gemma = info_with(
            "gemma3",
            &[
                ("block_count", 18),
                ("embedding_length", 640),
                ("attention.head_count", 4),
                ("attention.head_count_kv", 1),
                ("attention.key_length", 256),
                ("attention.value_length", 256),
            ],
        );
        assert_eq!(
            gemma.kv_cache_bytes(4096),
            Some(18 * 4096 * (256 + 256) * 2)
        );
        assert_eq!(info_with("gemma3", &[]).kv_cache_bytes(4096), None);
    }
}
