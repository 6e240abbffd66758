"""``tf-explog`` command line: thin subcommands over the package's modules.

    tf-explog synth     --out DIR [--subjects N] [--shape S] [--seed K]
    tf-explog synth     --from-label-maps DIR --out DIR [--label-map FILE] [--subjects N]
    tf-explog dataset   init --images DIR --labels DIR --out dataset.json | check DIR_OR_JSON
    tf-explog train     --config FILE [--data DATASET] [--set key=value ...] | --resume RUN_DIR
    tf-explog predict   --model PATH --input FILE_OR_DIR --output DIR
    tf-explog evaluate  --pred DIR --truth DIR_OR_DATASET_JSON --out DIR
    tf-explog export    --run RUN_DIR [--name NAME] [--base saved_models]
    tf-explog reproduce --config FILE [--arms A,B] [--splits K]
    tf-explog demo

TensorFlow is imported inside the commands that need it (``import tf_explog`` itself imports
Keras, to register the package's custom objects).
"""

from __future__ import annotations

import argparse
import os
import sys


def _shape(text: str):
    parts = [int(p) for p in text.replace("x", ",").split(",") if p]
    if len(parts) == 1:
        return parts * 3
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"--shape must be N or D,H,W; got {text!r}")
    return parts


def cmd_synth(args) -> int:
    workers = args.workers or max(1, min(8, os.cpu_count() or 1))
    if args.from_label_maps:
        from tf_explog.data.label_synthesis import synthesize_from_label_maps

        if args.shape is not None:
            from tf_explog.errors import InputError

            raise InputError("--shape is for the phantoms; with --from-label-maps the images "
                             "take the grid of their label maps")
        synthesize_from_label_maps(
            args.from_label_maps, args.out, label_map=args.label_map,
            label_names=args.label_names, subjects=args.subjects,
            test_subjects=args.test_subjects or 0, seed=args.seed, contrast=args.contrast,
            acquisition=args.spacing, workers=workers, overwrite=args.overwrite,
            progress=True)
        print(f"wrote {os.path.join(args.out, 'dataset.json')}")
        return 0
    from tf_explog.data.synthetic import generate_dataset

    generate_dataset(args.out, subjects=12 if args.subjects is None else args.subjects,
                     shape=args.shape or [128, 128, 128], seed=args.seed,
                     test_subjects=args.test_subjects,
                     spacing=1.5 if args.spacing is None else args.spacing,
                     overwrite=args.overwrite, verbose=True, workers=workers)
    print(f"wrote {os.path.join(args.out, 'dataset.json')}")
    return 0


def cmd_dataset_init(args) -> int:
    from tf_explog.data.layout import check_dataset, init_dataset

    names = [n.strip() for n in args.label_names.split(",")] if args.label_names else None
    raw = init_dataset(args.images, args.labels, args.out, test_images=args.test_images,
                       label_names=names, modality=args.modality.split(","),
                       name=args.name, overwrite=args.overwrite)
    print(f"wrote {check_dataset(args.out, check_data=False).summary()}")
    if "label_map" in raw:
        print(f"  label ids {[ids[0] for ids in raw['label_map'].values()]} are not 0..K-1: "
              "its label_map makes them classes 1..K-1")
    print("  label names are in its \"labels\" (edit them, or pass --label-names)")
    return 0


def cmd_dataset_check(args) -> int:
    from tf_explog.data.layout import check_dataset
    from tf_explog.errors import InputError

    found = check_dataset(args.path, check_data=not args.headers_only)
    if found.ok:
        print(f"ok: {found.summary()}")
        return 0
    # Every problem on its own line (each names its file), then the one error line.
    for problem in found.problems:
        print(problem, file=sys.stderr)
    n = len(found.problems)
    raise InputError(f"{found.path}: {n} problem{'s' if n != 1 else ''} (listed above)")


def train_overrides(args) -> list:
    """``--set`` overrides, with ``--data PATH`` as ``data.dataset`` resolved against the
    current directory (a path given with ``--set`` is relative to the config file)."""
    overrides = list(args.set)
    if getattr(args, "data", None):
        data = os.path.abspath(os.path.expanduser(args.data))
        if os.path.isdir(data):
            data = os.path.join(data, "dataset.json")
        overrides.append(f"data.dataset={data}")
    return overrides


def cmd_train(args) -> int:
    from tf_explog.config import load_config
    from tf_explog.errors import InputError
    from tf_explog.training import train

    if args.resume:
        if args.config or args.set or args.data:
            raise InputError("--resume takes the run's own config; drop --config/--set/--data.")
        result = train(None, resume=args.resume)
    else:
        if not args.config:
            raise InputError("--config FILE (or --resume RUN_DIR) is required.")
        if args.data and not os.path.exists(args.data):
            raise InputError(f"--data {args.data}: no such dataset.json or folder (relative "
                             f"paths are taken from the current directory, {os.getcwd()}).")
        result = train(load_config(args.config, train_overrides(args)))
    print(f"run directory: {result.run_dir}")
    print(f"best checkpoint: {result.best_checkpoint}")
    from tf_explog.environment import tool_command

    print(f"TensorBoard: {tool_command('tensorboard')} --logdir {result.run_dir / 'tensorboard'}")
    return 0


def cmd_predict(args) -> int:
    from tf_explog.inference import predict_files

    written = predict_files(args.model, args.input, args.output, overwrite=args.overwrite,
                            save_probabilities=args.probabilities, tta=args.tta,
                            progress=sys.stdout.isatty(),
                            window_batch=args.window_batch, ids=args.ids,
                            accumulate=args.accumulate)
    print(f"wrote {len(written)} segmentation(s) to {args.output}")
    return 0


def cmd_evaluate(args) -> int:
    from tf_explog.evaluation import evaluate_dirs

    result = evaluate_dirs(args.pred, args.truth, args.out, overwrite=args.overwrite,
                           label_map=args.label_map, unknown_labels=args.unknown_labels,
                           pred_ids=args.pred_ids)
    print(f"wrote metrics.csv, summary.csv, report.md, dice_boxplot.png to {args.out}")
    print(f"mean Dice over subjects and structures: {result.overall['dice_mean']:.3f} "
          f"(with background: {result.overall['dice_mean_with_background']:.3f})")
    return 0


def require_tensorflow_backend(what: str) -> None:
    """One clear line when a command needs TensorFlow (SavedModel) on another backend."""
    import keras

    from tf_explog.errors import InputError

    if keras.backend.backend() != "tensorflow":
        raise InputError(f"{what} needs TensorFlow (a SavedModel for TF Serving); the Keras "
                         f"backend here is {keras.backend.backend()}. The run's .keras "
                         "checkpoints are backend-neutral: export them where TensorFlow is "
                         "installed, with KERAS_BACKEND=tensorflow.")
    try:
        import tensorflow  # noqa: F401
    except ImportError as err:
        raise InputError(f"{what} needs TensorFlow, which does not import here ({err}).")


def cmd_export(args) -> int:
    require_tensorflow_backend("tf-explog export")
    from tf_explog.export import export_saved_model

    path = export_saved_model(args.run, args.base, args.name, version=args.version)
    print(f"exported SavedModel: {path}")
    return 0


def cmd_reproduce(args) -> int:
    from tf_explog.experiments import reproduce

    # strict: a failed arm makes the command fail (exit 1) once the report is written.
    report = reproduce(args.config, overrides=args.set, out_dir=args.out,
                       arms=args.arms.split(",") if args.arms else None, splits=args.splits,
                       strict=True)
    print(f"report: {report}")
    return 0


def cmd_demo(args) -> int:
    from tf_explog.experiments import demo

    demo(tiny=args.tiny or bool(os.environ.get("TF_EXPLOG_DEMO_TINY")))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tf-explog",
        description="3D segmentation with the exponential logarithmic loss (Wong et al. 2018).")
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of any error")
    parser.add_argument("--verbose", action="store_true",
                        help="keep TensorFlow's native log lines (dropped by default)")
    # Also accepted after the subcommand; SUPPRESS keeps the main parser's value otherwise.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the Python traceback of any error")
    common.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="keep TensorFlow's native log lines (dropped by default)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", parents=[common],
                       help="write a synthetic data set (MSD layout): brain-like phantoms, or "
                            "MR-like images drawn from real label maps (--from-label-maps)")
    p.add_argument("--out", required=True)
    p.add_argument("--from-label-maps", metavar="DIR",
                   help="a folder of label maps (e.g. FreeSurfer aseg ids): draw one MR-like "
                        "image per map; the label files are copied unchanged")
    p.add_argument("--label-map", metavar="FILE",
                   help="with --from-label-maps: {class: [original ids]} JSON "
                        "(default DIR/label_map.json when present)")
    p.add_argument("--label-names", metavar="FILE",
                   help="with --from-label-maps: {class: name} JSON (default DIR/labels.json)")
    p.add_argument("--contrast", choices=("t1", "random"), default="t1",
                   help="with --from-label-maps: T1-like means for known ids, or all random")
    p.add_argument("--subjects", type=int, default=None,
                   help="phantoms: training subjects (default 12); label maps: how many maps "
                        "(default all)")
    p.add_argument("--test-subjects", type=int, default=None)
    p.add_argument("--shape", type=_shape, default=None, help="phantoms: grid (default 128)")
    p.add_argument("--spacing", type=float, default=None,
                   help="phantoms: voxel size in mm (default 1.5); label maps: the simulated "
                        "acquisition voxel size in mm (partial-volume blur; default the "
                        "map's own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--workers", type=int, default=None,
                   help="processes drawing subjects (default: the CPU count, at most 8)")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("dataset", parents=[common],
                       help="lay out (init) or check a data set in the MSD layout")
    actions = p.add_subparsers(dest="action", required=True)
    q = actions.add_parser("init", parents=[common],
                           help="write dataset.json for a folder of images and one of labels")
    q.add_argument("--images", required=True, help="folder of training images (NIfTI)")
    q.add_argument("--labels", required=True, help="folder of their labels, same file names")
    q.add_argument("--out", required=True, help="the dataset.json to write")
    q.add_argument("--test-images", default=None, help="folder of unlabelled test images")
    q.add_argument("--label-names", default=None, metavar="NAMES",
                   help="comma-separated, background first (default label_<id>)")
    q.add_argument("--modality", default="image", metavar="NAMES",
                   help="comma-separated channel names, e.g. T1 or T1,T2 (default: image)")
    q.add_argument("--name", default=None, help="data set name (default: the folder's)")
    q.add_argument("--overwrite", action="store_true")
    q.set_defaults(func=cmd_dataset_init)
    q = actions.add_parser("check", parents=[common],
                           help="list every problem of a data set, one line each")
    q.add_argument("path", metavar="DIR_OR_JSON", help="dataset.json or its folder")
    q.add_argument("--headers-only", action="store_true",
                   help="read headers only (faster; finds less)")
    q.set_defaults(func=cmd_dataset_check)

    p = sub.add_parser("train", parents=[common],
                       help="train from a YAML config, or resume a run")
    p.add_argument("--config")
    p.add_argument("--data", default=None, metavar="DATASET",
                   help="dataset.json (or its folder) to train on, relative to the current "
                        "directory; replaces the config's data.dataset")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=3")
    p.add_argument("--resume", metavar="RUN_DIR")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("predict", parents=[common],
                       help="segment NIfTI files with a trained model")
    p.add_argument("--model", required=True, help="run directory or .keras file")
    p.add_argument("--input", required=True, help="a NIfTI file or a directory of them")
    p.add_argument("--output", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--probabilities", action="store_true", help="also save probabilities")
    p.add_argument("--tta", action="store_true", help="flip test-time augmentation")
    p.add_argument("--window-batch", type=int, default=1)
    p.add_argument("--accumulate", choices=("float32", "int16", "float16"), default="float32",
                   help="sliding-window sum on the device: int16/float16 halve its memory "
                        "(docs/performance.md)")
    p.add_argument("--ids", choices=("original", "class"), default="original",
                   help="with a label map: write original ids (each class as the first id "
                        "it lists) or class indices")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("evaluate", parents=[common],
                       help="per-structure Dice, HD95, ASSD (mm)")
    p.add_argument("--pred", required=True)
    p.add_argument("--truth", required=True, help="a directory or an MSD dataset.json")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--label-map", default=None, metavar="FILE",
                   help='JSON {"class": [original ids]}: compare in class space (default: '
                        "the dataset.json's label_map)")
    p.add_argument("--unknown-labels", choices=("raise", "background"), default="raise",
                   help="truth ids the label map does not list")
    p.add_argument("--pred-ids", choices=("original", "class"), default="original",
                   help="what the predictions hold (see predict --ids)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", parents=[common],
                       help="SavedModel for TF Serving: BASE/NAME/VERSION/")
    p.add_argument("--run", required=True)
    p.add_argument("--name", default=None)
    p.add_argument("--base", default="saved_models")
    p.add_argument("--version", type=int, default=None)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("reproduce", parents=[common],
                       help="the paper's loss comparison")
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default=None, help="report directory")
    p.add_argument("--arms", default=None, metavar="A,B",
                   help="run (and report) these arms only, comma-separated")
    p.add_argument("--splits", type=int, default=None, metavar="K",
                   help="the first K splits only (default: the config's); finished runs are "
                        "kept, so a later call with more splits adds to them")
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("demo", parents=[common],
                       help="synthesise, train, evaluate and export on a CPU budget")
    p.add_argument("--tiny", action="store_true", help="a seconds-long version (tests)")
    p.set_defaults(func=cmd_demo)
    return parser


#: Exit statuses: 0 done, 1 training failed (diverged to NaN/Inf, or a reproduce arm failed),
#: 2 bad input or environment (full disk, read-only, no permission), 3 internal error.
EXIT_NON_FINITE, EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED = 1, 2, 3, 130

# Errors of the operating system about a path the user gave (missing input, existing output,
# a file where a folder was expected): bad input, whatever module raised them.
_PATH_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                PermissionError)


def main(argv=None) -> int:
    """Runs one subcommand; returns its exit status (see ``EXIT_*``).

    Every failure is one line ``tf-explog <command>: error: ...`` on stderr. Bad input (any
    `tf_explog.errors.InputError`, or a path the system refuses) and the environment (a full
    disk or quota, a read-only file system, no permission: the path and what to do) exit 2;
    a diverged training or a failed ``reproduce`` arm exits 1; anything else is a bug in
    tf_explog: exit 3, and ``--debug`` shows its traceback.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    from tf_explog.errors import InputError, NonFiniteError, RunsFailed
    from tf_explog.files import describe_environment_error, environment_error

    def fail(message: str, status: int) -> int:
        # One line, also for errors that list several problems (one per line, "  - ...").
        first, *rest = str(message).strip().splitlines() or [""]
        rest = [line.strip().removeprefix("- ") for line in rest if line.strip()]
        line = first if not rest else f"{first} {'; '.join(rest)}"
        command = " ".join(filter(None, [args.command, getattr(args, "action", None)]))
        print(f"tf-explog {command}: error: {line}", file=sys.stderr)
        return status

    from tf_explog.console import NativeLogFilter

    quiet = not (args.verbose or os.environ.get("TF_EXPLOG_NATIVE_LOGS"))
    try:
        with NativeLogFilter(enabled=quiet):
            return args.func(args)
    except (NonFiniteError, RunsFailed) as err:
        # Training diverged (nothing NaN was kept), or reproduce arms failed (the report of
        # the others is written): one line and a failure status.
        return fail(str(err), EXIT_NON_FINITE)
    except OSError as err:
        if args.debug:
            raise
        if environment_error(err):
            # A full disk, a read-only or unwritable folder: the path and what to do.
            return fail(describe_environment_error(err), EXIT_BAD_INPUT)
        if isinstance(err, (InputError, *_PATH_ERRORS)):
            return fail(str(err), EXIT_BAD_INPUT)
        return fail(f"internal error ({type(err).__name__}: {err}); this is a bug in "
                    "tf_explog, run again with --debug for the traceback", EXIT_INTERNAL)
    except InputError as err:
        if args.debug:
            raise
        # The message names the file or field and what was expected.
        return fail(str(err), EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        return fail("interrupted", EXIT_INTERRUPTED)
    except Exception as err:  # a bug: say so, keep the traceback for --debug
        if args.debug:
            raise
        return fail(f"internal error ({type(err).__name__}: {err}); this is a bug in "
                    "tf_explog, run again with --debug for the traceback", EXIT_INTERNAL)


if __name__ == "__main__":
    sys.exit(main())
