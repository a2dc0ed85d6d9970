//! Hard negatives mined from the cache during training (`TrainerConfig::hard_negatives`).

mod common;

use similarity_core::prelude::*;
use similarity_core::train::hard_negatives::HardNegatives;

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

fn fit(hard_negatives: Option<HardNegatives>) -> Vec<Vec<f32>> {
    let mut model = TextModel::new(HashedNgramEncoder::default(), &common::options()).unwrap();
    let config = TrainerConfig {
        epochs: 3,
        batch_size: 6,
        progress: false,
        hard_negatives,
        ..Default::default()
    };
    Trainer::new(config)
        .fit(&mut model, &pairs(), None)
        .unwrap();
    model
        .state()
        .named_trainable_vars()
        .into_iter()
        .map(|(_, v)| {
            v.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect()
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

#[test]
fn mined_negatives_change_training_and_an_empty_mine_does_not() {
    let plain = fit(None);
    // A guard that lets nothing through: no batch gets a negative, so training is the
    // plain one exactly.
    let none = fit(Some(HardNegatives {
        relative_margin: None,
        max_score: Some(-10.0),
        ..Default::default()
    }));
    assert_eq!(max_diff(&plain, &none), 0.0);
    // Mining every epoch, 2 negatives per query: a different optimisation path.
    let mined = fit(Some(HardNegatives {
        num_negatives: 2,
        ..Default::default()
    }));
    assert!(max_diff(&plain, &mined) > 1e-4);
    for w in mined.iter().flatten() {
        assert!(w.is_finite());
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
