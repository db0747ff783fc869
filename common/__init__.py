"""fedfraud's library: config, data, model, the train/score loops, metrics, record keys."""
