"""Train, then evaluate: the one step that needs both `train` and `evaluate`, kept above them so
neither imports the other (used by the CLI, the demo and ablations)."""

from __future__ import annotations

import ml_collections

from genclip_jax import evaluate, train, validate


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains, then evaluates the final checkpoint on `data.test_root` (if set) into
    `<workdir>/eval/<name of the test root>/`. The test set and the output folder are checked
    before training, so a bad test set does not cost a training run."""
    validate.validate(config, "train")
    if config.data.test_root:
        evaluate.prepare_target(config, workdir)
    train.train(config, workdir)
    if not config.data.test_root:
        return {}
    return evaluate.evaluate(config, workdir)
