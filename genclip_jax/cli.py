"""`genclip-jax COMMAND [flags]`: a thin shell over train / evaluate / predict / convert / data.

Every command takes `--config=configs/X.py:arg` and `--config.a.b=value` overrides; an override
naming an unknown field is an error. Commands:

  train      train (and evaluate, if data.test_root is set) into --workdir
  eval       evaluate the workdir's latest checkpoint (or eval.params) on data.test_root
  predict    score a folder of images (--images) into --out: scores.csv + heatmaps
  convert    `convert anomalyclip --pth epoch_15.pth --out DIR`: official prompts -> params export
  make-meta  `make-meta --dataset mvtec --root DIR`: write DIR/meta.json
  demo       offline end to end: synthetic dataset, tiny random backbone, train, eval
  ablate     `ablate --sweep=gqp_only,mvp,cnf,dual_branch --seeds=0,1`: train/eval each variant
             (or `field=value` overrides joined by `+`) into one comparison table

`--profile` writes a `jax.profiler` trace of the command into WORKDIR/profile (TensorBoard).
"""

from __future__ import annotations

import logging as py_logging
import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

COMMANDS = ("train", "eval", "predict", "convert", "make-meta", "demo", "ablate")

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/anomalyclip.py:visa.")
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, tables, heatmaps.")
flags.DEFINE_string("images", None, "predict: folder of images to score.")
flags.DEFINE_string("out", None, "predict/convert/make-meta: output path.")
flags.DEFINE_string("pth", None, "convert: the official checkpoint (.pth).")
flags.DEFINE_string("dataset", None, "make-meta: dataset layout (mvtec, visa, mpdd, btad, ...).")
flags.DEFINE_string("root", None, "make-meta: dataset root folder.")
flags.DEFINE_bool("overwrite", False, "convert: replace an existing output directory.")
flags.DEFINE_string("sweep", None, "ablate: comma-separated variants or field=value overrides.")
flags.DEFINE_list("seeds", None, "ablate: training seeds to average (default: train.seed).")
flags.DEFINE_bool("profile", False, "Write a jax.profiler trace into WORKDIR/profile.")


def _config(default_method: str = "anomalyclip"):
    if FLAGS.config is not None:
        return FLAGS.config
    if _command != "demo":
        raise app.UsageError(f"{_command}: --config is required (e.g. configs/anomalyclip.py:visa)")
    from genclip_jax import defaults

    return defaults.tiny_config(default_method)


def _require(*names: str) -> None:
    missing = [f"--{n}" for n in names if getattr(FLAGS, n) is None]
    if missing:
        raise app.UsageError(f"{_command}: missing {', '.join(missing)}")


def _train() -> None:
    from genclip_jax import train

    _require("workdir")
    train.train_and_evaluate(_config(), FLAGS.workdir)


def _eval() -> None:
    from genclip_jax import evaluate

    _require("workdir")
    evaluate.evaluate(_config(), FLAGS.workdir)


def _predict() -> None:
    from genclip_jax import predict

    _require("workdir", "images")
    out = FLAGS.out or str(pathlib.Path(FLAGS.workdir) / "predict")
    print(predict.predict_folder(_config(), FLAGS.workdir, FLAGS.images, out))


def _convert(args: list[str]) -> None:
    from genclip_jax import convert

    if len(args) != 1:
        raise app.UsageError(f"convert: name the method, one of {sorted(convert.CONVERTERS)}")
    _require("pth", "out")
    print(convert.convert(args[0], FLAGS.pth, FLAGS.out, overwrite=FLAGS.overwrite))


def _make_meta() -> None:
    from genclip_jax.data import meta

    _require("dataset", "root")
    print(meta.make_meta(FLAGS.dataset, FLAGS.root, FLAGS.out))


def _ablate() -> None:
    from genclip_jax import ablate

    _require("workdir", "sweep")
    seeds = [int(s) for s in FLAGS.seeds] if FLAGS.seeds else None
    ablate.run_ablation(_config(), FLAGS.workdir, ablate.split_sweep(FLAGS.sweep), seeds)


def _demo() -> None:
    from genclip_jax import demo

    _require("workdir")
    demo.run(_config(), FLAGS.workdir)


_command = ""


class _QuietLibraries(py_logging.Filter):
    """Keeps our INFO lines (progress, metrics) but only warnings from Orbax's chatty internals."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        return record.levelno >= py_logging.WARNING or "/orbax/" not in record.pathname


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parser; an override naming a field the config lacks exits like any bad flag."""
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as err:  # how ml_collections reports an unknown field
        message: object = err
        while isinstance(message, BaseException) and message.args:  # KeyError inside AttributeError
            message = message.args[0]
        sys.stderr.write(
            "FATAL Flags parsing error: a --config.* override names a field the config does not "
            f"have: {message}\n"
        )
        sys.exit(1)


def main(argv: list[str]) -> None:
    args = argv[1:]
    handlers = {"train": _train, "eval": _eval, "predict": _predict,
                "make-meta": _make_meta, "demo": _demo, "ablate": _ablate}
    if _command != "convert" and args:
        raise app.UsageError(f"{_command}: unexpected arguments {args}")
    run_command = (lambda: _convert(args)) if _command == "convert" else handlers[_command]
    if not FLAGS.profile:
        run_command()
        return
    import jax

    _require("workdir")
    with jax.profiler.trace(str(pathlib.Path(FLAGS.workdir) / "profile")):
        run_command()


def run(argv: list[str] | None = None) -> None:
    """Console entry point: the first argument picks the command."""
    global _command
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] not in COMMANDS:
        got = argv[1] if len(argv) > 1 else "nothing"
        sys.stderr.write(f"usage: genclip-jax {{{','.join(COMMANDS)}}} [flags]; got {got}\n"
                         + (__doc__ or ""))
        sys.exit(2)
    _command = argv[1]
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_QuietLibraries())
    app.run(main, argv=[f"{argv[0]} {argv[1]}", *argv[2:]], flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
