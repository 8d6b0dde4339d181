"""What the tool knows about models: transformers module trees built from a config
(``architecture``: seeded inits, meta-device models, saved names -> modules) and the layer that
runs a low-rank update (``layers.LowRankLinear``)."""
