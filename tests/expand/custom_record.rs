// Input of the expansion snapshot `snapshots/custom_record.snap`: the user's own record
// type, each encoder reading its input through a function, one with a custom cache key.
#[trainable_model(record = Product)]
pub struct ProductModel {
    #[encoder(cache = "cpu", input = Product::title, key = str::to_lowercase)]
    title: HashedNgramEncoder,
    #[encoder(cache = "auto", input = Product::description)]
    description: Frozen<HashedNgramEncoder>,
    #[head]
    head: SkipConnectionHead,
    #[loss(scale = 20.0)]
    loss: MultipleNegativesRankingLoss,
}
