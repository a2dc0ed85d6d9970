//! Every kernel against the composite Candle form it replaces (values and gradients).

/// A scalar loss and its gradient with respect to `v`, in f64.
fn loss_and_grad(loss: &candle_core::Tensor, v: &candle_core::Var) -> (f64, Vec<f64>) {
    use candle_core::DType;
    let grad = loss
        .backward()
        .unwrap()
        .get(v)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    (
        loss.to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap(),
        grad.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
    )
}

mod forms {
    use super::super::*;
    use super::super::{activation::*, cosine::*, cross_entropy::*, mining::*, skip::*};
    use crate::distance::cosine_similarity_matrix as composite_cosine;
    use crate::loss::diagonal_cross_entropy_composite;
    use candle_core::{Device, Var};
    use rand::{Rng, SeedableRng, rngs::StdRng};

    fn random(shape: (usize, usize), seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..shape.0 * shape.1)
            .map(|_| rng.random::<f32>() * 2.0 - 1.0)
            .collect()
    }

    fn var(data: &[f32], shape: (usize, usize)) -> Var {
        Var::from_tensor(&Tensor::from_slice(data, shape, &Device::Cpu).unwrap()).unwrap()
    }

    fn close(a: &Tensor, b: &Tensor, tol: f32, what: &str) {
        close_except(a, b, tol, what, &[]);
    }

    /// As `close`, with entries `skip` left out of the comparison.
    fn close_except(a: &Tensor, b: &Tensor, tol: f32, what: &str, skip: &[usize]) {
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        assert!(a.iter().all(|v| v.is_finite()), "{what}: fused not finite");
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            if skip.contains(&i) {
                continue;
            }
            assert!(
                (x - y).abs() <= tol * (1.0 + y.abs()),
                "{what}[{i}]: fused {x} vs composite {y}"
            );
        }
    }

    /// A fixed, non-uniform weighting of the entries of `t` summed to a scalar, so that
    /// every entry gets its own gradient.
    fn weighted_sum(t: &Tensor) -> Tensor {
        let w: Vec<f32> = (0..t.elem_count())
            .map(|i| ((i * 7919) % 13) as f32 / 13.0 - 0.4)
            .collect();
        let w = Tensor::from_vec(w, t.shape(), t.device()).unwrap();
        (t * w).unwrap().sum_all().unwrap()
    }

    #[test]
    fn cosine_matrix_matches_the_composite_form() {
        // (7, 61), (40, 2000): few rows against many, the transposed product of the
        // two-input form (the second in parallel blocks of rows).
        for (n, m) in [(37, 23), (7, 61), (40, 2000)] {
            cosine_matrix_matches_on(n, m);
        }
    }

    fn cosine_matrix_matches_on(n: usize, m: usize) {
        let d = 19;
        let mut xd = random((n, d), 1);
        // A zero row and a tiny one: the clamped-norm branch of the backward pass.
        xd[3 * d..4 * d].fill(0.0);
        xd[5 * d..6 * d].iter_mut().for_each(|v| *v *= 1e-9);
        let x = var(&xd, (n, d));
        // The same on the other side (its columns are scaled by the clamped inverse norm).
        let mut yd = random((m, d), 2);
        yd[2 * d..3 * d].fill(0.0);
        yd[7 * d..8 * d].iter_mut().for_each(|v| *v *= 1e-9);
        let y = var(&yd, (m, d));
        for other in [None, Some(&y)] {
            let fused = cosine_similarity_matrix(x.as_tensor(), other.map(|y| y.as_tensor()))
                .unwrap()
                .expect("applies to f32 on the CPU");
            let reference = composite_cosine(
                x.as_tensor(),
                other.map_or(x.as_tensor(), |y| y.as_tensor()),
            )
            .unwrap();
            close(&fused, &reference, 1e-5, "cosine values");
            let gf = weighted_sum(&fused).backward().unwrap();
            let gr = weighted_sum(&reference).backward().unwrap();
            // Including the all-zero row: both give torch's gradient there (∂x̂ / ε).
            close(gf.get(&x).unwrap(), gr.get(&x).unwrap(), 1e-4, "cosine ∂x");
            if let Some(y) = other {
                close(gf.get(y).unwrap(), gr.get(y).unwrap(), 1e-4, "cosine ∂y");
            }
        }
    }

    #[test]
    fn gram_and_add_transpose_match_the_plain_forms() {
        // Sizes around the tile (64) and the full-product threshold (128).
        for (n, d) in [(5, 3), (127, 7), (128, 9), (200, 16), (257, 5)] {
            let u = random((n, d), n as u64);
            let mut full = vec![0.0f32; n * n];
            gemm(&mut full, &u, &u, n, n, d, false, true);
            let mut sym = vec![0.0f32; n * n];
            super::super::cosine::gram(&mut sym, &u, n, d);
            for (i, (a, b)) in sym.iter().zip(&full).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                    "gram n={n} [{i}]: {a} vs {b}"
                );
            }
            for i in 0..n {
                for j in 0..n {
                    assert_eq!(sym[i * n + j], sym[j * n + i], "gram n={n} not symmetric");
                }
            }
            let g = random((n, n), 7);
            let mut t = vec![0.0f32; n * n];
            super::super::cosine::add_transpose(&mut t, &g, n);
            for i in 0..n {
                for j in 0..n {
                    assert_eq!(t[i * n + j], g[i * n + j] + g[j * n + i]);
                }
            }
        }
    }

    #[test]
    fn cosine_matrix_skips_the_gradient_of_a_detached_side() {
        let x = var(&random((8, 5), 3), (8, 5));
        let memory = Tensor::from_vec(random((6, 5), 4), (6, 5), &Device::Cpu).unwrap();
        let s = cosine_similarity_matrix(x.as_tensor(), Some(&memory))
            .unwrap()
            .unwrap();
        let g = s.sum_all().unwrap().backward().unwrap();
        assert!(g.get(&x).is_some());
        assert!(g.get(&memory).is_none());
    }

    #[test]
    fn diagonal_cross_entropy_matches_the_composite_form() {
        let n = 29;
        // Logits of the scale MNRL uses (20 · cos), where exp's range matters.
        let data: Vec<f32> = random((n, n), 5).iter().map(|v| v * 20.0).collect();
        for symmetric in [false, true] {
            let z = var(&data, (n, n));
            let fused = diagonal_cross_entropy(z.as_tensor(), symmetric)
                .unwrap()
                .unwrap();
            let reference = diagonal_cross_entropy_composite(z.as_tensor(), symmetric).unwrap();
            close(&fused, &reference, 1e-5, "cross-entropy value");
            let gf = (fused * 3.0).unwrap().backward().unwrap();
            let gr = (reference * 3.0).unwrap().backward().unwrap();
            close(
                gf.get(&z).unwrap(),
                gr.get(&z).unwrap(),
                1e-5,
                "cross-entropy ∂z",
            );
        }
    }

    #[test]
    fn gelu_and_softmax_match_the_composite_forms() {
        let data: Vec<f32> = random((13, 40), 12).iter().map(|v| v * 8.0).collect();
        let x = var(&data, (13, 40));
        let fused = gelu_erf(x.as_tensor()).unwrap().unwrap();
        let reference = x.as_tensor().gelu_erf().unwrap();
        close(&fused, &reference, 1e-6, "gelu values");
        let gf = weighted_sum(&fused).backward().unwrap();
        // d/dx x·Φ(x) = Φ(x) + x·φ(x), from the reference forms.
        let xs = x.as_tensor();
        let cdf = ((xs * FRAC_1_SQRT_2 as f64).unwrap().erf().unwrap() + 1.0).unwrap() * 0.5;
        let pdf =
            ((xs.sqr().unwrap() * -0.5).unwrap().exp().unwrap() * FRAC_1_SQRT_2PI as f64).unwrap();
        let slope = (cdf.unwrap() + (xs * pdf).unwrap()).unwrap();
        let w = (weighted_sum(&(xs * 1.0).unwrap()).backward().unwrap())
            .get(&x)
            .unwrap()
            .clone();
        close(gf.get(&x).unwrap(), &(slope * w).unwrap(), 1e-5, "gelu ∂x");

        let fused = softmax_last_dim(x.as_tensor()).unwrap().unwrap();
        let xs = x.as_tensor();
        let e = xs
            .broadcast_sub(&xs.max_keepdim(1).unwrap().detach())
            .unwrap()
            .exp()
            .unwrap();
        let reference = e.broadcast_div(&e.sum_keepdim(1).unwrap()).unwrap();
        close(&fused, &reference, 1e-6, "softmax values");
        let gf = weighted_sum(&fused).backward().unwrap();
        let gr = weighted_sum(&reference).backward().unwrap();
        close(gf.get(&x).unwrap(), gr.get(&x).unwrap(), 1e-5, "softmax ∂x");
    }

    /// `softmax(x)` over the last dimension, composite.
    fn softmax_rows(x: &Tensor) -> Tensor {
        let e = x
            .broadcast_sub(&x.max_keepdim(candle_core::D::Minus1).unwrap())
            .unwrap()
            .exp()
            .unwrap();
        e.broadcast_div(&e.sum_keepdim(candle_core::D::Minus1).unwrap())
            .unwrap()
    }

    #[test]
    fn dense_matches_the_composite_form_for_each_epilogue() {
        use super::super::bert::{Epilogue, dense};
        let (n, k, m) = (45, 19, 23);
        let dev = &Device::Cpu;
        let x = Tensor::from_vec(random((n, k), 11), (n, k), dev).unwrap();
        let w = Tensor::from_vec(random((m, k), 12), (m, k), dev).unwrap();
        let r = Tensor::from_vec(random((n, m), 13), (n, m), dev).unwrap();
        let bias = random((1, m), 14);
        let gamma: Vec<f32> = random((1, m), 15).iter().map(|v| 1.0 + v).collect();
        let beta = random((1, m), 16);
        let row = |v: &[f32]| Tensor::from_slice(v, m, dev).unwrap();
        let affine = x
            .matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&row(&bias))
            .unwrap();
        let fused = dense(&x, &w, &bias, None, Epilogue::None).unwrap();
        close(&fused, &affine, 1e-5, "x Wᵀ + b");
        let fused = dense(&x, &w, &bias, None, Epilogue::Gelu).unwrap();
        close(&fused, &affine.gelu_erf().unwrap(), 1e-5, "GELU(x Wᵀ + b)");
        let eps = 1e-12;
        let ln = Epilogue::LayerNorm {
            gamma: &gamma,
            beta: &beta,
            eps,
        };
        let fused = dense(&x, &w, &bias, Some(&r), ln).unwrap();
        let z = (&affine + &r).unwrap();
        let expected = candle_nn::ops::layer_norm(&z, &row(&gamma), &row(&beta), eps).unwrap();
        close(&fused, &expected, 1e-5, "LN(x Wᵀ + b + r)");
        // Shapes that do not fit are errors, not panics.
        assert!(dense(&x, &w, &bias[..m - 1], None, Epilogue::None).is_err());
        assert!(dense(&x, &w.t().unwrap(), &bias, None, Epilogue::None).is_err());
        assert!(dense(&x, &w, &bias, Some(&x), Epilogue::None).is_err());
    }

    #[test]
    fn attention_matches_the_composite_form() {
        use super::super::bert::attention;
        // 3 sequences of 13 or 22 positions (not a whole number of blocks: two key blocks,
        // or a pair and a single one; query rows in fours and a remainder), 2 heads of 40
        // (a group of four column blocks and a single one); the second sequence has 4
        // padding positions, the third all but one.
        for l in [13, 22] {
            let (b, heads, d) = (3, 2, 40);
            let h = heads * d;
            let dev = &Device::Cpu;
            let qkv = Tensor::from_vec(random((b * l, 3 * h), 21), (b * l, 3 * h), dev).unwrap();
            let mut mask = vec![1.0f32; b * l];
            mask[l + l - 4..2 * l].fill(0.0);
            mask[2 * l + 1..3 * l].fill(0.0);
            let mask = Tensor::from_vec(mask, (b, l), dev).unwrap();
            let fused = attention(&qkv, &mask, heads).unwrap();
            // The composite form: heads split, scaled scores plus the mask bias, softmax,
            // context merged back.
            let split = |i: usize| {
                qkv.narrow(1, i * h, h)
                    .unwrap()
                    .reshape((b, l, heads, d))
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
                    .contiguous()
                    .unwrap()
            };
            let (q, k, v) = (split(0), split(1), split(2));
            let bias = ((mask.ones_like().unwrap() - &mask).unwrap() * -1e9)
                .unwrap()
                .reshape((b, 1, 1, l))
                .unwrap();
            let scores = (q.matmul(&k.t().unwrap().contiguous().unwrap()).unwrap()
                * (1.0 / (d as f64).sqrt()))
            .unwrap()
            .broadcast_add(&bias)
            .unwrap();
            let expected = softmax_rows(&scores)
                .matmul(&v)
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
                .reshape((b * l, h))
                .unwrap();
            close(&fused, &expected, 1e-5, "attention");
            // A head size that is not a whole number of blocks, and a mask of the wrong size.
            assert!(attention(&qkv, &mask, 3).is_err());
            assert!(attention(&qkv, &mask.narrow(1, 0, l - 1).unwrap(), heads).is_err());
        }
    }

    #[test]
    fn gather_rows_matches_index_select_and_names_a_bad_row() {
        // 600 rows of 128: large enough for the parallel blocks.
        let (n, d) = (600, 128);
        let src = Tensor::from_vec(random((n, d), 31), (n, d), &Device::Cpu).unwrap();
        let rows: Vec<u32> = (0..900).map(|i| ((i * 7919) % n) as u32).collect();
        let fused = gather_rows(&src, &rows).unwrap().unwrap();
        let ids = Tensor::from_slice(&rows, rows.len(), &Device::Cpu).unwrap();
        close(&fused, &src.index_select(&ids, 0).unwrap(), 0.0, "gather");
        let err = gather_rows(&src, &[3, n as u32]).unwrap_err().to_string();
        assert!(err.contains("row 600") && err.contains("600 rows"), "{err}");
    }

    #[test]
    fn exp_is_accurate_over_the_range_softmax_uses() {
        let mut worst = 0.0f32;
        for i in -8700..=8800 {
            let x = i as f32 * 0.01 + 0.003;
            let (fast, exact) = (exp_f32(x), x.exp());
            if exact.is_normal() {
                worst = worst.max((fast - exact).abs() / exact);
            }
        }
        assert!(worst < 4.0 * f32::EPSILON, "max relative error {worst}");
        assert_eq!(exp_f32(-200.0), exp_f32(-87.336_55));
        assert!(exp_f32(-200.0) < 1e-37);
    }

    #[test]
    fn skip_connection_layer_matches_the_composite_form() {
        let (n, d) = (17, 11);
        let x = var(&random((n, d), 6), (n, d));
        let w = var(&random((d, d), 7), (d, d));
        let b = Var::from_tensor(&Tensor::from_vec(random((1, d), 8), d, &Device::Cpu).unwrap())
            .unwrap();
        let gate = Var::from_tensor(&Tensor::from_vec(random((1, d), 9), d, &Device::Cpu).unwrap())
            .unwrap();
        let fused = skip_connection_layer(x.as_tensor(), w.as_tensor(), b.as_tensor(), &gate)
            .unwrap()
            .unwrap();
        let reference = x
            .matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap()
            .broadcast_mul(&candle_nn::ops::sigmoid(&gate).unwrap())
            .unwrap()
            .add(&x)
            .unwrap();
        close(&fused, &reference, 1e-5, "skip values");
        let gf = weighted_sum(&fused).backward().unwrap();
        let gr = weighted_sum(&reference).backward().unwrap();
        for (v, name) in [(&x, "∂x"), (&w, "∂W"), (&b, "∂b"), (&gate, "∂gate")] {
            close(gf.get(v).unwrap(), gr.get(v).unwrap(), 1e-4, name);
        }
        // A constant input (cached embeddings) gets no gradient and costs no product.
        let c = x.as_tensor().detach();
        let y = skip_connection_layer(&c, w.as_tensor(), b.as_tensor(), &gate)
            .unwrap()
            .unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        assert!(g.get(&c).is_none() && g.get(&w).is_some());
    }

    #[test]
    fn group_masks_and_hardest_pairs_match_the_composite_forms() {
        // Groups with a singleton (no positive) and, against `b`, a group absent from `b`.
        let a = Tensor::new(&[0i64, 1, 0, 2, 1, 3, 0], &Device::Cpu).unwrap();
        let b = Tensor::new(&[1i64, 0, 0, 2, 5], &Device::Cpu).unwrap();
        for other in [None, Some(&b)] {
            let m = other.map_or(7, |b| b.dim(0).unwrap());
            let (p, q) = group_masks(&a, other, DType::F32).unwrap().unwrap();
            // F64 takes the composite path.
            let (rp, rq) = crate::loss::masks::group_masks(&a, other, DType::F64).unwrap();
            close(&p, &rp.to_dtype(DType::F32).unwrap(), 0.0, "positive mask");
            close(&q, &rq.to_dtype(DType::F32).unwrap(), 0.0, "negative mask");

            let d = Tensor::from_vec(random((7, m), 10), (7, m), &Device::Cpu).unwrap();
            let (pi, ni, valid) = hardest_pairs(&d, &a, other).unwrap().unwrap();
            let big = 1e30;
            let want_p = ((&d * &rp.to_dtype(DType::F32).unwrap()).unwrap()
                + ((rp.to_dtype(DType::F32).unwrap() - 1.0).unwrap() * big).unwrap())
            .unwrap()
            .argmax(1)
            .unwrap()
            .to_vec1::<u32>()
            .unwrap();
            let want_n = ((&d * &q).unwrap() + ((1.0 - &q).unwrap() * big).unwrap())
                .unwrap()
                .argmin(1)
                .unwrap()
                .to_vec1::<u32>()
                .unwrap();
            let valid = valid.to_vec1::<f32>().unwrap();
            let (pi, ni) = (
                pi.flatten_all().unwrap().to_vec1::<u32>().unwrap(),
                ni.flatten_all().unwrap().to_vec1::<u32>().unwrap(),
            );
            let pv = p.to_vec2::<f32>().unwrap();
            let qv = q.to_vec2::<f32>().unwrap();
            for i in 0..7 {
                let has = pv[i].contains(&1.0) && qv[i].contains(&1.0);
                assert_eq!(valid[i], f32::from(u8::from(has)), "valid[{i}]");
                if has {
                    assert_eq!((pi[i], ni[i]), (want_p[i], want_n[i]), "anchor {i}");
                }
            }
        }
    }

    #[test]
    fn adam_kernel_matches_the_tensor_update() {
        use crate::train::{Optimizer, OptimizerConfig};
        let data = random((5, 4), 11);
        for config in [
            OptimizerConfig::adam(0.05),
            OptimizerConfig::Adam {
                lr: 0.05,
                weight_decay: 0.1,
            },
            OptimizerConfig::AdamW {
                lr: 0.05,
                weight_decay: 0.1,
            },
        ] {
            let run = |dtype: DType| {
                let v = Var::from_tensor(
                    &Tensor::from_slice(&data, (5, 4), &Device::Cpu)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap(),
                )
                .unwrap();
                let mut opt = Optimizer::new(config, vec![("w".into(), v.clone())], &[]).unwrap();
                for step in 0..4 {
                    // f(θ) = Σ c·θ³ with varying c: gradients change sign and size.
                    let c = 1.0 + step as f64 * 0.5;
                    let loss = (v.as_tensor().powf(3.0).unwrap() * c)
                        .unwrap()
                        .sum_all()
                        .unwrap();
                    opt.step(&loss.backward().unwrap(), 0.7, 0.9).unwrap();
                }
                let state = opt.state_tensors().unwrap();
                (
                    v.as_tensor().to_dtype(DType::F32).unwrap(),
                    state["m.w"].to_dtype(DType::F32).unwrap(),
                    state["v.w"].to_dtype(DType::F32).unwrap(),
                )
            };
            // F32 on the CPU takes the kernel, F64 the tensor update.
            let (fused, reference) = (run(DType::F32), run(DType::F64));
            close(&fused.0, &reference.0, 1e-5, "θ");
            close(&fused.1, &reference.1, 1e-5, "m");
            close(&fused.2, &reference.2, 1e-5, "v");
        }
    }
}

mod hard_mining {
    //! The fused batch-hard paths (`kernels::cosine_hardest` + `cosine_pairs`) of
    //! TripletLoss and OnlineContrastiveLoss against the composite ones (F64 takes them),
    //! values and gradients, in a batch and against a memory bank.
    use crate::data::GroupTargets;
    use crate::loss::{GroupKind, MemoryLoss, OnlineContrastiveLoss, SimilarityLoss, TripletLoss};
    use crate::nn::Params;
    use candle_core::{DType, Device, Tensor, Var};

    fn run<L: SimilarityLoss<Kind = GroupKind> + MemoryLoss>(
        n: usize,
        m: usize,
        groups: i64,
        dtype: DType,
    ) -> (f64, Vec<f64>) {
        use rand::{Rng, SeedableRng, rngs::StdRng};
        let dev = Device::Cpu;
        let mut rng = StdRng::seed_from_u64((n * 31 + m) as u64);
        let data: Vec<f64> = (0..(n + m) * 24)
            .map(|_| rng.random::<f64>() - 0.5)
            .collect();
        let x = Tensor::from_vec(data, (n + m, 24), &dev).unwrap();
        let (batch, memory) = (x.narrow(0, 0, n).unwrap(), x.narrow(0, n, m).unwrap());
        let v = Var::from_tensor(&batch.to_dtype(dtype).unwrap()).unwrap();
        let g: Vec<i64> = (0..n as i64).map(|i| (i * 7) % groups).collect();
        let mg: Vec<i64> = (0..m as i64).map(|i| (i * 3) % (groups + 2)).collect();
        let targets = GroupTargets {
            groups: Tensor::new(g.as_slice(), &dev).unwrap(),
        };
        let mut params = Params::new(&dev, 0);
        let loss = L::new(24, L::Config::default(), &mut params.scope("l")).unwrap();
        let mut l = loss.forward(v.as_tensor(), &targets).unwrap();
        if m > 0 {
            let mem = memory.to_dtype(dtype).unwrap();
            let mem_g = Tensor::new(mg.as_slice(), &dev).unwrap();
            l = (l + loss
                .forward_memory(v.as_tensor(), &targets.groups, &mem, &mem_g)
                .unwrap())
            .unwrap();
        }
        super::loss_and_grad(&l, &v)
    }

    fn assert_fused_matches<L: SimilarityLoss<Kind = GroupKind> + MemoryLoss>() {
        // Small groups (anchors without positives), a batch larger than a mining block, and
        // a memory bank.
        for (n, m, groups) in [(9, 0, 4), (300, 0, 100), (64, 700, 10), (2000, 0, 100)] {
            let (lf, gf) = run::<L>(n, m, groups, DType::F32);
            let (lr, gr) = run::<L>(n, m, groups, DType::F64);
            assert!(
                (lf - lr).abs() < 1e-5 * (1.0 + lr.abs()),
                "{} n={n} m={m}: {lf} vs {lr}",
                L::NAME
            );
            let worst = gf
                .iter()
                .zip(&gr)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            let scale = gr.iter().map(|v| v.abs()).fold(0.0, f64::max);
            assert!(
                worst <= 1e-4 * scale.max(1e-6),
                "{} n={n} m={m}: gradient off by {worst} (max {scale})",
                L::NAME
            );
        }
    }

    #[test]
    fn fused_triplet_hard_mining_matches_the_composite_path() {
        assert_fused_matches::<TripletLoss>();
    }

    #[test]
    fn fused_online_contrastive_hard_mining_matches_the_composite_path() {
        assert_fused_matches::<OnlineContrastiveLoss>();
    }
}

mod pair_losses {
    //! MultipleNegativesRankingLoss and the contrastive subgroup term: the fused f32 paths
    //! against the composite ones (F64 takes them).
    use crate::data::PairTargets;
    use crate::loss::{
        MultipleNegativesRankingLoss, MultipleNegativesRankingLossConfig, PairKind, SimilarityLoss,
    };
    use crate::nn::Params;
    use candle_core::{DType, Device, Tensor, Var};
    use rand::{Rng, SeedableRng, rngs::StdRng};

    fn data(rows: usize, seed: u64) -> Tensor {
        let mut rng = StdRng::seed_from_u64(seed);
        let v: Vec<f64> = (0..rows * 16).map(|_| rng.random::<f64>() - 0.5).collect();
        Tensor::from_vec(v, (rows, 16), &Device::Cpu).unwrap()
    }

    /// The loss of `x` (cast to `dtype`) and its gradient: F32 takes the fused kernels,
    /// F64 the composite path.
    fn value_and_grad<L: SimilarityLoss<Kind = PairKind>>(
        config: &L::Config,
        x: &Tensor,
        targets: &PairTargets,
        dtype: DType,
    ) -> (f64, Vec<f64>) {
        let v = Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap();
        let mut params = Params::new(&Device::Cpu, 0);
        let loss = L::new(16, config.clone(), &mut params.scope("l")).unwrap();
        let l = loss.forward(v.as_tensor(), targets).unwrap();
        super::loss_and_grad(&l, &v)
    }

    /// The fused and the composite path agree on the loss and its gradient.
    fn assert_fused_matches<L: SimilarityLoss<Kind = PairKind>>(
        config: L::Config,
        x: &Tensor,
        targets: &PairTargets,
    ) {
        let (lf, gf) = value_and_grad::<L>(&config, x, targets, DType::F32);
        let (lr, gr) = value_and_grad::<L>(&config, x, targets, DType::F64);
        assert!((lf - lr).abs() < 1e-5 * (1.0 + lr.abs()), "{lf} vs {lr}");
        for (a, b) in gf.iter().zip(&gr) {
            assert!((a - b).abs() < 1e-5, "gradient {a} vs {b}");
        }
    }

    /// Pairs `(i, i + n)` with the given scores and subgroups.
    fn pair_targets(n: usize, labels: &[f32], subgroups: &[i64]) -> PairTargets {
        let pairs: Vec<u32> = (0..n as u32).flat_map(|i| [i, i + n as u32]).collect();
        PairTargets {
            pairs: Tensor::from_vec(pairs, (n, 2), &Device::Cpu).unwrap(),
            labels: Tensor::new(labels, &Device::Cpu).unwrap(),
            subgroups: Tensor::new(subgroups, &Device::Cpu).unwrap(),
        }
    }

    #[test]
    fn fused_mnrl_matches_the_composite_path() {
        // 300 pairs: the exponential sweep runs in parallel blocks; scale 50: above
        // FIXED_SHIFT_MAX, the max-shifted passes.
        for (n, scale) in [(37, 20.0), (300, 20.0), (37, 50.0)] {
            let targets = pair_targets(n, &vec![1.0; n], &vec![0; 2 * n]);
            for symmetric in [false, true] {
                let config = MultipleNegativesRankingLossConfig {
                    symmetric,
                    scale,
                    ..Default::default()
                };
                let x = data(2 * n, 1);
                assert_fused_matches::<MultipleNegativesRankingLoss>(config.clone(), &x, &targets);
                // Without a gradient to compute (a validation pass), the same value.
                let mut params = Params::new(&Device::Cpu, 0);
                let loss =
                    MultipleNegativesRankingLoss::new(16, config, &mut params.scope("l")).unwrap();
                let value = |x: &Tensor| {
                    loss.forward(x, &targets)
                        .unwrap()
                        .to_dtype(DType::F64)
                        .unwrap()
                        .to_scalar::<f64>()
                        .unwrap()
                };
                let (fused, composite) = (value(&x.to_dtype(DType::F32).unwrap()), value(&x));
                assert!((fused - composite).abs() < 1e-5 * (1.0 + composite.abs()));
            }
        }
    }

    #[test]
    fn fused_mnrl_reads_pairs_in_any_layout() {
        // Pairs not in the (i, P + i) layout: rows in any order, some used twice or by both
        // sides, some unused; the gradients of a reused row are summed.
        let (rows, n) = (50usize, 29usize);
        let mut rng = StdRng::seed_from_u64(5);
        let pairs: Vec<u32> = (0..2 * n)
            .map(|_| rng.random_range(0..rows as u32))
            .collect();
        let targets = PairTargets {
            pairs: Tensor::from_vec(pairs, (n, 2), &Device::Cpu).unwrap(),
            labels: Tensor::new(vec![1.0f32; n].as_slice(), &Device::Cpu).unwrap(),
            subgroups: Tensor::new(vec![0i64; n].as_slice(), &Device::Cpu).unwrap(),
        };
        // The (i, P + i) layout with rows after the pairs that no pair uses.
        let halves_short = pair_targets(n, &vec![1.0; n], &vec![0; 2 * n]);
        let (x, x_long) = (data(rows, 2), data(2 * n + 5, 3));
        for symmetric in [false, true] {
            let config = MultipleNegativesRankingLossConfig {
                symmetric,
                ..Default::default()
            };
            assert_fused_matches::<MultipleNegativesRankingLoss>(config.clone(), &x, &targets);
            assert_fused_matches::<MultipleNegativesRankingLoss>(config, &x_long, &halves_short);
        }
    }

    #[test]
    fn fused_contrastive_subgroup_term_matches_the_composite_path() {
        use crate::loss::{ContrastiveLoss, ContrastiveLossConfig};
        let n = 23;
        let labels: Vec<f32> = (0..n).map(|i| (i % 3) as f32 / 2.0).collect();
        // Pair partners share a subgroup; subgroup 4 has one pair only. With a single
        // subgroup the term is absent on both paths.
        let sub: Vec<i64> = (0..2 * n).map(|k| ((k % n) % 5) as i64).collect();
        for subgroups in [sub, vec![7i64; 2 * n]] {
            let targets = pair_targets(n, &labels, &subgroups);
            assert_fused_matches::<ContrastiveLoss>(
                ContrastiveLossConfig::default(),
                &data(2 * n, 4),
                &targets,
            );
        }
    }
}

mod sum_of_squares {
    use super::super::*;

    #[test]
    fn sum_of_squares_matches_the_composite_form() {
        for n in [0usize, 5, 70_001] {
            let v: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.37).sin()).collect();
            let t = Tensor::from_vec(v, n, &candle_core::Device::Cpu).unwrap();
            let got = sum_of_squares(&t).unwrap().unwrap();
            let want = t
                .to_dtype(DType::F64)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(
                (got - want).abs() <= 1e-5 * want.max(1.0),
                "{n}: {got} vs {want}"
            );
        }
        let t = Tensor::new(&[1.0f32, f32::NAN], &candle_core::Device::Cpu).unwrap();
        assert!(sum_of_squares(&t).unwrap().unwrap().is_nan());
    }
}

mod group_matrix {
    //! The losses of `kernels::group_loss` (CircleLoss per anchor and pooled,
    //! MultiSimilarityLoss mined and unmined, SupConLoss, OnlineContrastiveLoss `all` with
    //! both reductions, FastAPLoss): the fused f32 paths against the composite ones (F64
    //! takes them), values and gradients, in a batch and against a memory bank.
    use crate::data::GroupTargets;
    use crate::loss::*;
    use crate::nn::Params;
    use candle_core::{DType, Device, Tensor, Var};

    /// A loss's memory form: `(loss, x, groups, memory, memory groups) → L`.
    type MemoryForm<'a, L> = &'a dyn Fn(&L, &Tensor, &Tensor, &Tensor, &Tensor) -> Tensor;

    /// The loss (plus its memory form when `m > 0`) and its gradient on fixed data.
    fn run<L: SimilarityLoss<Kind = GroupKind>>(
        config: &L::Config,
        memory: Option<MemoryForm<L>>,
        (n, m, groups): (usize, usize, i64),
        dtype: DType,
    ) -> (f64, Vec<f64>) {
        use rand::{Rng, SeedableRng, rngs::StdRng};
        let dev = Device::Cpu;
        let mut rng = StdRng::seed_from_u64((n * 31 + m) as u64 + groups as u64);
        let data: Vec<f64> = (0..(n + m) * 24)
            .map(|_| rng.random::<f64>() - 0.5)
            .collect();
        let x = Tensor::from_vec(data, (n + m, 24), &dev).unwrap();
        let (batch, mem) = (x.narrow(0, 0, n).unwrap(), x.narrow(0, n, m).unwrap());
        let v = Var::from_tensor(&batch.to_dtype(dtype).unwrap()).unwrap();
        let g: Vec<i64> = (0..n as i64).map(|i| (i * 7) % groups).collect();
        let mg: Vec<i64> = (0..m as i64).map(|i| (i * 3) % (groups + 2)).collect();
        let targets = GroupTargets {
            groups: Tensor::new(g.as_slice(), &dev).unwrap(),
        };
        let mut params = Params::new(&dev, 0);
        let loss = L::new(24, config.clone(), &mut params.scope("l")).unwrap();
        let mut l = loss.forward(v.as_tensor(), &targets).unwrap();
        if let Some(f) = memory.filter(|_| m > 0) {
            let mem = mem.to_dtype(dtype).unwrap();
            let mem_g = Tensor::new(mg.as_slice(), &dev).unwrap();
            l = (l + f(&loss, v.as_tensor(), &targets.groups, &mem, &mem_g)).unwrap();
        }
        super::loss_and_grad(&l, &v)
    }

    /// Small groups (anchors without positives), a batch larger than one parallel block
    /// and than one tile of the cosine matrix, a memory bank, and a batch of one group (no
    /// negatives).
    const SHAPES: [(usize, usize, i64); 5] = [
        (9, 0, 4),
        (300, 0, 100),
        (64, 200, 10),
        (700, 0, 30),
        (12, 0, 1),
    ];

    fn assert_matches<L: SimilarityLoss<Kind = GroupKind>>(
        what: &str,
        config: L::Config,
        memory: Option<MemoryForm<L>>,
    ) {
        assert_matches_on(what, config, memory, &SHAPES);
    }

    fn assert_matches_on<L: SimilarityLoss<Kind = GroupKind>>(
        what: &str,
        config: L::Config,
        memory: Option<MemoryForm<L>>,
        shapes: &[(usize, usize, i64)],
    ) {
        for &shape in shapes {
            let (lf, gf) = run::<L>(&config, memory, shape, DType::F32);
            let (lr, gr) = run::<L>(&config, memory, shape, DType::F64);
            assert!(
                (lf - lr).abs() < 2e-5 * (1.0 + lr.abs()),
                "{what} {shape:?}: {lf} vs {lr}"
            );
            let worst = gf
                .iter()
                .zip(&gr)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            let scale = gr.iter().map(|v| v.abs()).fold(0.0, f64::max);
            // The floor: a gradient that is zero in exact arithmetic (one group: every
            // FastAP is 1) is f32 round-off on the fused side.
            assert!(
                worst <= 2e-4 * scale.max(1e-3),
                "{what} {shape:?}: gradient off by {worst} (max {scale})"
            );
        }
    }

    fn mem<L: MemoryLoss>(l: &L, x: &Tensor, g: &Tensor, y: &Tensor, gy: &Tensor) -> Tensor {
        l.forward_memory(x, g, y, gy).unwrap()
    }

    #[test]
    fn memory_side_with_a_gradient_matches_the_composite_form() {
        // A memory that is itself a variable (not a detached bank): its gradient too.
        use rand::{Rng, SeedableRng, rngs::StdRng};
        let dev = Device::Cpu;
        let mut rng = StdRng::seed_from_u64(5);
        let (n, m, d) = (40, 70, 12);
        let data: Vec<f64> = (0..(n + m) * d)
            .map(|_| rng.random::<f64>() - 0.5)
            .collect();
        let g: Vec<i64> = (0..n as i64).map(|i| i % 6).collect();
        let mg: Vec<i64> = (0..m as i64).map(|i| i % 8).collect();
        let run = |dtype: DType| {
            let x = Tensor::from_vec(data.clone(), (n + m, d), &dev).unwrap();
            let a = Var::from_tensor(&x.narrow(0, 0, n).unwrap().to_dtype(dtype).unwrap()).unwrap();
            let b = Var::from_tensor(&x.narrow(0, n, m).unwrap().to_dtype(dtype).unwrap()).unwrap();
            let loss = SupConLoss::new(d, Default::default(), &mut Params::new(&dev, 0).scope("l"))
                .unwrap();
            let l = loss
                .forward_memory(
                    a.as_tensor(),
                    &Tensor::new(g.as_slice(), &dev).unwrap(),
                    b.as_tensor(),
                    &Tensor::new(mg.as_slice(), &dev).unwrap(),
                )
                .unwrap();
            let grads = l.backward().unwrap();
            let flat = |v: &Var| {
                grads
                    .get(v)
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()
            };
            (flat(&a), flat(&b))
        };
        let (fa, fb) = run(DType::F32);
        let (ra, rb) = run(DType::F64);
        for (what, f, r) in [("batch", fa, ra), ("memory", fb, rb)] {
            let worst = f
                .iter()
                .zip(&r)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f64::max);
            let scale = r.iter().map(|v| v.abs()).fold(0.0, f64::max);
            assert!(
                worst <= 2e-4 * scale.max(1e-3),
                "{what}: off by {worst} (max {scale})"
            );
        }
    }

    #[test]
    fn circle_loss_matches_the_composite_form() {
        for pooled in [false, true] {
            // γ = 256 is sharp enough that the pooled form's gradient sits on a few pairs;
            // γ = 8 spreads it.
            for scale_factor in [256.0, 8.0] {
                let config = CircleLossConfig {
                    pooled,
                    scale_factor,
                    ..Default::default()
                };
                assert_matches::<CircleLoss>(
                    &format!("circle pooled={pooled} γ={scale_factor}"),
                    config,
                    Some(&mem::<CircleLoss>),
                );
            }
        }
    }

    #[test]
    fn multi_similarity_loss_matches_the_composite_form() {
        for epsilon in [Some(0.1), None] {
            let config = MultiSimilarityLossConfig {
                epsilon,
                ..Default::default()
            };
            assert_matches::<MultiSimilarityLoss>(
                &format!("ms ε={epsilon:?}"),
                config,
                Some(&mem::<MultiSimilarityLoss>),
            );
        }
    }

    #[test]
    fn supcon_loss_matches_the_composite_form() {
        for temperature in [0.1, 1.0] {
            assert_matches::<SupConLoss>(
                &format!("supcon τ={temperature}"),
                SupConLossConfig { temperature },
                Some(&mem::<SupConLoss>),
            );
        }
    }

    #[test]
    fn online_contrastive_all_matches_the_composite_form() {
        for reduction in [None, Some(Reduction::MeanNonZero)] {
            for margin in [0.5, 1.2] {
                let config = OnlineContrastiveLossConfig {
                    mining: PairMining::All,
                    margin,
                    reduction,
                    ..Default::default()
                };
                assert_matches::<OnlineContrastiveLoss>(
                    &format!("ocl all {reduction:?} margin={margin}"),
                    config,
                    Some(&mem::<OnlineContrastiveLoss>),
                );
            }
        }
    }

    #[test]
    fn triplet_all_matches_the_composite_form() {
        for reduction in [None, Some(Reduction::Mean)] {
            for margin in [0.5, 0.05] {
                let config = TripletLossConfig {
                    mining: TripletMining::All,
                    margin,
                    reduction,
                    ..Default::default()
                };
                // The composite form holds (n, m, m) tensors: small shapes only.
                assert_matches_on::<TripletLoss>(
                    &format!("triplet all {reduction:?} margin={margin}"),
                    config,
                    Some(&mem::<TripletLoss>),
                    &[(9, 0, 4), (150, 0, 10), (40, 90, 10), (12, 0, 1)],
                );
            }
        }
    }

    #[test]
    fn fast_ap_loss_matches_the_composite_form() {
        for num_bins in [10, 3, 40] {
            assert_matches::<FastAPLoss>(
                &format!("fastap bins={num_bins}"),
                FastAPLossConfig { num_bins },
                None,
            );
        }
    }
}

mod class_losses {
    //! The class-logit losses (SoftmaxLoss, ArcFaceLoss, CosFaceLoss: `kernels::class_loss`'s
    //! cross-entropy) and CenterLoss (`center_distance`): the fused f32 paths against the
    //! composite ones (F64 embeddings take them), values and the gradients of the
    //! embeddings and of the trained table.
    use crate::data::GroupTargets;
    use crate::loss::*;
    use crate::nn::Params;
    use candle_core::{DType, Device, Tensor, Var};
    use rand::{Rng, SeedableRng, rngs::StdRng};

    /// Loss, `∂L/∂x` and `∂L/∂table` (flattened, f64) with the table set to `table`.
    fn run<L: SimilarityLoss<Kind = GroupKind>>(
        config: &L::Config,
        table: &Tensor,
        (n, d, c): (usize, usize, usize),
        dtype: DType,
    ) -> (f64, Vec<f64>, Vec<f64>) {
        let dev = Device::Cpu;
        let mut rng = StdRng::seed_from_u64((n * 13 + d) as u64);
        let data: Vec<f64> = (0..n * d).map(|_| rng.random::<f64>() - 0.5).collect();
        let x = Tensor::from_vec(data, (n, d), &dev).unwrap();
        let v = Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap();
        let g: Vec<i64> = (0..n as i64).map(|i| (i * 5) % c as i64).collect();
        let targets = GroupTargets {
            groups: Tensor::new(g.as_slice(), &dev).unwrap(),
        };
        let mut params = Params::new(&dev, 0);
        let loss = L::new(d, config.clone(), &mut params.scope("l")).unwrap();
        let vars = params.named_vars();
        let var = vars.values().next().unwrap();
        var.set(table).unwrap();
        let l = loss.forward(v.as_tensor(), &targets).unwrap();
        let grads = l.backward().unwrap();
        let flat = |t: &Tensor| {
            t.to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
        };
        (
            l.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap(),
            flat(grads.get(&v).unwrap()),
            flat(grads.get(var).unwrap()),
        )
    }

    fn assert_close(what: &str, f: &[f64], r: &[f64]) {
        let worst = f
            .iter()
            .zip(r)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        let scale = r.iter().map(|v| v.abs()).fold(0.0, f64::max);
        assert!(
            worst <= 2e-4 * scale.max(1e-3),
            "{what}: gradient off by {worst} (max {scale})"
        );
    }

    /// `config(c)` for `c` classes, the trained table of shape `table(d, c)`: fused against
    /// composite on a few shapes (`n`, `d`, `c`).
    fn assert_matches<L: SimilarityLoss<Kind = GroupKind>>(
        what: &str,
        config: impl Fn(usize) -> L::Config,
        table: impl Fn(usize, usize) -> (usize, usize),
    ) {
        for (n, d, c) in [(7, 5, 3), (300, 24, 40), (64, 16, 100)] {
            let config = config(c);
            let shape = table(d, c);
            let mut rng = StdRng::seed_from_u64(c as u64);
            let t: Vec<f32> = (0..shape.0 * shape.1)
                .map(|_| rng.random::<f32>() - 0.5)
                .collect();
            let t = Tensor::from_vec(t, shape, &Device::Cpu).unwrap();
            let (lf, xf, tf) = run::<L>(&config, &t, (n, d, c), DType::F32);
            let (lr, xr, tr) = run::<L>(&config, &t, (n, d, c), DType::F64);
            assert!(
                (lf - lr).abs() < 2e-5 * (1.0 + lr.abs()),
                "{what} n={n}: {lf} vs {lr}"
            );
            assert_close(&format!("{what} n={n} ∂x"), &xf, &xr);
            assert_close(&format!("{what} n={n} ∂table"), &tf, &tr);
        }
    }

    #[test]
    fn softmax_loss_matches_the_composite_form() {
        for temperature in [0.05, 1.0] {
            assert_matches::<SoftmaxLoss>(
                &format!("softmax τ={temperature}"),
                |num_groups| SoftmaxLossConfig {
                    num_groups,
                    temperature,
                },
                |d, c| (d, c),
            );
        }
    }

    #[test]
    fn arcface_loss_matches_the_composite_form() {
        for (scale, margin) in [(64.0, 0.5), (4.0, 1.2)] {
            assert_matches::<ArcFaceLoss>(
                &format!("arcface s={scale} m={margin}"),
                |num_groups| ArcFaceLossConfig {
                    num_groups,
                    scale,
                    margin,
                },
                |d, c| (d, c),
            );
        }
    }

    #[test]
    fn cosface_loss_matches_the_composite_form() {
        for (scale, margin) in [(64.0, 0.35), (4.0, 0.0)] {
            assert_matches::<CosFaceLoss>(
                &format!("cosface s={scale} m={margin}"),
                |num_groups| CosFaceLossConfig {
                    num_groups,
                    scale,
                    margin,
                },
                |d, c| (d, c),
            );
        }
    }

    #[test]
    fn center_loss_matches_the_composite_form() {
        assert_matches::<CenterLoss>(
            "center",
            |num_groups| CenterLossConfig {
                num_groups,
                lambda_c: 0.5,
            },
            |d, c| (c, d),
        );
    }
}
