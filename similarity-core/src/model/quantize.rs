//! Quantised embeddings for a vector database: int8 with calibration ranges, and binary
//! (sign bits, packed), as sentence-transformers' `quantize_embeddings` makes them
//! (Shakir, Aarsen and Lee 2024, "Binary and Scalar Embedding Quantization",
//! <https://huggingface.co/blog/embedding-quantization>).
//!
//! **int8.** A calibration set `C: (c, d)` (ideally embeddings of the corpus, or a sample
//! of it) fixes a range per dimension, `min_j = min_i C_ij`, `max_j = max_i C_ij`. With
//! `step_j = (max_j − min_j) / 255`, a value `x` of dimension `j` becomes
//!
//! ```text
//! q(x) = clamp( ⌊(x − min_j) / step_j⌋ − 128, −128, 127 )        (i8; −128 where step_j = 0)
//! ```
//!
//! so the calibrated range maps onto the 256 codes; values outside it clamp. Codes are
//! one byte per dimension (4× smaller than f32); they are scored as the floats are
//! (cosine on the codes, as sentence-transformers scores int8 search). sentence-transformers
//! truncates `(x − min) / step − 128` toward zero where this floors, so a negative code
//! can differ by one. For a database that takes `uint8` vectors (Qdrant's `datatype:
//! uint8`), `q + 128` is the same code shifted; Euclidean distances are unchanged by it.
//!
//! **binary.** Bit `j` of an embedding is `x_j > 0`; the bits are packed eight to a byte,
//! the first dimension in the most significant bit (NumPy's `packbits`, sentence-
//! transformers' `ubinary`), the last byte padded with zero bits: `(n, ⌈d/8⌉)` `u8`, 32×
//! smaller than f32. They are compared by Hamming distance; with `s = 2b − 1 ∈ {−1, 1}ᵈ`
//! the signs, `hamming(a, b) = (d − s_a · s_b) / 2`, so ranking by Hamming distance is
//! ranking by dot product of the sign vectors, which is how
//! [`BinaryEmbeddings::signs`] lets the [`Evaluator`](crate::metric::Evaluator) score them.
//!
//! Shapes: every input is `(n, d)` `f32`; [`Int8Embeddings`] holds `n × d` codes,
//! [`BinaryEmbeddings`] `n × ⌈d/8⌉` bytes, both row-major. Both write a NumPy `.npy`
//! (`|i1` `(n, d)`, `|u1` `(n, ⌈d/8⌉)`) and Qdrant-style points JSON lines whose `vector`
//! is the integer codes (bytes for binary), through the library's atomic writes.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::export::{check_point_counts, write_npy_bytes, write_points_rows};
use crate::error::{Error, Result};

/// Per-dimension ranges of an int8 quantisation, from a calibration set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Int8Calibration {
    /// `min_j` of every dimension.
    pub min: Vec<f32>,
    /// `max_j` of every dimension.
    pub max: Vec<f32>,
}

/// The rows of `(n, d)` embeddings as `f32`, checked finite; `what` names the input.
fn rows(embeddings: &Tensor, what: &str) -> Result<(usize, usize, Vec<f32>)> {
    let (n, d) = embeddings
        .dims2()
        .map_err(|_| Error::shape(what, "(n, d) embeddings", embeddings.dims()))?;
    if n == 0 || d == 0 {
        return Err(Error::invalid(
            what,
            format!("is empty ({n} × {d}); it needs at least one row and one dimension"),
        ));
    }
    let values = embeddings
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(Error::invalid(
            format!("{what}, row {}, dimension {}", i / d, i % d),
            format!("is {}; quantisation needs finite values", values[i]),
        ));
    }
    Ok((n, d, values))
}

impl Int8Calibration {
    /// The per-dimension minimum and maximum of `calibration: (c, d)`.
    pub fn fit(calibration: &Tensor) -> Result<Self> {
        let (_, d, values) = rows(calibration, "int8 calibration set")?;
        let mut min = vec![f32::INFINITY; d];
        let mut max = vec![f32::NEG_INFINITY; d];
        for row in values.chunks_exact(d) {
            for (j, &x) in row.iter().enumerate() {
                min[j] = min[j].min(x);
                max[j] = max[j].max(x);
            }
        }
        Ok(Int8Calibration { min, max })
    }

    /// The number of dimensions `d`.
    pub fn dim(&self) -> usize {
        self.min.len()
    }

    /// The code of value `x` in dimension `j` (the formula of the module docs).
    fn code(&self, j: usize, x: f32) -> i8 {
        let range = self.max[j] - self.min[j];
        if range <= 0.0 {
            return -128;
        }
        // (x − min) / range · 255 rather than / step: exactly 255 at the maximum.
        (((x - self.min[j]) / range * 255.0).floor() - 128.0).clamp(-128.0, 127.0) as i8
    }

    /// `embeddings: (n, d)` as int8 codes; `d` must be the calibration's.
    pub fn quantize(&self, embeddings: &Tensor) -> Result<Int8Embeddings> {
        if self.min.len() != self.max.len() {
            return Err(Error::invalid(
                "Int8Calibration",
                format!(
                    "has {} minima and {} maxima; one of each per dimension",
                    self.min.len(),
                    self.max.len()
                ),
            ));
        }
        let (n, d, values) = rows(embeddings, "int8 quantisation input")?;
        if d != self.dim() {
            return Err(Error::shape(
                "int8 quantisation input",
                format!("(n, {}) as calibrated", self.dim()),
                embeddings.dims(),
            ));
        }
        let codes = values
            .iter()
            .enumerate()
            .map(|(i, &x)| self.code(i % d, x))
            .collect();
        Ok(Int8Embeddings {
            rows: n,
            dim: d,
            codes,
        })
    }
}

/// int8 codes of `rows × dim` embeddings, row-major; see the module docs.
#[derive(Debug, Clone, PartialEq)]
pub struct Int8Embeddings {
    /// Number of embeddings `n`.
    pub rows: usize,
    /// Dimensions `d`.
    pub dim: usize,
    /// `n × d` codes.
    pub codes: Vec<i8>,
}

impl Int8Embeddings {
    /// The codes as an `f32` tensor `(n, d)`, to score them with a distance.
    pub fn to_tensor(&self, device: &Device) -> Result<Tensor> {
        let v: Vec<f32> = self.codes.iter().map(|&c| c as f32).collect();
        Ok(Tensor::from_vec(v, (self.rows, self.dim), device)?)
    }

    /// Writes the codes as a NumPy `.npy` file, `|i1`, shape `(n, d)`.
    pub fn write_npy(&self, path: &Path) -> Result<()> {
        let bytes: Vec<u8> = self.codes.iter().map(|&c| c as u8).collect();
        write_npy_bytes(path, "|i1", &[self.rows, self.dim], &bytes)
    }

    /// Writes one point per row, `{"id", "vector": [d integers in −128..=127], "payload"}`.
    pub fn write_points_jsonl<I: Serialize>(
        &self,
        path: &Path,
        ids: &[I],
        payloads: Option<&[serde_json::Value]>,
    ) -> Result<()> {
        check_point_counts(
            &format!("int8 write_points_jsonl `{}`", path.display()),
            ids,
            self.rows,
            payloads,
        )?;
        let rows: Vec<&[i8]> = self.codes.chunks_exact(self.dim).collect();
        write_points_rows(path, ids, &rows, payloads)
    }
}

/// Packed sign bits of `rows × dim` embeddings; see the module docs.
#[derive(Debug, Clone, PartialEq)]
pub struct BinaryEmbeddings {
    /// Number of embeddings `n`.
    pub rows: usize,
    /// Dimensions `d` (bits per row before padding).
    pub dim: usize,
    /// `n × ⌈d/8⌉` bytes, the first dimension in the high bit of the first byte.
    pub bytes: Vec<u8>,
}

/// `embeddings: (n, d)` as packed sign bits (`x > 0` is 1).
pub fn quantize_binary(embeddings: &Tensor) -> Result<BinaryEmbeddings> {
    let (n, d, values) = rows(embeddings, "binary quantisation input")?;
    let per_row = d.div_ceil(8);
    let mut bytes = vec![0u8; n * per_row];
    for (i, row) in values.chunks_exact(d).enumerate() {
        for (j, &x) in row.iter().enumerate() {
            if x > 0.0 {
                bytes[i * per_row + j / 8] |= 0x80 >> (j % 8);
            }
        }
    }
    Ok(BinaryEmbeddings {
        rows: n,
        dim: d,
        bytes,
    })
}

impl BinaryEmbeddings {
    /// Bytes per row, `⌈d/8⌉`.
    pub fn bytes_per_row(&self) -> usize {
        self.dim.div_ceil(8)
    }

    /// Bit `j` of row `i`.
    fn bit(&self, i: usize, j: usize) -> bool {
        self.bytes[i * self.bytes_per_row() + j / 8] & (0x80 >> (j % 8)) != 0
    }

    /// The Hamming distance between rows `a` and `b` (padding bits are zero in both).
    pub fn hamming(&self, a: usize, b: usize) -> u32 {
        let w = self.bytes_per_row();
        self.bytes[a * w..(a + 1) * w]
            .iter()
            .zip(&self.bytes[b * w..(b + 1) * w])
            .map(|(x, y)| (x ^ y).count_ones())
            .sum()
    }

    /// The signs `2b − 1` as an `f32` tensor `(n, d)` of ±1: ranking by
    /// [`Distance::DotProduct`](crate::distance::Distance::DotProduct) on them is ranking
    /// by Hamming distance.
    pub fn signs(&self, device: &Device) -> Result<Tensor> {
        let v: Vec<f32> = (0..self.rows)
            .flat_map(|i| (0..self.dim).map(move |j| (i, j)))
            .map(|(i, j)| if self.bit(i, j) { 1.0 } else { -1.0 })
            .collect();
        Ok(Tensor::from_vec(v, (self.rows, self.dim), device)?)
    }

    /// Writes the packed bytes as a NumPy `.npy` file, `|u1`, shape `(n, ⌈d/8⌉)`.
    pub fn write_npy(&self, path: &Path) -> Result<()> {
        write_npy_bytes(path, "|u1", &[self.rows, self.bytes_per_row()], &self.bytes)
    }

    /// Writes one point per row, `{"id", "vector": [⌈d/8⌉ bytes as integers], "payload"}`.
    pub fn write_points_jsonl<I: Serialize>(
        &self,
        path: &Path,
        ids: &[I],
        payloads: Option<&[serde_json::Value]>,
    ) -> Result<()> {
        check_point_counts(
            &format!("binary write_points_jsonl `{}`", path.display()),
            ids,
            self.rows,
            payloads,
        )?;
        let rows: Vec<&[u8]> = self.bytes.chunks_exact(self.bytes_per_row()).collect();
        write_points_rows(path, ids, &rows, payloads)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[[f32; 3]]) -> Tensor {
        let flat: Vec<f32> = v.iter().flatten().copied().collect();
        Tensor::from_vec(flat, (v.len(), 3), &Device::Cpu).unwrap()
    }

    #[test]
    fn int8_codes_by_hand() {
        // Dimension 0 calibrated to [-1, 1.55] (step 0.01), dimension 1 to [0, 2.55]
        // (step 0.01), dimension 2 constant.
        let cal = Int8Calibration::fit(&t(&[[-1.0, 0.0, 5.0], [1.55, 2.55, 5.0]])).unwrap();
        assert_eq!(cal.min, vec![-1.0, 0.0, 5.0]);
        assert_eq!(cal.max, vec![1.55, 2.55, 5.0]);
        let q = cal
            .quantize(&t(&[
                [-1.0, 2.55, 5.0],
                [0.275, 1.0, 7.0],
                [-9.0, 9.0, -1.0],
            ]))
            .unwrap();
        // min → -128, max → 127; 0.275: (1.275 / 0.01) = 127.5 → 127 − 128 = −1;
        // 1.0: 100 − 128 = −28 (float rounding of 1/0.01 may give 99.99…: floor 99 → −29);
        // outside the range: clamped; a constant dimension: −128.
        let c = &q.codes;
        assert_eq!((c[0], c[1], c[2]), (-128, 127, -128));
        assert_eq!(c[3], -1);
        assert!(c[4] == -28 || c[4] == -29, "{}", c[4]);
        assert_eq!((c[6], c[7], c[8]), (-128, 127, -128));
        let f = q.to_tensor(&Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(f[0], vec![-128.0, 127.0, -128.0]);
    }

    #[test]
    fn binary_bits_are_packed_msb_first_and_hamming_matches_signs() {
        // 10 dims → 2 bytes per row; numpy.packbits([1,0,0,0,0,0,0,1, 1,1]) = [129, 192].
        let v: Vec<f32> = vec![
            0.5, -1.0, 0.0, -0.1, -2.0, -3.0, -4.0, 0.1, 7.0, 1.0, // row 0
            -0.5, -1.0, 1.0, -0.1, -2.0, -3.0, -4.0, 0.1, 7.0, -1.0, // row 1
        ];
        let e = Tensor::from_vec(v, (2, 10), &Device::Cpu).unwrap();
        let b = quantize_binary(&e).unwrap();
        assert_eq!(b.bytes_per_row(), 2);
        assert_eq!(&b.bytes[..2], &[129, 192]);
        // row 1 differs from row 0 in dims 0, 2 and 9.
        assert_eq!(b.hamming(0, 1), 3);
        let s = b.signs(&Device::Cpu).unwrap();
        let dot = (s.get(0).unwrap() * s.get(1).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!((10.0 - dot) / 2.0, 3.0);
    }

    #[test]
    fn written_files_hold_the_codes() {
        let dir = tempfile::tempdir().unwrap();
        let cal = Int8Calibration::fit(&t(&[[-1.0, 0.0, 1.0], [1.0, 2.0, 3.0]])).unwrap();
        let q = cal
            .quantize(&t(&[[-1.0, 2.0, 3.0], [1.0, 0.0, 1.0]]))
            .unwrap();
        let npy = dir.path().join("q.npy");
        q.write_npy(&npy).unwrap();
        let bytes = std::fs::read(&npy).unwrap();
        let len = 10 + u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        let header = std::str::from_utf8(&bytes[10..len]).unwrap();
        assert!(
            header.contains("'descr': '|i1'") && header.contains("(2, 3)"),
            "{header}"
        );
        assert_eq!((len % 64, bytes.len()), (0, len + 6));
        assert_eq!(
            bytes[len..].iter().map(|&b| b as i8).collect::<Vec<_>>(),
            q.codes
        );
        let jsonl = dir.path().join("q.jsonl");
        q.write_points_jsonl(&jsonl, &[7u64, 8], None).unwrap();
        let text = std::fs::read_to_string(&jsonl).unwrap();
        let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(first["id"], 7);
        assert_eq!(first["vector"], serde_json::json!([-128, 127, 127]));

        let b = quantize_binary(&t(&[[1.0, -1.0, 1.0], [-1.0, 1.0, 1.0]])).unwrap();
        b.write_npy(&npy).unwrap();
        let bytes = std::fs::read(&npy).unwrap();
        let len = 10 + u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        let header = std::str::from_utf8(&bytes[10..len]).unwrap();
        assert!(
            header.contains("'|u1'") && header.contains("(2, 1)"),
            "{header}"
        );
        assert_eq!(&bytes[len..], &[0b1010_0000, 0b0110_0000]);
        b.write_points_jsonl(
            &jsonl,
            &["a", "b"],
            Some(&[serde_json::json!({"k": 1}), serde_json::json!({})]),
        )
        .unwrap();
        let text = std::fs::read_to_string(&jsonl).unwrap();
        let second: serde_json::Value = serde_json::from_str(text.lines().nth(1).unwrap()).unwrap();
        assert_eq!(second["vector"], serde_json::json!([96]));
        let err = b
            .write_points_jsonl(&jsonl, &["a"], None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("1 ids for 2 vector rows"), "{err}");
    }

    #[test]
    fn bad_inputs_name_what_is_wrong() {
        let cal = Int8Calibration::fit(&t(&[[0.0, 0.0, 0.0]])).unwrap();
        let wide = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(
            cal.quantize(&wide)
                .unwrap_err()
                .to_string()
                .contains("(n, 3)")
        );
        let bad = t(&[[0.0, f32::NAN, 0.0]]);
        let msg = quantize_binary(&bad).unwrap_err().to_string();
        assert!(
            msg.contains("row 0, dimension 1") && msg.contains("NaN"),
            "{msg}"
        );
        let empty = Tensor::zeros((0, 3), DType::F32, &Device::Cpu).unwrap();
        assert!(
            Int8Calibration::fit(&empty)
                .unwrap_err()
                .to_string()
                .contains("empty")
        );
    }
}
