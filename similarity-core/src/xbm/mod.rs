//! Cross-batch memory (XBM; Wang et al., "Cross-Batch Memory for Embedding Learning",
//! CVPR 2020, <https://arxiv.org/abs/1912.06798>).
//!
//! A ring buffer of the last `size` embeddings and their groups. At every training step
//! `t`:
//!
//! ```text
//! L_t = L(batch) + weight · L_mem(batch, memory)    if t ≥ start_iteration and memory ≠ ∅
//! memory ← enqueue(detach(batch embeddings), groups) (strict FIFO: the oldest rows go first)
//! ```
//!
//! The memory loss is computed against the memory *before* the batch is enqueued (a batch
//! never meets itself there). Cost: the memory is `(size, d)` on the model's device; the
//! memory loss is `O(batch · size)`.
//!
//! **Difference from Quaterion.** Quaterion enqueues only once `start_iteration` has
//! passed, so its memory starts empty exactly when it starts to be used; here the memory is
//! filled from the first step, as in the paper, and is full when the memory loss starts.
//! Quaterion's wrap-around also writes an overflowing batch's first rows to the start of
//! the buffer and its last rows to the end; here rows are written in FIFO order.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::loss::MemoryLoss;

/// Options of the cross-batch memory (Quaterion's `XbmConfig`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XbmConfig {
    /// Embeddings kept. Default 10,000.
    pub size: usize,
    /// Weight of the memory loss. Default 1.
    pub weight: f64,
    /// First optimiser step (0-based) at which the memory loss is added. Default 1,000.
    pub start_iteration: usize,
}

impl Default for XbmConfig {
    fn default() -> Self {
        XbmConfig {
            size: 10_000,
            weight: 1.0,
            start_iteration: 1_000,
        }
    }
}

/// The memory: a ring buffer of embeddings `(size, d)` and groups `(size)`.
#[derive(Debug)]
pub struct Xbm {
    config: XbmConfig,
    device: Device,
    embeddings: Option<Tensor>,
    groups: Option<Tensor>,
    /// Next row to write.
    pointer: usize,
    /// Rows filled so far (≤ size).
    len: usize,
}

impl Xbm {
    /// An empty memory on `device`.
    pub fn new(config: XbmConfig, device: &Device) -> Result<Self> {
        crate::limits::check_size(
            "XBM option `size`",
            config.size,
            crate::limits::MAX_MEMORY_SIZE,
        )?;
        if !config.weight.is_finite() || config.weight < 0.0 {
            return Err(Error::invalid(
                "XBM option `weight`",
                format!("must be >= 0, got {}", config.weight),
            ));
        }
        Ok(Xbm {
            config,
            device: device.clone(),
            embeddings: None,
            groups: None,
            pointer: 0,
            len: 0,
        })
    }

    /// The options.
    pub fn config(&self) -> &XbmConfig {
        &self.config
    }

    /// Rows held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is held yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends a batch (`embeddings: (n, d)`, `groups: (n)`), overwriting the oldest rows.
    /// A batch larger than the memory keeps its last `size` rows. The rows are written in
    /// place (no copy of the whole buffer); the buffer is never shared outside the memory.
    pub fn enqueue(&mut self, embeddings: &Tensor, groups: &Tensor) -> Result<()> {
        let size = self.config.size;
        let (n, d) = embeddings.dims2()?;
        if groups.dims() != [n] {
            return Err(Error::shape(
                "XBM enqueue",
                format!("groups ({n})"),
                groups.dims(),
            ));
        }
        if let Some(s) = &self.embeddings
            && s.dim(1)? != d
        {
            return Err(Error::shape(
                "XBM enqueue",
                format!("(batch, {})", s.dim(1)?),
                embeddings.dims(),
            ));
        }
        let embeddings = embeddings
            .detach()
            .to_dtype(DType::F32)?
            .to_device(&self.device)?;
        let groups = groups.to_dtype(DType::I64)?.to_device(&self.device)?;
        let (embeddings, groups, n) = if n > size {
            (
                embeddings.narrow(0, n - size, size)?,
                groups.narrow(0, n - size, size)?,
                size,
            )
        } else {
            (embeddings, groups, n)
        };
        if self.embeddings.is_none() {
            crate::limits::ParamCount::new("XBM memory `(size, embedding size)`")
                .add(1, &[size, d])?;
            self.embeddings = Some(Tensor::zeros((size, d), DType::F32, &self.device)?);
            self.groups = Some(Tensor::zeros(size, DType::I64, &self.device)?);
        }
        let (Some(store), Some(store_groups)) = (&self.embeddings, &self.groups) else {
            unreachable!("allocated above")
        };
        // Up to two contiguous writes: to the end of the buffer, then wrapping to its start.
        let first = n.min(size - self.pointer);
        let write = |dst: &Tensor, src: &Tensor, from: usize, len: usize, at: usize| {
            dst.slice_set(&src.narrow(0, from, len)?.contiguous()?, 0, at)
        };
        write(store, &embeddings, 0, first, self.pointer)?;
        write(store_groups, &groups, 0, first, self.pointer)?;
        if first < n {
            write(store, &embeddings, first, n - first, 0)?;
            write(store_groups, &groups, first, n - first, 0)?;
        }
        self.pointer = (self.pointer + n) % size;
        self.len = (self.len + n).min(size);
        Ok(())
    }

    /// A copy of the filled rows: `(len, d)` embeddings and `(len)` groups, or `None`
    /// when empty.
    pub fn get(&self) -> Result<Option<(Tensor, Tensor)>> {
        Ok(match self.view()? {
            Some((e, g)) => Some((e.copy()?, g.copy()?)),
            None => None,
        })
    }

    /// The filled rows as views into the ring buffer: valid until the next enqueue.
    fn view(&self) -> Result<Option<(Tensor, Tensor)>> {
        match (&self.embeddings, &self.groups) {
            (Some(e), Some(g)) if self.len > 0 => {
                Ok(Some((e.narrow(0, 0, self.len)?, g.narrow(0, 0, self.len)?)))
            }
            _ => Ok(None),
        }
    }

    /// `weight · loss.forward_memory(batch, memory)` at optimiser step `step`, or `None`
    /// before `start_iteration` or while the memory is empty.
    pub fn loss<L: MemoryLoss>(
        &self,
        loss: &L,
        embeddings: &Tensor,
        groups: &Tensor,
        step: usize,
    ) -> Result<Option<Tensor>> {
        if step < self.config.start_iteration {
            return Ok(None);
        }
        // The views are used within this step; the enqueue that overwrites them comes
        // after the backward pass.
        let Some((memory, memory_groups)) = self.view()? else {
            return Ok(None);
        };
        let memory = memory
            .to_device(embeddings.device())?
            .to_dtype(embeddings.dtype())?;
        let memory_groups = memory_groups.to_device(groups.device())?;
        let value = loss.forward_memory(embeddings, groups, &memory, &memory_groups)?;
        Ok(Some((value * self.config.weight)?))
    }

    /// The memory's state for a checkpoint.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        if let (Some(e), Some(g)) = (&self.embeddings, &self.groups) {
            // Copies: the buffer is written in place by later enqueues.
            if let (Ok(e), Ok(g)) = (e.copy(), g.copy()) {
                out.insert("xbm.embeddings".into(), e);
                out.insert("xbm.groups".into(), g);
            }
            let meta = [self.pointer as i64, self.len as i64];
            if let Ok(t) = Tensor::new(&meta, &Device::Cpu) {
                out.insert("xbm.pointer_len".into(), t);
            }
        }
        out
    }

    /// Restores a state written by [`state_tensors`](Self::state_tensors) for a model
    /// whose embeddings have `dim` columns. Everything is checked before the memory
    /// changes: the three tensors come together, `xbm.embeddings` is `(size, dim)` of
    /// finite floats, `xbm.groups` is `(size)` of integers, `xbm.pointer_len` holds a
    /// pointer below `size` and a length up to `size`. An empty map empties the memory.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, dim: usize) -> Result<()> {
        const WHERE: &str = "XBM checkpoint state";
        let keys = ["xbm.embeddings", "xbm.groups", "xbm.pointer_len"];
        let found: Vec<Option<&Tensor>> = keys.iter().map(|k| tensors.get(*k)).collect();
        if let Some(k) = tensors.keys().find(|k| !keys.contains(&k.as_str())) {
            return Err(Error::invalid(WHERE, format!("unexpected tensor `{k}`")));
        }
        let (Some(e), Some(g), Some(m)) = (found[0], found[1], found[2]) else {
            if found.iter().any(Option::is_some) {
                let missing: Vec<&str> = keys
                    .iter()
                    .zip(&found)
                    .filter(|(_, t)| t.is_none())
                    .map(|(k, _)| *k)
                    .collect();
                return Err(Error::invalid(WHERE, format!("is missing {missing:?}")));
            }
            *self = Xbm::new(self.config.clone(), &self.device)?;
            return Ok(());
        };
        let size = self.config.size;
        if e.dims() != [size, dim] {
            return Err(Error::invalid(
                WHERE,
                format!(
                    "`xbm.embeddings` has shape {:?}, the memory is ({size}, {dim}) (size, the \
                     head's output size)",
                    e.dims()
                ),
            ));
        }
        if g.dims() != [size] || g.dtype().is_float() {
            return Err(Error::invalid(
                WHERE,
                format!(
                    "`xbm.groups` must be ({size}) integers, got {:?} of {:?}",
                    g.dims(),
                    g.dtype()
                ),
            ));
        }
        if m.dims() != [2] || m.dtype() != DType::I64 {
            return Err(Error::invalid(
                WHERE,
                format!(
                    "`xbm.pointer_len` must be 2 i64 values, got {:?} of {:?}",
                    m.dims(),
                    m.dtype()
                ),
            ));
        }
        let meta = m.to_vec1::<i64>()?;
        let (pointer, len) = (meta[0], meta[1]);
        let (Ok(pointer), Ok(len)) = (usize::try_from(pointer), usize::try_from(len)) else {
            return Err(Error::invalid(
                WHERE,
                format!("`xbm.pointer_len` holds negative values ({pointer}, {len})"),
            ));
        };
        if pointer >= size || len > size {
            return Err(Error::invalid(
                WHERE,
                format!("pointer {pointer} and length {len} do not fit a memory of size {size}"),
            ));
        }
        if !e.dtype().is_float() || !crate::nn::all_finite(e)? {
            return Err(Error::invalid(
                WHERE,
                format!(
                    "`xbm.embeddings` must hold finite floats, got {:?} with NaN or infinite values or of an integer type",
                    e.dtype()
                ),
            ));
        }
        let embeddings = e.to_dtype(DType::F32)?;
        // Own copies, contiguous: enqueue writes into them in place.
        self.embeddings = Some(embeddings.to_device(&self.device)?.copy()?);
        self.groups = Some(g.to_dtype(DType::I64)?.to_device(&self.device)?.copy()?);
        self.pointer = pointer;
        self.len = len;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(start: i64, n: usize) -> (Tensor, Tensor) {
        let g: Vec<i64> = (start..start + n as i64).collect();
        let e: Vec<f32> = g.iter().map(|&v| v as f32).collect();
        (
            Tensor::from_vec(e, (n, 1), &Device::Cpu).unwrap(),
            Tensor::from_vec(g, n, &Device::Cpu).unwrap(),
        )
    }

    #[test]
    fn strict_fifo_with_wrap_around_and_oversized_batches() {
        let mut m = Xbm::new(
            XbmConfig {
                size: 5,
                ..Default::default()
            },
            &Device::Cpu,
        )
        .unwrap();
        assert!(m.get().unwrap().is_none());
        let mut next = 0;
        let mut expected: Vec<i64> = Vec::new();
        for n in [2, 2, 3, 1, 7, 4] {
            let (e, g) = batch(next, n);
            m.enqueue(&e, &g).unwrap();
            expected.extend(next..next + n as i64);
            next += n as i64;
            let (e, g) = m.get().unwrap().unwrap();
            let mut held = g.to_vec1::<i64>().unwrap();
            // Rows and groups stay aligned.
            assert_eq!(
                e.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                held.iter().map(|&v| v as f32).collect::<Vec<_>>()
            );
            held.sort();
            let keep = expected.len().min(5);
            assert_eq!(
                held,
                expected[expected.len() - keep..].to_vec(),
                "the last {keep} rows, oldest overwritten first"
            );
        }
    }

    #[test]
    fn state_round_trip() {
        let mut m = Xbm::new(
            XbmConfig {
                size: 4,
                ..Default::default()
            },
            &Device::Cpu,
        )
        .unwrap();
        let (e, g) = batch(0, 3);
        m.enqueue(&e, &g).unwrap();
        let mut r = Xbm::new(
            XbmConfig {
                size: 4,
                ..Default::default()
            },
            &Device::Cpu,
        )
        .unwrap();
        r.load_state(&m.state_tensors(), 1).unwrap();
        let (e2, g2) = batch(3, 2);
        m.enqueue(&e2, &g2).unwrap();
        r.enqueue(&e2, &g2).unwrap();
        assert_eq!(
            m.get().unwrap().unwrap().1.to_vec1::<i64>().unwrap(),
            r.get().unwrap().unwrap().1.to_vec1::<i64>().unwrap()
        );
    }

    #[test]
    fn handed_out_rows_and_state_do_not_change_with_later_enqueues() {
        let mut m = Xbm::new(
            XbmConfig {
                size: 4,
                ..Default::default()
            },
            &Device::Cpu,
        )
        .unwrap();
        let (e, g) = batch(0, 4);
        m.enqueue(&e, &g).unwrap();
        let (rows, groups) = m.get().unwrap().unwrap();
        let state = m.state_tensors();
        let (e2, g2) = batch(10, 2);
        m.enqueue(&e2, &g2).unwrap();
        // The buffer is written in place; what was handed out before keeps its values.
        assert_eq!(groups.to_vec1::<i64>().unwrap(), vec![0, 1, 2, 3]);
        assert_eq!(
            rows.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![0.0, 1.0, 2.0, 3.0]
        );
        assert_eq!(
            state["xbm.groups"].to_vec1::<i64>().unwrap(),
            vec![0, 1, 2, 3]
        );
        assert_eq!(
            m.get().unwrap().unwrap().1.to_vec1::<i64>().unwrap(),
            vec![10, 11, 2, 3]
        );
    }

    #[test]
    fn malformed_checkpoint_state_is_named() {
        let mut m = Xbm::new(
            XbmConfig {
                size: 4,
                ..Default::default()
            },
            &Device::Cpu,
        )
        .unwrap();
        let (e, g) = batch(0, 4);
        m.enqueue(&e, &g).unwrap();
        for meta in [vec![-1i64, 2], vec![1i64]] {
            let mut state = m.state_tensors();
            state.insert(
                "xbm.pointer_len".into(),
                Tensor::new(meta.as_slice(), &Device::Cpu).unwrap(),
            );
            let err = m.load_state(&state, 1).unwrap_err().to_string();
            assert!(err.contains("xbm.pointer_len"), "{meta:?}: {err}");
        }
        // A bank of another width, one of another size, a NaN row, a missing part: each
        // named, and the memory keeps its rows.
        let good = m.state_tensors();
        let cases: Vec<(&str, HashMap<String, Tensor>, usize)> = vec![
            ("(4, 2)", good.clone(), 2),
            (
                "xbm.embeddings",
                {
                    let mut s = good.clone();
                    s.insert(
                        "xbm.embeddings".into(),
                        Tensor::zeros((3, 1), DType::F32, &Device::Cpu).unwrap(),
                    );
                    s
                },
                1,
            ),
            (
                "NaN",
                {
                    let mut s = good.clone();
                    s.insert(
                        "xbm.embeddings".into(),
                        Tensor::new(&[[f32::NAN], [0.0], [0.0], [0.0]], &Device::Cpu).unwrap(),
                    );
                    s
                },
                1,
            ),
            (
                "missing",
                {
                    let mut s = good.clone();
                    s.remove("xbm.groups");
                    s
                },
                1,
            ),
            (
                "xbm.groups",
                {
                    let mut s = good.clone();
                    s.insert(
                        "xbm.groups".into(),
                        Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap(),
                    );
                    s
                },
                1,
            ),
        ];
        for (needle, state, dim) in cases {
            let err = m.load_state(&state, dim).unwrap_err().to_string();
            assert!(err.contains(needle), "{needle}: {err}");
            assert_eq!(
                m.get().unwrap().unwrap().1.to_vec1::<i64>().unwrap(),
                vec![0, 1, 2, 3]
            );
        }
    }
}
