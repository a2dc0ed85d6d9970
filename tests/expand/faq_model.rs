// Input of the expansion snapshot `snapshots/*faq_model.snap`: the README's model.
#[trainable_model]
pub struct FaqModel {
    /// Lexical text encoder; its embeddings are computed once and cached.
    #[encoder(cache = "auto")]
    text: HashedNgramEncoder,
    #[head(n_layers = 1)]
    head: SkipConnectionHead,
    #[loss(scale = 20.0, symmetric = true)]
    loss: MultipleNegativesRankingLoss,
}
