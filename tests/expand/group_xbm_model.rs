// Input of the expansion snapshot `snapshots/group_xbm_model.snap`: a group loss with
// cross-batch memory, metrics and the model's own optimiser.
#[trainable_model(optimizer = OptimizerConfig::adam(1e-3))]
pub struct DigitsModel {
    #[encoder(cache = "auto")]
    pixels: Frozen<PixelEncoder>,
    #[head(n_layers = 2)]
    head: SkipConnectionHead,
    #[loss(margin = 0.5, mining = TripletMining::Hard)]
    loss: TripletLoss,
    #[xbm(size = 4096, weight = 1.0, start_iteration = 100)]
    memory: Xbm,
    #[metric(k = 1, prog_bar)]
    precision: RetrievalPrecision,
    #[metric]
    map: MapAtR,
}
