//! `SwitchEncoder`: picks an encoder per record (Quaterion's `SwitchEncoder`), e.g. a text
//! encoder for questions and another for answers, or one per language.
//!
//! Each record is routed by [`Route::route`] to encoder `A` (route 0) or `B` (route 1);
//! both must produce embeddings of the same size `d`. A batch is split by route, each part
//! goes through its encoder, and the rows are put back in record order:
//! `(batch, d)`. More than two encoders nest: `SwitchEncoder<R, A, SwitchEncoder<R2, B, C>>`.
//! The routing is a type (`R: Route`), so a saved switch loads back with the same routing.
//! Saved as `a/` and `b/` sub-directories.

use std::marker::PhantomData;
use std::path::Path;

use candle_core::{Device, Tensor, Var};

use super::{Encoder, FrozenEncoder};
use crate::error::{Error, Result};
use crate::nn::Mode;

/// Chooses the encoder of a record: 0 for the first, 1 for the second.
pub trait Route<I>: Send + Sync + 'static {
    /// The route of `input`.
    fn route(input: &I) -> usize;
}

/// Two encoders of one input type, chosen per record by `R`.
pub struct SwitchEncoder<R, A, B> {
    a: A,
    b: B,
    route: PhantomData<fn() -> R>,
}

/// A collated [`SwitchEncoder`] batch: each encoder's part and where its rows go.
pub struct SwitchBatch<A, B> {
    a: Option<A>,
    b: Option<B>,
    /// Row `i` of the output is row `order[i]` of `[A rows; B rows]`.
    order: Tensor,
}

impl<R, A, B> SwitchEncoder<R, A, B>
where
    A: Encoder,
    B: Encoder<Input = A::Input>,
    R: Route<A::Input>,
{
    /// Switches between `a` and `b`; their embedding sizes must agree, and be at most
    /// [`MAX_WIDTH`](crate::limits::MAX_WIDTH).
    pub fn new(a: A, b: B) -> Result<Self> {
        crate::limits::check_size(
            "SwitchEncoder embedding size",
            a.embedding_size(),
            crate::limits::MAX_WIDTH,
        )?;
        if a.embedding_size() != b.embedding_size() {
            return Err(Error::invalid(
                "SwitchEncoder",
                format!(
                    "encoders `{}` and `{}` produce sizes {} and {}; a switch needs one size",
                    A::NAME,
                    B::NAME,
                    a.embedding_size(),
                    b.embedding_size()
                ),
            ));
        }
        Ok(SwitchEncoder {
            a,
            b,
            route: PhantomData,
        })
    }
}

#[diagnostic::do_not_recommend]
impl<R, A, B> Encoder for SwitchEncoder<R, A, B>
where
    A: Encoder,
    B: Encoder<Input = A::Input>,
    A::Input: Sync,
    R: Route<A::Input>,
{
    type Input = A::Input;
    type Batch = SwitchBatch<A::Batch, B::Batch>;
    const NAME: &'static str = "SwitchEncoder";

    fn embedding_size(&self) -> usize {
        self.a.embedding_size()
    }

    fn cost_hint(&self, input: &Self::Input) -> Option<usize> {
        match R::route(input) {
            0 => self.a.cost_hint(input),
            1 => self.b.cost_hint(input),
            _ => None,
        }
    }

    fn collate(&self, inputs: &[&Self::Input], device: &Device) -> Result<Self::Batch> {
        let (mut to_a, mut to_b) = (Vec::new(), Vec::new());
        let mut routes = Vec::with_capacity(inputs.len());
        for (i, x) in inputs.iter().enumerate() {
            let route = R::route(x);
            match route {
                0 => to_a.push(*x),
                1 => to_b.push(*x),
                r => {
                    return Err(Error::invalid(
                        format!("record {i}"),
                        format!("routed to encoder {r}, but a SwitchEncoder has encoders 0 and 1"),
                    ));
                }
            }
            routes.push(route);
        }
        // Output row i is row (position among its route) of A, or (|A| + position) of B.
        let (mut next_a, mut next_b) = (0u32, to_a.len() as u32);
        let order: Vec<u32> = routes
            .iter()
            .map(|&r| {
                let slot = if r == 0 { &mut next_a } else { &mut next_b };
                *slot += 1;
                *slot - 1
            })
            .collect();
        Ok(SwitchBatch {
            a: (!to_a.is_empty())
                .then(|| self.a.collate(&to_a, device))
                .transpose()?,
            b: (!to_b.is_empty())
                .then(|| self.b.collate(&to_b, device))
                .transpose()?,
            order: Tensor::from_vec(order, inputs.len(), device)?,
        })
    }

    fn forward(&self, batch: &Self::Batch, mode: &mut Mode) -> Result<Tensor> {
        let mut parts = Vec::with_capacity(2);
        if let Some(a) = &batch.a {
            parts.push(self.a.forward(a, mode)?);
        }
        if let Some(b) = &batch.b {
            parts.push(self.b.forward(b, mode)?);
        }
        Ok(Tensor::cat(&parts, 0)?.index_select(&batch.order, 0)?)
    }

    fn trainable_vars(&self) -> Vec<Var> {
        let mut v = self.a.trainable_vars();
        v.extend(self.b.trainable_vars());
        v
    }

    fn save(&self, dir: &Path) -> Result<()> {
        let (a, b) = (dir.join("a"), dir.join("b"));
        for path in [&a, &b] {
            std::fs::create_dir_all(path).map_err(|e| Error::io("cannot create", path, e))?;
        }
        self.a.save(&a)?;
        self.b.save(&b)
    }

    fn load(dir: &Path, device: &Device) -> Result<Self> {
        SwitchEncoder::new(
            A::load(&dir.join("a"), device)?,
            B::load(&dir.join("b"), device)?,
        )
        .map_err(|e| e.in_file(dir))
    }
}

#[diagnostic::do_not_recommend]
impl<R, A, B> FrozenEncoder for SwitchEncoder<R, A, B>
where
    A: FrozenEncoder,
    B: FrozenEncoder<Input = A::Input>,
    A::Input: Sync,
    R: Route<A::Input>,
{
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encoder::{HashedNgramConfig, HashedNgramEncoder};

    /// Questions (ending in '?') to the first encoder, everything else to the second.
    struct QuestionsFirst;

    impl Route<String> for QuestionsFirst {
        fn route(input: &String) -> usize {
            usize::from(!input.ends_with('?'))
        }
    }

    fn hashed(seed: u64) -> HashedNgramEncoder {
        HashedNgramEncoder::new(HashedNgramConfig {
            dim: 16,
            seed,
            ..Default::default()
        })
        .unwrap()
    }

    fn embed<E: Encoder<Input = String>>(e: &E, texts: &[&str]) -> Vec<Vec<f32>> {
        let owned: Vec<String> = texts.iter().map(|s| s.to_string()).collect();
        let refs: Vec<&String> = owned.iter().collect();
        e.forward(&e.collate(&refs, &Device::Cpu).unwrap(), &mut Mode::Eval)
            .unwrap()
            .to_vec2()
            .unwrap()
    }

    #[test]
    fn routes_rows_and_keeps_their_order() {
        let switch = SwitchEncoder::<QuestionsFirst, _, _>::new(hashed(1), hashed(2)).unwrap();
        let texts = ["an answer", "a question?", "another answer", "why?"];
        let got = embed(&switch, &texts);
        for (i, t) in texts.iter().enumerate() {
            let own = if t.ends_with('?') {
                embed(&hashed(1), &[t])
            } else {
                embed(&hashed(2), &[t])
            };
            assert_eq!(got[i], own[0], "row {i}");
        }
        // One route only works too.
        assert_eq!(
            embed(&switch, &["only?"])[0],
            embed(&hashed(1), &["only?"])[0]
        );
    }

    #[test]
    fn sizes_must_agree_and_save_load_round_trips() {
        let big = HashedNgramEncoder::new(HashedNgramConfig {
            dim: 32,
            ..Default::default()
        })
        .unwrap();
        let e = SwitchEncoder::<QuestionsFirst, _, _>::new(hashed(1), big)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("16 and 32"), "{e}");
        let switch = SwitchEncoder::<QuestionsFirst, _, _>::new(hashed(1), hashed(2)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        switch.save(dir.path()).unwrap();
        let loaded = SwitchEncoder::<QuestionsFirst, HashedNgramEncoder, HashedNgramEncoder>::load(
            dir.path(),
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(embed(&switch, &["a?", "b"]), embed(&loaded, &["a?", "b"]));
    }

    /// An encoder that only reports a size.
    struct Sized(usize);

    impl Encoder for Sized {
        type Input = String;
        type Batch = ();
        const NAME: &'static str = "Sized";
        fn embedding_size(&self) -> usize {
            self.0
        }
        fn collate(&self, _inputs: &[&String], _device: &Device) -> Result<()> {
            Ok(())
        }
        fn forward(&self, _batch: &(), _mode: &mut Mode) -> Result<Tensor> {
            unreachable!("never run")
        }
        fn save(&self, _dir: &Path) -> Result<()> {
            Ok(())
        }
        fn load(_dir: &Path, _device: &Device) -> Result<Self> {
            Ok(Sized(1))
        }
    }

    #[test]
    fn sizes_are_bounded_and_a_bad_saved_part_is_named_by_its_file() {
        for (size, ok) in [
            (0, false),
            (crate::limits::MAX_WIDTH, true),
            (crate::limits::MAX_WIDTH + 1, false),
            (1 << 62, false),
            (usize::MAX, false),
        ] {
            let r = SwitchEncoder::<QuestionsFirst, _, _>::new(Sized(size), Sized(size));
            assert_eq!(r.is_ok(), ok, "size {size}");
            if let Err(e) = r {
                let e = e.to_string();
                assert!(
                    e.contains("SwitchEncoder") && e.contains(&size.to_string()),
                    "{e}"
                );
            }
        }
        let switch = SwitchEncoder::<QuestionsFirst, _, _>::new(hashed(1), hashed(2)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        switch.save(dir.path()).unwrap();
        let load = || {
            SwitchEncoder::<QuestionsFirst, HashedNgramEncoder, HashedNgramEncoder>::load(
                dir.path(),
                &Device::Cpu,
            )
            .err()
            .unwrap()
            .to_string()
        };
        // Two valid parts of different sizes: the switch's directory is at fault.
        let b = dir.path().join("b/config.json");
        let mut config: HashedNgramConfig = crate::files::read_json(&b).unwrap();
        config.dim = 32;
        crate::files::write_json(&b, &config).unwrap();
        let e = load();
        assert!(
            e.contains(&format!("invalid file `{}`", dir.path().display()))
                && e.contains("16 and 32"),
            "{e}"
        );
        // A part out of bounds: its own file.
        config.dim = 1 << 62;
        crate::files::write_json(&b, &config).unwrap();
        let e = load();
        assert!(
            e.contains(&format!("`{}`", b.display())) && e.contains("HashedNgramConfig.dim"),
            "{e}"
        );
    }
}
