//! Exporting embeddings for vector search.
//!
//! * [`write_npy`]: a `(n, d)` (or any-rank) tensor as a NumPy `.npy` file, format
//!   version 1.0, little-endian `f32` (`<f4`), C order; `numpy.load` reads it back.
//! * [`write_points_jsonl`]: one JSON object per row,
//!   `{"id": …, "vector": [d floats], "payload": {…}}`, the shape of Qdrant's points
//!   (`PointStruct`), ready for an upsert in batches.
//!
//! Both write atomically: into a temporary file in the target's directory, synced, then
//! renamed over the target, so a reader sees the old file or the complete new one.

use std::fs;
use std::io::{BufWriter, Write};
use std::path::Path;

use candle_core::{DType, Tensor};
use serde::Serialize;

use crate::error::{Error, Result};

/// Writes `tensor` (any shape, converted to `f32`) as a NumPy `.npy` v1.0 file.
///
/// The header is `{'descr': '<f4', 'fortran_order': False, 'shape': (n, d), }`, padded
/// with spaces and a newline so that the data starts at a multiple of 64 bytes.
pub fn write_npy(path: &Path, tensor: &Tensor) -> Result<()> {
    let values = tensor
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    write_npy_bytes(path, "<f4", tensor.dims(), &bytes)
}

/// Writes a `.npy` v1.0 file of `dims` with element type `descr` (`<f4`, `|i1`, `|u1`)
/// whose C-order data is `data` (already little-endian).
pub(crate) fn write_npy_bytes(path: &Path, descr: &str, dims: &[usize], data: &[u8]) -> Result<()> {
    let shape = match dims.len() {
        0 => "()".to_string(),
        1 => format!("({},)", dims[0]),
        _ => format!(
            "({})",
            dims.iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    // magic (6) + version (2) + header length (2) + header, newline-terminated, to 64.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.div_ceil(64) * 64 - unpadded));
    header.push('\n');
    let header_len = u16::try_from(header.len()).map_err(|_| {
        Error::invalid(
            format!("write_npy `{}`", path.display()),
            format!("shape {dims:?} makes a header longer than 65535 bytes"),
        )
    })?;
    atomic_write(path, |w| {
        w.write_all(b"\x93NUMPY\x01\x00")?;
        w.write_all(&header_len.to_le_bytes())?;
        w.write_all(header.as_bytes())?;
        w.write_all(data)?;
        Ok(())
    })
}

/// Writes one Qdrant point per row of `vectors` (`(n, d)`) as JSON lines:
/// `{"id": ids[i], "vector": [...], "payload": payloads[i]}` (`payload` is omitted when
/// `payloads` is `None`). Ids may be any JSON-serialisable type (Qdrant takes unsigned
/// integers or UUID strings). An error names both counts when `ids` or `payloads` and
/// the rows disagree.
pub fn write_points_jsonl<I: Serialize>(
    path: &Path,
    ids: &[I],
    vectors: &Tensor,
    payloads: Option<&[serde_json::Value]>,
) -> Result<()> {
    let location = || format!("write_points_jsonl `{}`", path.display());
    let (n, _) = vectors
        .dims2()
        .map_err(|_| Error::shape(location(), "(n, d) vectors", vectors.dims()))?;
    check_point_counts(&location(), ids, n, payloads)?;
    let rows = vectors.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    write_points_rows(path, ids, &rows, payloads)
}

/// Writes one point per row of `rows` (any serialisable element: floats, integer codes);
/// `ids` and `payloads` already checked against the row count.
pub(crate) fn write_points_rows<I: Serialize, T: Serialize, V: AsRef<[T]>>(
    path: &Path,
    ids: &[I],
    rows: &[V],
    payloads: Option<&[serde_json::Value]>,
) -> Result<()> {
    #[derive(Serialize)]
    struct Point<'a, I, T> {
        id: &'a I,
        vector: &'a [T],
        #[serde(skip_serializing_if = "Option::is_none")]
        payload: Option<&'a serde_json::Value>,
    }
    atomic_write(path, |w| {
        for (i, (id, vector)) in ids.iter().zip(rows).enumerate() {
            let point = Point {
                id,
                vector: vector.as_ref(),
                payload: payloads.map(|p| &p[i]),
            };
            serde_json::to_writer(&mut *w, &point).map_err(std::io::Error::other)?;
            w.write_all(b"\n")?;
        }
        Ok(())
    })
}

/// Checks `ids` and `payloads` against `n` rows for the writer at `location`.
pub(crate) fn check_point_counts<I>(
    location: &str,
    ids: &[I],
    n: usize,
    payloads: Option<&[serde_json::Value]>,
) -> Result<()> {
    if ids.len() != n {
        return Err(Error::invalid(
            location,
            format!("{} ids for {n} vector rows", ids.len()),
        ));
    }
    if let Some(p) = payloads
        && p.len() != n
    {
        return Err(Error::invalid(
            location,
            format!("{} payloads for {n} vector rows", p.len()),
        ));
    }
    Ok(())
}

/// Writes through `body` atomically ([`files::write_file_with`]).
fn atomic_write(
    path: &Path,
    body: impl FnOnce(&mut BufWriter<fs::File>) -> std::io::Result<()>,
) -> Result<()> {
    crate::files::write_file_with(path, body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Parses a `.npy` v1.0 file: (descr, fortran_order, shape, data).
    fn parse_npy(bytes: &[u8]) -> (String, bool, Vec<usize>, Vec<f32>) {
        assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00", "magic and version");
        let len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + len) % 64, 0, "data aligned to 64 bytes");
        let header = std::str::from_utf8(&bytes[10..10 + len]).unwrap();
        assert!(header.ends_with('\n'));
        let field = |key: &str| -> String {
            let start = header.find(&format!("'{key}': ")).unwrap() + key.len() + 4;
            let rest = &header[start..];
            let end = if rest.starts_with('(') {
                rest.find(')').unwrap() + 1
            } else {
                rest.find(',').unwrap()
            };
            rest[..end].to_string()
        };
        let descr = field("descr").trim_matches('\'').to_string();
        let fortran = field("fortran_order") == "True";
        let shape: Vec<usize> = field("shape")
            .trim_matches(|c| c == '(' || c == ')')
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().unwrap())
            .collect();
        let data = bytes[10 + len..]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        (descr, fortran, shape, data)
    }

    #[test]
    fn npy_round_trips_header_shape_and_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let values: Vec<f32> = (0..12).map(|i| i as f32 * 0.5 - 2.25).collect();
        let t = Tensor::from_vec(values.clone(), (3, 4), &Device::Cpu).unwrap();
        let path = dir.path().join("emb.npy");
        write_npy(&path, &t).unwrap();
        let bytes = fs::read(&path).unwrap();
        let (descr, fortran, shape, data) = parse_npy(&bytes);
        assert_eq!(descr, "<f4");
        assert!(!fortran);
        assert_eq!(shape, vec![3, 4]);
        assert_eq!(data, values);
        assert_eq!(bytes.len() % 64, 48, "64-byte aligned header, then 12 f32");

        // A 1-D tensor gets numpy's one-element tuple; a transposed one is written in C
        // order of its logical layout.
        write_npy(&path, &Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap()).unwrap();
        let (_, _, shape, data) = parse_npy(&fs::read(&path).unwrap());
        assert_eq!((shape, data), (vec![2], vec![1.0, 2.0]));
        write_npy(&path, &t.t().unwrap()).unwrap();
        let (_, _, shape, data) = parse_npy(&fs::read(&path).unwrap());
        assert_eq!(shape, vec![4, 3]);
        assert_eq!(&data[..3], &[values[0], values[4], values[8]]);
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn points_jsonl_has_one_point_per_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("points.jsonl");
        let t = Tensor::new(&[[1f32, 0.0], [0.5, 0.25], [0.0, -1.0]], &Device::Cpu).unwrap();
        let payloads = vec![
            serde_json::json!({"question": "a"}),
            serde_json::json!({"question": "b"}),
            serde_json::json!({"question": "c", "source": "faq"}),
        ];
        write_points_jsonl(&path, &[10u64, 11, 12], &t, Some(&payloads)).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[1]["id"], 11);
        assert_eq!(lines[1]["vector"], serde_json::json!([0.5, 0.25]));
        assert_eq!(lines[2]["payload"]["source"], "faq");

        write_points_jsonl(&path, &["a", "b", "c"], &t, None).unwrap();
        let first: serde_json::Value =
            serde_json::from_str(fs::read_to_string(&path).unwrap().lines().next().unwrap())
                .unwrap();
        assert_eq!(first["id"], "a");
        assert!(first.get("payload").is_none());
    }

    #[test]
    fn count_mismatches_name_both_counts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("points.jsonl");
        let t = Tensor::zeros((3, 2), DType::F32, &Device::Cpu).unwrap();
        let err = write_points_jsonl(&path, &[1u64, 2], &t, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("2 ids for 3 vector rows"), "{err}");
        let payloads = vec![serde_json::json!({}); 4];
        let err = write_points_jsonl(&path, &[1u64, 2, 3], &t, Some(&payloads))
            .unwrap_err()
            .to_string();
        assert!(err.contains("4 payloads for 3 vector rows"), "{err}");
        assert!(!path.exists());
    }
}
