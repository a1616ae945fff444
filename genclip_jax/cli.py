"""`genclip-jax COMMAND [flags]`: a thin shell over train / evaluate / predict / convert / data.

`genclip-jax --help` lists the commands (the `COMMANDS` table), `genclip-jax COMMAND --help` shows
one command's flags. Every config-taking command takes `--config=configs/X.py:arg` and
`--config.a.b=value` overrides; an override naming an unknown field is an error.
"""

from __future__ import annotations

import dataclasses
import logging as py_logging
import pathlib
import re
import sys
import textwrap
from typing import NoReturn

from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags

from genclip_jax import config_overrides


@dataclasses.dataclass(frozen=True)
class Command:
    summary: str
    flags: tuple[str, ...]  # names of the absl flags below that the command reads
    example: str


COMMANDS = {
    "train": Command(
        "train (and evaluate, if data.test_root is set) into --workdir",
        ("config", "workdir", "profile"),
        "genclip-jax train --config=configs/anomalyclip.py:visa --workdir=runs/ac_visa "
        "--config.data.train_root=/data/visa --config.data.test_root=/data/mvtec",
    ),
    "eval": Command(
        "evaluate the workdir's latest checkpoint (or eval.params) on data.test_root",
        ("config", "workdir", "out", "profile"),
        "genclip-jax eval --config=configs/anomalyclip.py:visa --workdir=runs/ac_visa "
        "--config.data.test_root=/data/mpdd",
    ),
    "calibrate": Command(
        "thresholds from normal images (and labelled defects) into RUN/calibration.json",
        ("config", "workdir", "normal", "anomalous", "out", "overwrite", "profile"),
        "genclip-jax calibrate --config=configs/anomalyclip.py:visa --workdir=runs/ac_visa "
        "--normal=/data/line3/good",
    ),
    "predict": Command(
        "score images (--images) into --out: scores.csv, heatmaps, decisions once calibrated",
        ("config", "workdir", "images", "calibration", "class", "format", "out", "profile"),
        "genclip-jax predict --config=configs/anomalyclip.py:visa --workdir=runs/ac_visa "
        "--images=/data/new_parts --out=runs/ac_visa/new_parts",
    ),
    "export": Command(
        "a self-contained inference artifact (jax.export + safetensors) for genclip_jax.serving",
        ("config", "workdir", "out", "batch-size", "platforms", "class", "calibration",
         "overwrite"),
        "genclip-jax export --config=configs/anomalyclip.py:visa --workdir=runs/ac_visa "
        "--out=artifacts/ac_visa --platforms=cpu,cuda",
    ),
    "convert": Command(
        "`convert METHOD`: official checkpoint -> params export (eval.params)",
        ("pth", "out", "overwrite"),
        "genclip-jax convert anomalyclip --pth=epoch_15.pth --out=runs/official_visa",
    ),
    "make-meta": Command(
        "write the meta.json of a raw dataset folder (a published layout, or plain folders)",
        ("dataset", "root", "out", "overwrite", "test-fraction", "seed"),
        "genclip-jax make-meta --dataset=mvtec --root=/data/mvtec",
    ),
    "synthetic": Command(
        "write a small synthetic MVTec-style dataset (images, masks, meta.json) into --out",
        ("out", "seed", "overwrite", "layout"),
        "genclip-jax synthetic --out=/tmp/genclip_try/source --seed=0",
    ),
    "demo": Command(
        "offline end to end: synthetic dataset, tiny random backbone, train, eval",
        ("config", "workdir", "profile"),
        "genclip-jax demo --config=configs/tiny.py --workdir=/tmp/genclip_demo",
    ),
    "ablate": Command(
        "train/eval each variant (or `field=value` overrides joined by `+`) into one table",
        ("config", "workdir", "sweep", "seeds", "profile"),
        "genclip-jax ablate --config=configs/genclip.py:mvtec --workdir=runs/gc_ablation "
        "--sweep=gqp_only,mvp,cnf,dual_branch --seeds=0,1",
    ),
    "benchmark": Command(
        "the papers' protocol: train on --source per seed, evaluate on every --targets set",
        ("config", "workdir", "source", "targets", "roots", "seeds", "shots", "profile"),
        "genclip-jax benchmark --config=configs/anomalyclip.py:visa --workdir=runs/table1 "
        "--source=visa --targets=mvtec,mpdd --roots=visa=/data/visa,mvtec=/data/mvtec,"
        "mpdd=/data/mpdd --seeds=111,112,113 --shots=0,1,2,4",
    ),
}
HELP_ARGS = ("--help", "-help", "-h", "--helpfull", "-helpfull", "--helpshort", "-helpshort")
OVERRIDES_HELP = """\
config overrides: any field of the config, e.g. --config.train.lr=3e-4; list and tuple fields
  take comma-separated values, bare or in () or []: --config.genclip.layers=6,12,18,24 or
  --config.genclip.layers='(6,12,18,24)'; an empty value is an empty list.
"""

FLAGS = flags.FLAGS
# The argv that ml_collections scans for `--config.*` overrides (it defaults to sys.argv): the one
# parse_flags hands to absl, without the list/tuple overrides it applies itself.
_CONFIG_ARGV: list[str] = []
config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/anomalyclip.py:visa.", sys_argv=_CONFIG_ARGV
)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, tables, heatmaps.")
flags.DEFINE_string("images", None, "predict: a folder of images (recursive) or one image.")
flags.DEFINE_string(
    "calibration", None,
    "predict, export: thresholds from `genclip-jax calibrate`, default RUN/calibration.json if "
    "present.",
)
flags.DEFINE_string(
    "class", None,
    "predict: the product class of every image (default: an image's first subfolder under "
    "--images; none for images directly in it): picks the class's thresholds, and the class "
    "name for methods that use it (GenCLIP). export: the classes to export, comma-separated "
    "(default: the calibration's).",
)
flags.DEFINE_enum(
    "format", "csv", ["csv", "jsonl"],
    "predict: scores.csv, or scores.jsonl with one object per image (path, class, score, "
    "threshold, decision, defect area, boxes of the defect regions).",
)
flags.DEFINE_string(
    "normal", None,
    "calibrate: normal images: a folder (one subfolder per class, or flat: one class), a "
    "good/defect folder layout (its good images), or a dataset root with meta.json (the good "
    "images of its train split).",
)
flags.DEFINE_string(
    "anomalous", None,
    "calibrate: labelled images for F1-optimal thresholds: a dataset root with meta.json (its "
    "test split, labels and masks), a good/defect folder layout, or a folder of defective images.",
)
flags.DEFINE_string(
    "out", None,
    "eval: output folder, default RUN/eval/<name of the test root>; calibrate: the calibration "
    "file, default RUN/calibration.json; predict: output folder, default RUN/predict; convert: "
    "the params export folder; export: the artifact folder; make-meta: the meta.json to write, "
    "default ROOT/meta.json; synthetic: the dataset folder.",
)
flags.DEFINE_integer(
    "batch-size", None,
    "export: the artifact's fixed batch (default: eval.batch_size); serving pads or splits.",
)
flags.DEFINE_list(
    "platforms", None,
    "export: platforms to lower for, of cpu, cuda, rocm, tpu (default: this machine's); no "
    "device of that platform is needed to export.",
)
flags.DEFINE_string("pth", None, "convert: the official checkpoint (.pth).")
flags.DEFINE_string(
    "dataset", None,
    "make-meta: dataset layout (mvtec, visa, mpdd, btad, dtd, sdd, dagm), or folder: "
    "ROOT/<class>/good/ and ROOT/<class>/<defect type>/, masks optional in "
    "ROOT/<class>/masks/<defect type>/ with the same file stem.",
)
flags.DEFINE_string("root", None, "make-meta: dataset root folder.")
flags.DEFINE_float(
    "test-fraction", 0.2,
    "make-meta --dataset=folder: fraction of each class's good and of its defective images put "
    "in the test split (0: everything in train).",
)
flags.DEFINE_enum(
    "layout", "mvtec", ["mvtec", "folder"],
    "synthetic: mvtec (with meta.json) or folder (plain good/defect/masks folders, no meta.json).",
)
flags.DEFINE_bool(
    "overwrite", False,
    "convert: replace an existing output directory; export: replace an existing artifact; "
    "make-meta: replace an existing meta.json; "
    "calibrate: replace an existing calibration file; "
    "synthetic: write into a non-empty folder.",
)
flags.DEFINE_integer(
    "seed", 0, "synthetic: seed of the images and defects; make-meta: seed of the folder split.",
)
flags.DEFINE_string("sweep", None, "ablate: comma-separated variants or field=value overrides.")
flags.DEFINE_list("seeds", None,
                  "ablate, benchmark: training seeds to average (default: train.seed).")
flags.DEFINE_string("source", None, "benchmark: the set to train on (a name in --roots).")
flags.DEFINE_list("targets", None, "benchmark: the sets to evaluate on (names in --roots).")
flags.DEFINE_list("roots", None, "benchmark: name=root of every set, e.g. mvtec=/data/mvtec.")
flags.DEFINE_list("shots", ["0"], "benchmark: numbers of normal references per class, 0 = "
                  "zero-shot; k > 0 draws them from each target's train split.")
flags.DEFINE_bool("profile", False, "Write a jax.profiler trace into WORKDIR/profile.")


def _wrap(text: str, indent: int, continuation: str = "") -> str:
    """`text` in lines of at most 100 characters, indented; `continuation` ends all but the last."""
    lines = textwrap.wrap(text, 96 - indent, break_long_words=False, break_on_hyphens=False)
    return (continuation + "\n" + " " * (indent + 2)).join(lines)


def usage() -> str:
    """The command list: `genclip-jax --help` and the error for a missing or unknown command."""
    width = max(map(len, COMMANDS))
    lines = [f"usage: genclip-jax {{{','.join(COMMANDS)}}} [flags]", "", "commands:"]
    for name, command in COMMANDS.items():
        lines.append(f"  {name:<{width}}  {command.summary}")
        lines.append(" " * (width + 4) + "e.g. " + _wrap(command.example, width + 9, " \\"))
    lines += ["", "genclip-jax COMMAND --help lists the flags of COMMAND.", "", OVERRIDES_HELP]
    return "\n".join(lines)


def command_help(name: str) -> str:
    """`genclip-jax NAME --help`: the summary, the command's own flags and an example."""
    command = COMMANDS[name]
    width = max(len(f) for f in command.flags) + 2
    lines = [f"usage: genclip-jax {name} [flags]", "", command.summary, "", "flags:"]
    lines += [
        f"  {'--' + flag:<{width}}  " + _wrap(FLAGS[flag].help, width + 2)
        for flag in command.flags
    ]
    lines += ["", "example:", "  " + _wrap(command.example, 2, " \\"), ""]
    if "config" in command.flags:
        lines.append(OVERRIDES_HELP)
    return "\n".join(lines)


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
        raise app.UsageError(
            f"{_command}: missing {', '.join(missing)} (see genclip-jax {_command} --help)"
        )


def _train() -> None:
    from genclip_jax import train_eval

    _require("workdir")
    train_eval.train_and_evaluate(_config(), FLAGS.workdir)


def _eval() -> None:
    from genclip_jax import evaluate

    _require("workdir")
    evaluate.evaluate(_config(), FLAGS.workdir, out=FLAGS.out)


def _calibrate() -> None:
    from genclip_jax import calibrate

    _require("workdir", "normal")
    calibrate.calibrate(_config(), FLAGS.workdir, FLAGS.normal, FLAGS.anomalous, FLAGS.out,
                        overwrite=FLAGS.overwrite)


def _predict() -> None:
    from genclip_jax import predict

    _require("workdir", "images")
    print(predict.predict_folder(
        _config(), FLAGS.workdir, FLAGS.images, FLAGS.out, calibration=FLAGS.calibration,
        class_name=FLAGS["class"].value, output_format=FLAGS.format,
    ))


def _export() -> None:
    from genclip_jax import export

    _require("out")
    classes = FLAGS["class"].value
    export.export(_config(), FLAGS.workdir, FLAGS.out, batch_size=FLAGS["batch-size"].value,
                  platforms=FLAGS.platforms, calibration=FLAGS.calibration,
                  classes=classes.split(",") if classes else None, overwrite=FLAGS.overwrite)


def _convert(args: list[str]) -> None:
    from genclip_jax import convert

    if len(args) != 1:
        raise app.UsageError(f"convert: name the method, one of {sorted(convert.CONVERTERS)}")
    _require("pth", "out")
    print(convert.convert(args[0], FLAGS.pth, FLAGS.out, overwrite=FLAGS.overwrite))


def _make_meta() -> None:
    from genclip_jax.data import meta

    _require("dataset", "root")
    print(meta.make_meta(FLAGS.dataset, FLAGS.root, FLAGS.out, overwrite=FLAGS.overwrite,
                         test_fraction=FLAGS["test-fraction"].value, seed=FLAGS.seed))


def _ablate() -> None:
    from genclip_jax import ablate

    _require("workdir", "sweep")
    seeds = [int(s) for s in FLAGS.seeds] if FLAGS.seeds else None
    ablate.run_ablation(_config(), FLAGS.workdir, ablate.split_sweep(FLAGS.sweep), seeds)


def _benchmark() -> None:
    from genclip_jax import protocol

    _require("workdir", "source", "targets", "roots")
    seeds = [int(s) for s in FLAGS.seeds] if FLAGS.seeds else None
    shots = [int(k) for k in FLAGS.shots] if FLAGS.shots else []
    protocol.run_protocol(_config(), FLAGS.workdir, FLAGS.source, FLAGS.targets,
                          protocol.parse_roots(FLAGS.roots), seeds, shots)


def _synthetic() -> None:
    from genclip_jax.data import synthetic

    _require("out")
    out = pathlib.Path(FLAGS.out)
    if out.is_dir() and any(out.iterdir()) and not FLAGS.overwrite:
        raise FileExistsError(f"--out={out} is not empty: give a new folder, or --overwrite to "
                              "write the dataset into it")
    print(synthetic.write_synthetic_dataset(out, seed=FLAGS.seed, layout=FLAGS.layout))


def _demo() -> None:
    from genclip_jax import demo

    _require("workdir")
    demo.run(_config(), FLAGS.workdir)


_command = ""


class _QuietLibraries(py_logging.Filter):
    """Keeps our INFO lines (progress, metrics) but only warnings from Orbax's chatty internals,
    less the one every read-only checkpoint reader (eval, predict) would print."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        if "/orbax/" not in record.pathname:
            return True
        return record.levelno >= py_logging.WARNING and "read only" not in record.getMessage()


def _flags_error(message: str) -> NoReturn:
    """Exits like absl does on a bad flag."""
    sys.stderr.write(f"FATAL Flags parsing error: {message}\n")
    sys.exit(1)


_CONFIG_FLAG = re.compile(r"--?config(?:=(.*))?", re.DOTALL)
_OVERRIDE_FLAG = re.compile(r"--?config\.([\w.]+)(?:=(.*))?", re.DOTALL)


def _config_spec(argv: list[str]) -> str | None:
    """The value of the last `--config` (absl's rule), None if there is none."""
    spec = None
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if match := _CONFIG_FLAG.fullmatch(arg):
            spec = match[1] if match[1] is not None else (argv[i + 1:] or [None])[0]
    return spec


def _load_config(spec: str) -> ConfigDict:
    """Loads `--config` ahead of absl: a missing file or bad arg gets one line, not a traceback."""
    try:
        return config_overrides.load_config_file(spec)
    except (FileNotFoundError, ValueError) as err:
        _flags_error(f"--config={spec}: {err}")


def _sequence_field(config: object, path: str) -> list | tuple | None:
    """The value of the list/tuple field at dotted `path`, None if it is absent or not one."""
    for key in path.split("."):
        if not isinstance(config, ConfigDict) or key not in config:
            return None
        config = config[key]
    return config if isinstance(config, (list, tuple)) else None


def _take_sequence_overrides(
    argv: list[str], config: ConfigDict
) -> tuple[list[str], dict[str, list | tuple]]:
    """Splits the `--config.F=value` of list/tuple fields F off `argv`, with their parsed values.

    ml_collections cannot override lists and reads `'(a,b)'` on a tuple as `('(a,b)',)`.
    """
    kept: list[str] = []
    values: dict[str, list | tuple] = {}
    args = iter(argv)
    for arg in args:
        if arg == "--":
            kept += [arg, *args]
            break
        match = _OVERRIDE_FLAG.fullmatch(arg)
        default = _sequence_field(config, match[1]) if match else None
        if default is None:
            kept.append(arg)
            continue
        name = f"--config.{match[1]}"
        text = match[2] if match[2] is not None else next(args, None)
        if text is None:
            _flags_error(f"{name}: expected a value, e.g. {name}=a,b")
        try:
            values[match[1]] = config_overrides.parse_sequence(text, default, name)
        except ValueError as err:
            _flags_error(str(err))
    return kept, values


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, plus list/tuple overrides; an unknown field exits like any bad flag."""
    spec = _config_spec(argv)
    sequences: dict[str, list | tuple] = {}
    if spec is not None:
        argv, sequences = _take_sequence_overrides(argv, _load_config(spec))
    _CONFIG_ARGV[:] = argv
    try:
        rest = app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as err:  # how ml_collections reports an unknown field
        message: object = err
        while isinstance(message, BaseException) and message.args:  # KeyError inside AttributeError
            message = message.args[0]
        _flags_error(f"a --config.* override names a field the config does not have: {message}")
    for path, value in sequences.items():
        config_flags.config_path.set_value(path, FLAGS.config, value)
    return rest


def _run_command(argv: list[str]) -> None:
    args = argv[1:]
    handlers = {"train": _train, "eval": _eval, "calibrate": _calibrate, "predict": _predict,
                "export": _export, "make-meta": _make_meta,
                "synthetic": _synthetic, "demo": _demo, "ablate": _ablate,
                "benchmark": _benchmark}
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


def main(argv: list[str]) -> None:
    """Runs the command; the errors that name what to fix (bad input, a failed save, a diverged
    loss) end it with that message alone and exit code 1 (the traceback at --verbosity=1)."""
    from genclip_jax import checkpoint, train

    try:
        _run_command(argv)
    except (ValueError, OSError, checkpoint.CheckpointSaveError,
            train.NonFiniteLossError) as err:
        logging.debug("traceback of the error below", exc_info=True)
        sys.stderr.write(f"genclip-jax {_command}: error: {err}\n")
        sys.exit(1)


def run(argv: list[str] | None = None) -> None:
    """Console entry point: the first argument picks the command; help needs no other flag."""
    global _command
    argv = list(sys.argv if argv is None else argv)
    if argv[1:2] == ["help"] and len(argv) > 2:  # `help COMMAND` is `COMMAND --help`
        argv = [argv[0], argv[2], "--help"]
    if len(argv) > 1 and argv[1] in (*HELP_ARGS, "help"):
        print(usage())
        return
    if len(argv) < 2 or argv[1] not in COMMANDS:
        got = repr(argv[1]) if len(argv) > 1 else "nothing"
        sys.stderr.write(f"genclip-jax: expected a command, got {got}\n\n{usage()}")
        sys.exit(2)
    _command = argv[1]
    flag_args = argv[2:argv.index("--")] if "--" in argv else argv[2:]
    if any(arg in HELP_ARGS for arg in flag_args):
        print(command_help(_command))
        return
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_QuietLibraries())
    app.run(main, argv=[f"{argv[0]} {argv[1]}", *argv[2:]], flags_parser=parse_flags)


if __name__ == "__main__":
    run()
