"""The embedded benchmark: the shapes miniature (procedural scenes and captions, `shapes`), its autoencoder
(`autoencoder`, the `builtin-ae` latent space), the evaluation (a feature network for FD, `features`; a
compositional detector, `detector`; FD, scores, latency and PNG grids, `evaluate`) and `sprintjax demo`
(`demo`). It uses the library core and the trainer; nothing in the core imports it.
"""
