"""Measuring the ensemble: metrics and attacks (`metrics`), TOFU's forget-quality and truth ratios (`tofu`),
the monolithic baseline (`baseline`), the evaluation itself and the before-deletion snapshot (`evaluate`), and
its reports (`report`). Imports: `core`, `data`, `models`, `training`, `inference`."""
