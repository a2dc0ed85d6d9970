// Input of the expansion snapshot `snapshots/*mixed_model.snap`: a cached frozen
// encoder with a custom key next to a trainable encoder.
#[trainable_model]
pub struct ProductModel {
    #[encoder(cache = "cpu", key = product_id)]
    title: Frozen<TitleEncoder>,
    #[encoder]
    photo: SmallCnn,
    #[head]
    head: SkipConnectionHead,
    #[loss]
    loss: MultipleNegativesRankingLoss,
}
