"""Command line: `bigssl train | shards | eval | export`. Thin: parse, then call the library.

Every failure ends with one line on stderr and an exit code from bigssl/errors.py (README, "Exit
codes"): 2 for the user's input, 3 for a lost rank, 75 for a stop signal after its checkpoint, 1
for anything unexpected. BIGSSL_DEBUG=1 shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from bigssl.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_RANK_LOST, EXIT_USER, ConfigError, RankLost, UserError


def _debug() -> bool:
    return os.environ.get("BIGSSL_DEBUG") == "1"


def _quiet_native_logs() -> None:
    """torch's C++ layer logs a ~25-line stack dump, as a warning, when a rendezvous-store
    connection drops (rank 0, which hosts the store, is gone); the line that says so is
    bigssl's (distributed/watchdog.py). The level is read once, as torch loads: set it before.
    Distributed runs only, and neither under BIGSSL_DEBUG=1 nor over the user's own setting."""
    from bigssl.distributed.launch import detect

    if detect().distributed and not _debug():
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")


# Set once a command gets past its config to torch and the process group; main() clears it.
_distributed_part_started = False


def _start_distributed_part(started: bool = True) -> None:
    global _distributed_part_started
    _distributed_part_started = started


def _leave_process_group(code: int) -> None:
    """torch 2.14 + gloo can abort in its exit handlers after all work is done ("terminate called
    without an active exception", about 1 run in 5), which would replace `code`: once a
    distributed run got that far, flush and leave without them."""
    from bigssl.distributed.launch import detect

    if _distributed_part_started and detect().distributed:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _train(args: argparse.Namespace) -> int:
    """`args.stop_request`: installed by main() before anything else."""
    from bigssl import config as config_lib
    from bigssl import recipes
    from bigssl.distributed.launch import detect

    config = recipes.load(args.recipe, args.overrides)
    config_lib.per_rank_batch(config, detect().world_size)  # a config error: before torch, like the rest
    if args.print_config:
        for note in config_lib.override_notes(args.overrides):
            print(f"# {note}")
        print(config_lib.to_yaml(config), end="")
        return 0
    _quiet_native_logs()
    _start_distributed_part()
    from bigssl.preemption import Stopped
    from bigssl.train import train

    code = 0
    try:
        train(config, args.stop_request)
    except Stopped as stop:  # checkpoint written (and the SLURM job requeued): resumable
        code = stop.exit_code
    _leave_process_group(code)
    return code


def _export(args: argparse.Namespace) -> int:
    from bigssl.eval.export import export_backbone

    checkpoint, count, load_line = export_backbone(Path(args.source), Path(args.out))
    layout = "timm's hub layout (config.json + model.safetensors)" if load_line else "one safetensors file"
    print(f"{args.out}: {count} backbone tensors from {checkpoint}, {layout}")
    if load_line:
        print(f"load it with: {load_line}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    _quiet_native_logs()
    _start_distributed_part()
    from bigssl.eval.offline import EvalOptions, evaluate

    if args.kind == "zeroshot":
        options = EvalOptions(train="", val=args.val, extract_batch=args.extract_batch, workers=args.workers,
                              classnames=args.classnames, templates=args.templates)
    else:
        options = EvalOptions(train=args.train, val=args.val, extract_batch=args.extract_batch, workers=args.workers,
                              projector_layers=args.projector_layers,
                              **({"k": args.k, "temperature": args.temperature} if args.kind == "knn" else
                                 {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
                                  "standardize": not args.no_standardize}))
    evaluate(args.kind, Path(args.source), options)
    _leave_process_group(0)
    return 0


def _shards(args: argparse.Namespace) -> int:
    from bigssl.data.build import Options, build

    options = Options(maxcount=args.maxcount, maxsize=args.maxsize, resize=args.resize, quality=args.quality,
                      shuffle_seed=None if args.no_shuffle else args.seed)
    index = build(Path(args.src), Path(args.out), options, workers=args.workers, progress_bar=not args.quiet)
    skipped, converted = index.get("skipped_inputs", 0), index.get("converted_inputs", 0)
    print(f"{args.out}: {index['samples']} samples in {len(index['shards'])} shards"
          + (f", {skipped} unreadable inputs skipped" if skipped else "")
          + (f", {converted} inputs converted to PNG" if converted else ""))
    return 0


def _plan(args: argparse.Namespace) -> int:
    import json

    from bigssl.plan.report import format_plan, plan

    result = plan(args.recipe, args.gpus, args.gpu, args.link_gbps, args.overrides, args.samples,
                  cache=not args.no_cache)
    print(json.dumps(result.to_dict(), indent=1) if args.json else format_plan(result))
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="bigssl", description="Self-supervised visual pretraining at scale.")
    # The deepspeed launcher passes --local_rank=N before the command (it sets LOCAL_RANK too).
    root.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    commands = root.add_subparsers(dest="command", required=True)
    for add in (_add_train, _add_shards, _add_eval, _add_export, _add_plan):
        add(commands)
    return root


def _add_train(commands: Any) -> None:
    train = commands.add_parser("train", help="pretrain from a recipe (resumes from log.dir by itself)")
    train.add_argument("recipe", help="recipe YAML file")
    train.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    train.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    train.set_defaults(run=_train)


def _add_shards(commands: Any) -> None:
    shards = commands.add_parser("shards", help="image folder or CSV/JSONL file list → WebDataset tar shards")
    shards.add_argument("src", help="image folder (one subfolder per class) or a .csv/.jsonl list")
    shards.add_argument("out", help="output directory: empty, or a previous run of this command to resume")
    shards.add_argument("--maxcount", type=int, default=10000, help="samples per shard at most")
    shards.add_argument("--maxsize", type=int, default=1 << 30, help="bytes per shard at most")
    shards.add_argument("--resize", type=int, default=None, metavar="SHORT_SIDE",
                        help="re-encode as JPEG with this short side (smaller images only shrink)")
    shards.add_argument("--quality", type=int, default=90, help="JPEG quality with --resize")
    shards.add_argument("--workers", type=int, default=0, help="encoding processes (default: all cores)")
    shards.add_argument("--seed", type=int, default=0, help="seed of the sample order shuffle")
    shards.add_argument("--no-shuffle", action="store_true", help="keep the listing order (class by class)")
    shards.add_argument("--quiet", action="store_true", help="no progress bar")
    shards.set_defaults(run=_shards)


def _add_eval(commands: Any) -> None:
    evaluation = commands.add_parser("eval", help="score a run's (or checkpoint's) backbone: kNN, linear probe, "
                                                  "or zero-shot")
    kinds = evaluation.add_subparsers(dest="kind", required=True)
    for kind, text in (("knn", "weighted k-nearest-neighbour accuracy"),
                       ("linear", "linear probe on cached features, the method's published protocol"),
                       ("zeroshot", "image-text models: zero-shot accuracy from class-name prompts")):
        sub = kinds.add_parser(kind, help=text)
        sub.add_argument("source", metavar="RUN_OR_CKPT", help="run directory (its newest checkpoint) or a checkpoint")
        if kind != "zeroshot":
            sub.add_argument("--train", required=True, help="labelled training shards (pattern, or quickstart:train)")
        sub.add_argument("--val", required=True, help="labelled validation shards (an index.json names the classes)")
        sub.add_argument("--extract-batch", type=int, default=256, help="images per rank per extraction batch")
        sub.add_argument("--workers", type=int, default=2, help="data workers per rank")
        if kind == "zeroshot":
            sub.add_argument("--classnames", default="auto", metavar="auto|imagenet|FILE",
                             help="class names: the --val index.json's (auto; ImageNet-1k's WordNet ids become "
                                  "OpenAI's curated names), OpenAI's ImageNet-1k list, or a file, one a line")
            sub.add_argument("--templates", default="auto", metavar="auto|imagenet|FILE",
                             help="prompt templates with {} for the name: auto (ImageNet's 80 with ImageNet names, "
                                  "else 4 generic ones), CLIP's 80 for ImageNet, or a file, one a line")
            sub.set_defaults(run=_eval)
            continue
        sub.add_argument("--projector-layers", type=int, default=0, metavar="K",
                         help="features after the first K projector layers (SimCLR v2: 1); default: the backbone")
        if kind == "knn":
            sub.add_argument("--k", type=int, default=20, help="neighbours that vote")
            sub.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(similarity / T)")
        else:
            sub.add_argument("--epochs", type=int, help="override the protocol's epochs")
            sub.add_argument("--lr", type=float, help="override the protocol's base lr")
            sub.add_argument("--batch-size", type=int, help="override the protocol's batch size")
            sub.add_argument("--no-standardize", action="store_true",
                             help="raw features (default: standardised by the training set's mean and std)")
        sub.set_defaults(run=_eval)


def _add_export(commands: Any) -> None:
    export = commands.add_parser("export", help="a run's (or checkpoint's) backbone → a folder timm loads "
                                                "(local-dir:OUT_DIR), or one .safetensors file; any engine")
    export.add_argument("source", metavar="RUN", help="run directory (its newest checkpoint) or a checkpoint directory")
    export.add_argument("out", metavar="OUT",
                        help="a folder (config.json + model.safetensors, timm's hub layout; needs the run's "
                             "config.yaml), or a path ending in .safetensors for the weights alone")
    export.set_defaults(run=_export)


def _add_plan(commands: Any) -> None:
    plan = commands.add_parser("plan", help="capacity plan of a recipe at N GPUs: collectives, memory and a step-time "
                                            "lower bound per engine, and which engine fits")
    plan.add_argument("recipe", help="recipe YAML file")
    plan.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    plan.add_argument("--gpus", type=int, required=True, help="GPUs (ranks) in the job, e.g. 8 to 1024")
    plan.add_argument("--gpu", choices=("h100", "a100", "h200"), default="h100", help="datasheet to plan with")
    plan.add_argument("--link-gbps", type=float, default=None, metavar="B",
                      help="per-GPU link bandwidth, Gbit/s (default: NVLink within one node of 8, else the "
                           "GPU's network adapter)")
    plan.add_argument("--samples", type=int, default=None, help="training set size (default: data.samples_per_epoch, "
                                                                 "else ImageNet-1k's 1,281,167)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.add_argument("--no-cache", action="store_true", help="trace the step again instead of reusing the cache")
    plan.set_defaults(run=_plan)


def _reported_here(err: UserError) -> bool:
    """A config error is the same on every rank (same recipe, same overrides): rank 0 alone
    prints it, instead of one copy per rank. One that depends on this node's files is not."""
    from bigssl.distributed.launch import detect

    if not isinstance(err, ConfigError) or err.per_node:
        return True
    try:
        return detect().rank == 0
    except UserError:  # the launcher's variables are themselves broken: say everything
        return True


# A rank that keeps a config error to itself waits this long before it exits: a launcher stops the
# other ranks as soon as one exits (srun --kill-on-bad-exit, torchrun), and rank 0, a little later
# to start, could be killed before its line is out.
SILENT_RANK_GRACE_S = 2.0


def _fail(line: str, code: int, shown: bool = True) -> int:
    from bigssl.distributed.launch import record_failure

    if shown:
        print(line, file=sys.stderr, flush=True)
    record_failure(line)
    if not shown:
        time.sleep(SILENT_RANK_GRACE_S)
    _leave_process_group(code)
    return code


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    _start_distributed_part(False)
    if args.command != "train":
        return _run(args)
    # Before anything slow (the imports take seconds): from here on a scheduler's SIGTERM or USR1
    # is a stop request, honoured after the first step with exit 75, never a kill by signal. It
    # stays while a failure is reported too: the SIGTERM a launcher sends every rank once one has
    # failed must not cut a rank's line off, nor replace its exit code with 143.
    from bigssl.preemption import StopRequest

    args.stop_request = StopRequest()
    args.stop_request.install()
    try:
        return _run(args)
    finally:
        args.stop_request.restore()


def _run(args: argparse.Namespace) -> int:
    """The command, and every way it can fail mapped to one line and its exit code."""
    try:
        return args.run(args)
    except UserError as err:
        if _debug():
            raise
        return _fail(f"bigssl: error: {err}", EXIT_USER, shown=_reported_here(err))
    except RankLost as err:  # the same code as the watchdog's exit (distributed/watchdog.py)
        if _debug():
            raise
        return _fail(f"bigssl: error: {_first_line(err)}", EXIT_RANK_LOST)
    except KeyboardInterrupt:
        return _fail("bigssl: interrupted", EXIT_INTERRUPTED)
    except Exception as err:  # one line for users; the traceback is one variable away
        if _debug():
            raise
        return _fail(f"bigssl: {type(err).__name__}: {_first_line(err)} (BIGSSL_DEBUG=1 shows the traceback)",
                     EXIT_INTERNAL)


if __name__ == "__main__":
    sys.exit(main())
