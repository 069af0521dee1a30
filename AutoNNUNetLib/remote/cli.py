"""``autonnunet remote ...``: upload, submit, follow, download through :class:`RemoteClient`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Union

from ..folds import parse_folds
from ..progress import format_duration
from .client import DEFAULT_TIMEOUT, RemoteClient

def describe(job: dict[str, Any]) -> str:
    """One line for a job: id, kind, state and what its progress says."""
    parts = [job["id"], job["kind"], job["state"]]
    p = job.get("progress") or {}
    if job["state"] == "queued" and job.get("queue_position") is not None:
        parts.append(f"position {job['queue_position'] + 1} in the queue")
    if p.get("stage") and job["state"] == "running":
        parts.append(f"stage {p['stage']}")
    if p.get("trial") is not None:
        rung = f", rung {p['rung']}" if p.get("rung") is not None else ""
        parts.append(f"trial {p['trial']}{rung}")
    if p.get("epoch") is not None:
        parts.append(f"epoch {p['epoch']}" + (f"/{p['max_epochs']}" if p.get("max_epochs") else ""))
    if p.get("trials_finished"):
        parts.append(f"{p['trials_finished']} trials done")
    if p.get("best_dice") is not None:
        parts.append(f"best Dice {p['best_dice']:.4f}")
    if p.get("eta_seconds") and job["state"] == "running":
        parts.append(f"ETA {format_duration(p['eta_seconds'])}")
    if job.get("error"):
        parts.append(f"error: {job['error']}")
    return "  ".join(str(x) for x in parts)


def client_from_args(args: argparse.Namespace) -> RemoteClient:
    url = args.url or os.environ.get("AUTONNUNET_URL", "")
    token = args.token or os.environ.get("AUTONNUNET_TOKEN")
    return RemoteClient(url, token, timeout=(args.connect_timeout, args.read_timeout), retries=args.retries)


def _upload_progress(done: int, total: int) -> None:
    print(f"\ruploading {done / 2**20:.1f} / {total / 2**20:.1f} MB ({100 * done / max(total, 1):.0f}%)",
          end="" if done < total else "\n", file=sys.stderr, flush=True)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help="server address, e.g. http://gpu-host:8765 (default: $AUTONNUNET_URL)")
    common.add_argument("--token", help="access token (default: $AUTONNUNET_TOKEN)")
    common.add_argument("--connect-timeout", type=float, default=DEFAULT_TIMEOUT[0], help=argparse.SUPPRESS)
    common.add_argument("--read-timeout", type=float, default=DEFAULT_TIMEOUT[1], help=argparse.SUPPRESS)
    common.add_argument("--retries", type=int, default=5, help="retries on connection errors (default: 5)")

    remote = subparsers.add_parser("remote", help="use a job server: upload, submit, follow, download",
                                   description="Talk to an `autonnunet serve` job server.")
    actions = remote.add_subparsers(dest="remote_command", metavar="ACTION", required=True)

    p = actions.add_parser("health", parents=[common], help="check that the server answers")
    p.set_defaults(func=_cmd_health)

    p = actions.add_parser("upload", parents=[common], help="upload a dataset folder or archive")
    p.add_argument("path", type=Path)
    p.add_argument("--kind", choices=["dataset", "images", "model"], default="dataset")
    p.set_defaults(func=_cmd_upload)

    submit = actions.add_parser("submit", help="submit a search, train, predict or select job")
    kinds = submit.add_subparsers(dest="kind", metavar="KIND", required=True)

    def job_options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--idempotency-key", help="reuse to make a retried submit return the same job")
        parser.add_argument("--follow", action="store_true", help="print the job's log until it ends")

    s = kinds.add_parser("search", parents=[common], help="PriorBand search (same options as `autonnunet search`)")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", type=Path, help="dataset folder or archive to upload (MSD or nnU-Net raw)")
    src.add_argument("--upload", help="id of a ready upload")
    s.add_argument("--space", choices=["hpo", "hpo_nas", "hpo_hnas"], default="hpo")
    s.add_argument("--profile", choices=["quick", "default"], default="default")
    for flag, kind in (("--min-epochs", int), ("--max-epochs", int), ("--eta", int), ("--total-epochs", int),
                       ("--max-trials", int), ("--wall-time", float), ("--iterations-per-epoch", int),
                       ("--runtime-weight", float), ("--seed", int)):
        s.add_argument(flag, type=kind)
    s.add_argument("--folds", nargs="+", default=["0"], help="fold numbers or 'all'")
    s.add_argument("--workers", type=int, default=1, help="parallel workers (GPUs) for this search")
    job_options(s)
    s.set_defaults(func=_cmd_submit)

    t = kinds.add_parser("train", parents=[common], help="train one configuration")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", type=Path)
    src.add_argument("--upload")
    t.add_argument("--epochs", type=int, required=True)
    t.add_argument("--config", help="TrialConfig as JSON text or a JSON file")
    t.add_argument("--folds", nargs="+", default=["0"])
    t.add_argument("--max-epochs", type=int)
    t.add_argument("--iterations-per-epoch", type=int)
    t.add_argument("--seed", type=int)
    job_options(t)
    t.set_defaults(func=_cmd_submit)

    pr = kinds.add_parser("predict", parents=[common], help="segment images with a model on the server")
    src = pr.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", type=Path, help="folder of <case>_0000.nii.gz images to upload")
    src.add_argument("--images-upload")
    model = pr.add_mutually_exclusive_group(required=True)
    model.add_argument("--model-job", help="id of a succeeded search, train or select job")
    model.add_argument("--model", type=Path, help="model zip to upload (from `autonnunet export-model`)")
    model.add_argument("--model-upload")
    pr.add_argument("--mirroring", action="store_true")
    pr.add_argument("--largest-component", action="store_true")
    job_options(pr)
    pr.set_defaults(func=_cmd_submit)

    se = kinds.add_parser("select", parents=[common], help="nnU-Net's model selection on a succeeded search job "
                                                           "(same options as `autonnunet finalize`)")
    se.add_argument("--search-job", required=True, help="id of a succeeded search job")
    se.add_argument("--epochs", type=int, required=True, help="final training length F")
    se.add_argument("--top", type=int, default=1, help="next best Pareto points besides the incumbent")
    se.add_argument("--configurations", nargs="+", default=["2d", "3d_lowres"],
                    help="other configurations of the incumbent, or 'none'")
    se.add_argument("--folds", nargs="+", default=["all"])
    se.add_argument("--iterations-per-epoch", type=int)
    se.add_argument("--seed", type=int)
    se.add_argument("--tta", action="store_true", help="mirroring for the cross-validation and the selection")
    se.add_argument("--no-ensembles", action="store_true", help="single models only")
    job_options(se)
    se.set_defaults(func=_cmd_submit)

    p = actions.add_parser("status", parents=[common], help="a job's state and progress")
    p.add_argument("job_id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_status)

    p = actions.add_parser("logs", parents=[common], help="a job's log")
    p.add_argument("job_id")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    p.add_argument("--offset", type=int, default=0)
    p.set_defaults(func=_cmd_logs)

    p = actions.add_parser("cancel", parents=[common], help="cancel a job (kills all its processes)")
    p.add_argument("job_id")
    p.set_defaults(func=_cmd_cancel)

    p = actions.add_parser("download", parents=[common], help="download a job's artifact (resumable, checked)")
    p.add_argument("job_id")
    p.add_argument("--artifact", default="model.zip", help="model.zip (default), results.json, trials.csv, ...")
    p.add_argument("-o", "--output", type=Path, default=None, help="file or folder (default: current folder)")
    p.set_defaults(func=_cmd_download)

    p = actions.add_parser("list", parents=[common], help="your jobs")
    p.add_argument("--state", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_list)


def _cmd_health(args: argparse.Namespace) -> int:
    client = client_from_args(args)
    info = client.health()
    print(f"{client.server_url}: {info['status']}, version {info['version']}, {info['slots']} slot(s), "
          f"executor {info['executor']}" + (f", GPUs {','.join(info['gpus'])}" if info["gpus"] else ", CPU"))
    if client._has_token:
        print(f"token accepted for user {client.whoami()!r}")
    return 0


def _cmd_upload(args: argparse.Namespace) -> int:
    record = client_from_args(args).upload_dataset(args.path, kind=args.kind, progress=_upload_progress)
    print(record["id"])
    if record.get("summary"):
        print(json.dumps(record["summary"]), file=sys.stderr)
    return 0


def _folds(values: list[str]) -> Union[str, list[int]]:
    # "all" stays a word: the server's job record keeps what the user asked for.
    return "all" if values == ["all"] else parse_folds(values)


def _cmd_submit(args: argparse.Namespace) -> int:
    client = client_from_args(args)
    if args.kind in ("search", "train"):
        upload_id = args.upload or client.upload_dataset(args.dataset, progress=_upload_progress)["id"]
    if args.kind == "search":
        params = {name: getattr(args, name) for name in (
            "space", "profile", "min_epochs", "max_epochs", "eta", "total_epochs", "max_trials", "wall_time",
            "iterations_per_epoch", "runtime_weight", "seed", "workers")}
        job = client.submit_search(upload_id, folds=_folds(args.folds), idempotency_key=args.idempotency_key,
                                   **params)
    elif args.kind == "train":
        config = None
        if args.config:
            text = Path(args.config).read_text() if Path(args.config).is_file() else args.config
            config = json.loads(text)
        job = client.submit_train(upload_id, epochs=args.epochs, config=config, folds=_folds(args.folds),
                                  max_epochs=args.max_epochs, iterations_per_epoch=args.iterations_per_epoch,
                                  seed=args.seed, idempotency_key=args.idempotency_key)
    elif args.kind == "select":
        job = client.submit_select(args.search_job, epochs=args.epochs, top=args.top, folds=_folds(args.folds),
                                   configurations=[] if args.configurations == ["none"] else args.configurations,
                                   iterations_per_epoch=args.iterations_per_epoch, seed=args.seed, tta=args.tta,
                                   ensembles=not args.no_ensembles, idempotency_key=args.idempotency_key)
    else:
        images = args.images_upload or client.upload_dataset(args.images, kind="images",
                                                             progress=_upload_progress)["id"]
        model_upload = args.model_upload
        if args.model is not None:
            model_upload = client.upload_file(args.model, kind="model", progress=_upload_progress)["id"]
        job = client.submit_predict(images, model_job_id=args.model_job, model_upload_id=model_upload,
                                    mirroring=args.mirroring, largest_component=args.largest_component,
                                    idempotency_key=args.idempotency_key)
    print(job["id"])
    if args.follow:
        for text in client.follow_logs(job["id"]):
            print(text, end="", flush=True)
        final = client.status(job["id"])
        print(describe(final), file=sys.stderr)
        return 0 if final["state"] == "succeeded" else 1
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    job = client_from_args(args).status(args.job_id)
    print(json.dumps(job, indent=2) if args.json else describe(job))
    return 0


def _cmd_logs(args: argparse.Namespace) -> int:
    client = client_from_args(args)
    if args.follow:
        for text in client.follow_logs(args.job_id, offset=args.offset):
            print(text, end="", flush=True)
        return 0
    offset = args.offset
    while True:
        page = client.logs(args.job_id, offset, limit=1 << 20)
        print(page["text"], end="")
        if page["next_offset"] >= page["size"] or page["next_offset"] == offset:
            return 0
        offset = page["next_offset"]


def _cmd_cancel(args: argparse.Namespace) -> int:
    print(describe(client_from_args(args).cancel(args.job_id)))
    return 0


def _cmd_download(args: argparse.Namespace) -> int:
    def show(done: int, total: int) -> None:
        print(f"\rdownloading {done / 2**20:.1f} / {total / 2**20:.1f} MB", end="", file=sys.stderr, flush=True)

    path = client_from_args(args).download(args.job_id, args.artifact, args.output, progress=show)
    print(file=sys.stderr)
    print(path)
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    jobs = client_from_args(args).list_jobs(state=args.state)
    if args.json:
        print(json.dumps(jobs, indent=2))
    for job in [] if args.json else jobs:
        print(describe(job))
    return 0
