"""``autonnunet serve`` and ``autonnunet token``: run the job server, manage its tokens.

uvicorn and FastAPI are imported only when the server starts.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

from ... import __version__
from ...jobs import SlurmOptions
from .settings import API_PREFIX, GiB, DataDir, ServerSettings, default_data_dir, parse_gpus
from .store import Store

def add_commands(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve", help="run the job server (remote GPU runner)",
        description="Serve the AutoNNUNet job API on this machine. Jobs keep running when the server stops; "
                    "a restarted server re-attaches to them or resumes them.")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default: %(default)s; put a TLS proxy in front for other hosts)")
    serve.add_argument("--port", type=int, default=8765)
    serve.add_argument("--data-dir", type=Path, default=None,
                       help="where uploads, jobs and the database live (default: $AUTONNUNET_DATA_DIR or "
                            "~/.local/share/autonnunet-server)")
    serve.add_argument("--gpus", default="", help="GPU ids for the queue, e.g. 0,1 (one job slot each); "
                                                  "'' or cpu for a CPU-only server")
    serve.add_argument("--cpu-slots", type=int, default=1, help="parallel jobs on a CPU-only server")
    serve.add_argument("--executor", choices=["local", "slurm", "submitit-local"], default="local",
                       help="where workers run: local processes (default) or Slurm jobs through submitit")
    serve.add_argument("--slurm-partition")
    serve.add_argument("--slurm-timeout-min", type=int, default=24 * 60)
    serve.add_argument("--slurm-cpus-per-task", type=int, default=8)
    serve.add_argument("--slurm-mem-gb", type=int)
    serve.add_argument("--slurm-account")
    serve.add_argument("--max-upload-gb", type=float, default=50.0)
    serve.add_argument("--min-free-gb", type=float, default=1.0, help="disk space always kept free")
    serve.add_argument("--max-queued-jobs", type=int, default=100,
                       help="unfinished (queued or running) jobs per user (default: %(default)s)")
    serve.add_argument("--max-open-uploads", type=int, default=10,
                       help="uploads per user still receiving or validating (default: %(default)s)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--http", default="auto", choices=["auto", "h11", "httptools"],
                       help="uvicorn's HTTP parser; auto = httptools when installed (faster uploads), else h11")
    serve.set_defaults(func=_cmd_serve)

    token = subparsers.add_parser("token", help="manage the job server's access tokens")
    token_sub = token.add_subparsers(dest="token_command", metavar="ACTION", required=True)
    create = token_sub.add_parser("create", help="create a token for a user (printed once)")
    create.add_argument("--user", required=True)
    create.add_argument("--label", default="", help="a note, e.g. the machine the token is for")
    create.add_argument("--data-dir", type=Path, default=None)
    create.set_defaults(func=_cmd_token_create)
    listing = token_sub.add_parser("list", help="list tokens (never their secrets)")
    listing.add_argument("--data-dir", type=Path, default=None)
    listing.set_defaults(func=_cmd_token_list)
    revoke = token_sub.add_parser("revoke", help="revoke a user's tokens or one token by id")
    revoke.add_argument("--user")
    revoke.add_argument("--id", dest="token_id", help="the id `token list` shows (must name exactly one token)")
    revoke.add_argument("--data-dir", type=Path, default=None)
    revoke.set_defaults(func=_cmd_token_revoke)


def _store_for(data_dir: Optional[Path]) -> Store:
    root = Path(data_dir or default_data_dir()).expanduser().resolve()
    return Store(DataDir(root).db)


def _cmd_token_create(args: argparse.Namespace) -> int:
    secret = _store_for(args.data_dir).create_token(args.user, args.label)
    print(secret)
    print(f"token for user {args.user!r} created; it is shown only this once. Clients use it with "
          f"--token or AUTONNUNET_TOKEN.", file=sys.stderr)
    return 0


def _cmd_token_list(args: argparse.Namespace) -> int:
    for token in _store_for(args.data_dir).list_tokens():
        state = "revoked" if token["revoked"] else "active"
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(token["created"]))
        print(f"{token['id']}  {token['user']:<16} {state:<8} {created}  {token['label']}")
    return 0


def _cmd_token_revoke(args: argparse.Namespace) -> int:
    count = _store_for(args.data_dir).revoke_tokens(user=args.user, token_id=args.token_id)
    print(f"revoked {count} token(s)")
    return 0


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    slurm = SlurmOptions(partition=args.slurm_partition, timeout_min=args.slurm_timeout_min,
                         cpus_per_task=args.slurm_cpus_per_task, mem_gb=args.slurm_mem_gb,
                         additional={"account": args.slurm_account} if args.slurm_account else {})
    return ServerSettings(
        data_dir=args.data_dir or default_data_dir(), gpus=parse_gpus(args.gpus), cpu_slots=args.cpu_slots,
        executor=args.executor, slurm=slurm, max_upload_bytes=int(args.max_upload_gb * GiB),
        min_free_bytes=int(args.min_free_gb * GiB), max_queued_jobs=max(1, args.max_queued_jobs),
        max_open_uploads=max(1, args.max_open_uploads),
    )



def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import create_app

    settings = settings_from_args(args)
    app = create_app(settings)
    where = f"GPUs {','.join(settings.gpus)}" if settings.gpus else f"CPU ({settings.cpu_slots} slot(s))"
    print(f"AutoNNUNet server {__version__}: http://{args.host}:{args.port}{API_PREFIX} (docs at /docs), "
          f"data in {settings.data_dir}, {where}, executor {settings.executor}", file=sys.stderr, flush=True)
    # A bounded graceful shutdown: a client stuck mid-chunk must not keep the server from
    # stopping (its partial chunk is discarded anyway).
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_keep_alive=30,
                timeout_graceful_shutdown=5, http=args.http)
    return 0
