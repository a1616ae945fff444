"""data/tfds package."""
