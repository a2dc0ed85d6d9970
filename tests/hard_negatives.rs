//! Hard negatives mined from the cache during training (`TrainerConfig::hard_negatives`).

mod common;

use similarity_core::prelude::*;
use similarity_core::train::hard_negatives::{HardNegatives, mine_groups};

#[trainable_model]
struct TextModel {
    #[encoder(cache = "auto")]
    text: HashedNgramEncoder,
    #[head]
    head: SkipConnectionHead,
    #[loss(scale = 20.0, symmetric = true)]
    loss: MultipleNegativesRankingLoss,
}

#[trainable_model]
struct ScoredModel {
    #[encoder(cache = "auto")]
    text: HashedNgramEncoder,
    #[head]
    head: SkipConnectionHead,
    #[loss]
    loss: ContrastiveLoss,
}

#[trainable_model]
struct GroupModel {
    #[encoder(cache = "auto")]
    text: HashedNgramEncoder,
    #[head]
    head: SkipConnectionHead,
    #[loss(mining = TripletMining::Hard)]
    loss: TripletLoss,
}

/// 8 topics, 3 phrasings each: group = topic.
fn groups() -> Vec<SimilarityGroupSample<String>> {
    let topics = [
        "disk", "snapshot", "billing", "network", "backup", "login", "quota", "region",
    ];
    let forms = [
        "how do I change the {} setting?",
        "where is the {} page in the console",
        "the {} limits of my account",
    ];
    forms
        .iter()
        .flat_map(|f| {
            topics
                .iter()
                .enumerate()
                .map(move |(g, t)| SimilarityGroupSample::new(f.replace("{}", t), g as i64))
        })
        .collect()
}

fn pairs() -> Vec<SimilarityPairSample<String>> {
    let topics = ["disk", "snapshot", "billing", "network", "backup", "login"];
    (0..24)
        .map(|i| {
            let t = topics[i % topics.len()];
            SimilarityPairSample::positive(
                format!("how do I change the {t} setting number {i}?"),
                format!("the {t} setting {i} is changed in the {t} console page"),
            )
        })
        .collect()
}

/// Trains `model` 3 epochs on `data` (batches of 6) and returns its weights.
fn train<M: TrainableModel>(
    mut model: M,
    data: &[similarity_core::train::SampleOf<M>],
    hard_negatives: Option<HardNegatives>,
) -> Vec<Vec<f32>> {
    let config = TrainerConfig {
        epochs: 3,
        batch_size: 6,
        progress: false,
        hard_negatives,
        ..Default::default()
    };
    Trainer::new(config).fit(&mut model, data, None).unwrap();
    common::weights(&model)
}

fn fit(hard_negatives: Option<HardNegatives>) -> Vec<Vec<f32>> {
    let model = TextModel::new(HashedNgramEncoder::default(), &common::options()).unwrap();
    train(model, &pairs(), hard_negatives)
}

fn fit_groups(hard_negatives: Option<HardNegatives>) -> Vec<Vec<f32>> {
    let model = GroupModel::new(HashedNgramEncoder::default(), &common::options()).unwrap();
    train(model, &groups(), hard_negatives)
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

/// For pair data (MNRL) and group data (TripletLoss): a guard that lets nothing through
/// gives no batch a negative, so training is the plain one exactly; mining every epoch, 2
/// negatives per query, takes another path.
#[test]
fn mined_negatives_change_training_and_an_empty_mine_does_not() {
    type Fit = fn(Option<HardNegatives>) -> Vec<Vec<f32>>;
    let fits: [(&str, Fit); 2] = [("pairs", fit), ("groups", fit_groups)];
    for (data, fit) in fits {
        let plain = fit(None);
        let none = fit(Some(HardNegatives {
            relative_margin: None,
            max_score: Some(-10.0),
            ..Default::default()
        }));
        assert_eq!(max_diff(&plain, &none), 0.0, "{data}");
        let mined = fit(Some(HardNegatives {
            num_negatives: 2,
            ..Default::default()
        }));
        assert!(max_diff(&plain, &mined) > 1e-4, "{data}");
        assert!(mined.iter().flatten().all(|w| w.is_finite()), "{data}");
    }
}

/// Each epoch that mines says so in the report (cost, negatives found, guarded); the
/// others carry nothing.
#[test]
fn the_report_carries_each_mining_pass() {
    let mut model = GroupModel::new(HashedNgramEncoder::default(), &common::options()).unwrap();
    let config = TrainerConfig {
        epochs: 3,
        batch_size: 6,
        progress: false,
        hard_negatives: Some(HardNegatives {
            every_epochs: 2,
            num_negatives: 2,
            ..Default::default()
        }),
        ..Default::default()
    };
    let report = Trainer::new(config)
        .fit(&mut model, &groups(), None)
        .unwrap();
    let mined: Vec<bool> = report.epochs.iter().map(|e| e.mining.is_some()).collect();
    assert_eq!(mined, [true, false, true]);
    for e in &report.epochs {
        if let Some(m) = &e.mining {
            // 24 objects, 2 negatives each where the guard leaves them.
            assert!(m.negatives > 0 && m.negatives <= 48, "{m:?}");
            assert!(
                m.seconds >= m.mine_seconds && m.mine_seconds >= 0.0,
                "{m:?}"
            );
        }
    }
}

#[test]
fn a_loss_without_negatives_and_bad_options_are_errors() {
    let mut model = ScoredModel::new(HashedNgramEncoder::default(), &common::options()).unwrap();
    let config = TrainerConfig {
        epochs: 1,
        batch_size: 6,
        progress: false,
        hard_negatives: Some(HardNegatives::default()),
        ..Default::default()
    };
    let err = Trainer::new(config)
        .fit(&mut model, &pairs(), None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("ContrastiveLoss") && err.contains("hard_negatives"),
        "{err}"
    );

    let mut model = TextModel::new(HashedNgramEncoder::default(), &common::options()).unwrap();
    let config = TrainerConfig {
        progress: false,
        hard_negatives: Some(HardNegatives {
            every_epochs: 0,
            ..Default::default()
        }),
        ..Default::default()
    };
    let err = Trainer::new(config)
        .fit(&mut model, &pairs(), None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("TrainerConfig.hard_negatives.every_epochs"),
        "{err}"
    );
}

/// The first step's batch, as the step hook saw it, is its sampled objects followed by
/// exactly the objects `mine_groups` picks for them from the untrained model, with their
/// groups, and its loss is TripletLoss's plain forward over that enlarged batch.
#[test]
fn a_group_batch_carries_the_objects_mined_for_its_members() {
    let data = groups();
    let options = HardNegatives {
        num_negatives: 2,
        ..Default::default()
    };
    let mut model = GroupModel::new(HashedNgramEncoder::default(), &common::options()).unwrap();
    let texts: Vec<String> = data.iter().map(|s| s.obj.clone()).collect();
    let all = model.encode(&texts, 64).unwrap();
    let group_ids: Vec<i64> = data.iter().map(|s| s.group).collect();
    let mined = mine_groups(&all, &group_ids, model.loss().distance(), &options).unwrap();
    let all = all.to_vec2::<f32>().unwrap();

    let config = TrainerConfig {
        epochs: 1,
        batch_size: 6,
        progress: false,
        hard_negatives: Some(options),
        ..Default::default()
    };
    let mut seen = Vec::new();
    Trainer::new(config)
        .fit_with_hook(&mut model, &data, None, &mut |out| {
            seen.push((
                out.step,
                out.embeddings.clone(),
                out.targets.clone(),
                out.loss,
            ));
        })
        .unwrap();
    assert_eq!(seen.len(), 4);
    let (_, embeddings, targets, loss) = &seen[0];
    // Which object each row is: the untrained model's embeddings are the step's.
    let rows: Vec<usize> = embeddings
        .to_vec2::<f32>()
        .unwrap()
        .iter()
        .map(|row| {
            let d = |i: usize| -> f32 { row.iter().zip(&all[i]).map(|(a, b)| (a - b).abs()).sum() };
            let best = (0..all.len())
                .min_by(|&a, &b| d(a).total_cmp(&d(b)))
                .unwrap();
            assert!(d(best) < 1e-4, "row matches no object ({})", d(best));
            best
        })
        .collect();
    let expected = mined.batch_negatives(&rows[..6]);
    assert!(!expected.is_empty());
    assert_eq!(rows[6..], expected[..]);
    let batch_groups: Vec<i64> = targets.groups.to_vec1().unwrap();
    let want: Vec<i64> = rows.iter().map(|&i| group_ids[i]).collect();
    assert_eq!(batch_groups, want);
    let direct = model
        .loss()
        .forward(embeddings, targets)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    assert!((direct - loss).abs() < 1e-6, "{direct} against {loss}");
    // Every later batch is larger than its 6 samples too (each gets mined objects).
    for (step, e, _, _) in &seen {
        assert!(e.dim(0).unwrap() > 6, "step {step}: {:?}", e.dims());
    }
}
