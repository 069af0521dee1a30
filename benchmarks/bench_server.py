"""Remote runner: upload throughput and the cost of status/log polling, on loopback.

1. Upload: a 1 GB archive (random bytes: incompressible, nothing to gain from its content) sent
   by ``RemoteClient.upload_file`` in its own process to ``autonnunet serve`` in another, in
   16 MB chunks each with its CRC32, then ``complete`` (whole-file SHA-256 check). Reported:
   throughput of the transfer (chunks + complete) and end to end (including the client's hashing
   pass before it starts), and the peak resident memory (VmHWM) of both processes.
   Goals: >= 200 MB/s; server and client each under 200 MB (streamed, never whole in memory).
2. Polling: 50 concurrent clients (threads in 5 processes, each with its own requests session)
   poll a job's status and a page of its log, as ``follow_logs`` and the Slicer module do.
   Measured twice: at a realistic rate (each client once per second) and back to back
   (saturation). Reported: latency percentiles, throughput, and server CPU time per request.
   Goal: p99 under 50 ms at the realistic rate.

Usage: python benchmarks/bench_server.py [--size-mb 1024] [--clients 50] [--seconds 20] [--no-write]
Writes its table to docs/benchmarks.md under "## Remote runner".
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import write_section  # noqa: E402

MB = 1 << 20


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def proc_status(pid: int, key: str) -> int:
    """A ``/proc/<pid>/status`` memory field in bytes (VmHWM = peak resident set)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


class Server:
    def __init__(self, data_dir: Path, max_upload_gb: float, http: str = "auto"):
        import requests

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(data_dir.parent / "server.log", "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "AutoNNUNetLib", "serve", "--port", str(self.port), "--data-dir", str(data_dir),
             "--gpus", "cpu", "--max-upload-gb", str(max_upload_gb), "--log-level", "warning", "--http", http],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        for _ in range(300):
            try:
                if requests.get(self.url + "/v1/health", timeout=1).ok:
                    return
            except requests.ConnectionError:
                time.sleep(0.1)
        raise RuntimeError("server did not start")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self.log.close()


# -- 1. upload ----------------------------------------------------------------------------------

UPLOAD_CLIENT = r"""
import json, os, sys, time
from pathlib import Path
from AutoNNUNetLib.files import sha256_file
from AutoNNUNetLib.remote.client import RemoteClient
url, token, path, chunk = sys.argv[1:5]
client = RemoteClient(url, token, timeout=(10, 300), chunk_size=int(chunk))
t0 = time.perf_counter()
sha256_file(Path(path))  # what upload_file does first; timed separately
t1 = time.perf_counter()
record = client.upload_file(path, wait=False)
t2 = time.perf_counter()
cpu = sum(os.times()[:2])
hwm = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
print(json.dumps({"hash_seconds": t1 - t0, "upload_seconds": t2 - t1, "state": record["state"],
                  "received": record["received"], "client_peak_rss": hwm,
                  "client_cpu": cpu}))
"""


def bench_upload(work: Path, size_mb: int, chunk_mb: int, parsers: list[str]) -> list[dict]:
    from AutoNNUNetLib.remote.server.store import Store

    archive = work / "archive.bin"
    with open(archive, "wb") as handle:  # written in pieces: the benchmark itself stays small too
        for _ in range(size_mb):
            handle.write(os.urandom(MB))
    results = []
    try:
        for http in parsers:
            data_dir = work / f"upload-data-{http}"
            data_dir.mkdir()
            token = Store(data_dir / "autonnunet.db").create_token("bench")
            server = Server(data_dir, max_upload_gb=size_mb / 1024 + 1, http=http)
            try:
                base_rss = proc_status(server.process.pid, "VmRSS")
                cpu0 = proc_cpu_seconds(server.process.pid)
                out = subprocess.run([sys.executable, "-c", UPLOAD_CLIENT, server.url, token, str(archive),
                                      str(chunk_mb * MB)], capture_output=True, text=True, check=True)
                result = json.loads(out.stdout.strip().splitlines()[-1])
                result["server_peak_rss"] = proc_status(server.process.pid, "VmHWM")
                result["server_cpu"] = proc_cpu_seconds(server.process.pid) - cpu0
                result["server_idle_rss"] = base_rss
            finally:
                server.stop()
                shutil.rmtree(data_dir, ignore_errors=True)
            assert result["received"] == size_mb * MB and result["state"] in ("validating", "invalid"), result
            result.update(size_mb=size_mb, http=http)
            results.append(result)
    finally:
        archive.unlink()
    return results


# -- 2. polling ---------------------------------------------------------------------------------


def poller(url: str, token: str, job_id: str, threads: int, seconds: float, interval: float, queue) -> None:
    """One process of pollers: ``threads`` clients, each status + events + log page per round."""
    import requests

    latencies: list[float] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client(index: int) -> None:
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {token}"
        offset = (index * 7919) % (1 << 20)
        mine = []
        next_round = time.monotonic() + (index % 10) * interval / 10  # spread the clients out
        while time.monotonic() < deadline:
            if interval:
                pause = next_round - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                next_round += interval
            # What RemoteJob (the Slicer module) fetches per poll: status, new events, new log text.
            for path, params in ((f"/v1/jobs/{job_id}", None),
                                 (f"/v1/jobs/{job_id}/events", {"offset": 0, "limit": 65536}),
                                 (f"/v1/jobs/{job_id}/log", {"offset": offset, "limit": 16384})):
                start = time.perf_counter()
                response = session.get(url + path, params=params, timeout=30)
                mine.append(time.perf_counter() - start)
                response.raise_for_status()
            offset = (offset + 16384) % (1 << 20)
        with lock:
            latencies.extend(mine)

    workers = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    queue.put(latencies)


def bench_polling(work: Path, clients: int, seconds: float) -> list[dict]:
    from AutoNNUNetLib.remote.server.store import Store

    data_dir = work / "poll-data"
    store = Store(data_dir / "autonnunet.db")
    token = store.create_token("bench")
    job, _ = store.create_job("bench", "search", {"upload_id": "u0000000000000000"})
    progress = {"stage": "search", "trial": "12_rung_1", "rung": 1, "epoch": 7, "max_epochs": 37,
                "best_dice": 0.8712, "eta_seconds": 5400.0, "trials_started": 13, "trials_finished": 12}
    store.update_job(job.id, state="succeeded", progress=progress, finished=time.time())
    job_dir = data_dir / "jobs" / job.id
    job_dir.mkdir(parents=True)
    line = "2026-01-01 12:00:00 INFO epoch 7/37 loss 0.4123 pseudo Dice 0.8512 0.8312 (1.1 s/it)\n"
    (job_dir / "log.txt").write_text(line * ((1 << 20) // len(line) + 1))  # a 1 MB log
    event = {"kind": "epoch", "time": 0.0, "data": {"trial": "12_rung_1", "epoch": 7, "max_epochs": 37, "loss": 0.41}}
    (job_dir / "events.jsonl").write_text((json.dumps(event) + "\n") * 200)  # a search's event page
    # A long queue behind it (2,000 jobs of another user; the first needs more slots than the
    # server has, so none starts): the job list must stay fast however long the queue is.
    with store.transaction() as db:
        for index in range(2000):
            db.execute("INSERT INTO jobs(id, user, kind, params, state, slots, created) VALUES (?, 'queue', 'train',"
                       " '{}', 'queued', ?, ?)", (f"jq{index:015x}", 2 if index == 0 else 1, time.time()))
        for index in range(2000):
            db.execute("INSERT INTO jobs(id, user, kind, params, state, slots, created) VALUES (?, 'bench', 'train',"
                       " '{}', 'queued', 1, ?)", (f"jb{index:015x}", time.time()))
    server = Server(data_dir, max_upload_gb=1)
    rows = []
    try:
        processes = 5 if clients >= 5 else 1
        for label, interval in (("1 poll/s per client", 1.0), ("back to back", 0.0)):
            ctx = multiprocessing.get_context("spawn")
            queue = ctx.Queue()
            cpu0 = proc_cpu_seconds(server.process.pid)
            wall0 = time.perf_counter()
            procs = [ctx.Process(target=poller, args=(server.url, token, job.id, clients // processes, seconds,
                                                      interval, queue)) for _ in range(processes)]
            for p in procs:
                p.start()
            latencies = [x for _ in procs for x in queue.get()]
            for p in procs:
                p.join()
            wall = time.perf_counter() - wall0
            cpu = proc_cpu_seconds(server.process.pid) - cpu0
            latencies.sort()

            def pct(q: float) -> float:
                return 1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))]

            rows.append({"mode": label, "requests": len(latencies), "rps": len(latencies) / seconds,
                         "p50": pct(0.50), "p95": pct(0.95), "p99": pct(0.99), "max": 1000 * latencies[-1],
                         "mean": 1000 * statistics.fmean(latencies), "cpu_ms_per_request": 1000 * cpu / len(latencies),
                         "server_cpu_share": cpu / wall})
        rows.append(bench_listing(server.url, token))
    finally:
        server.stop()
    return rows


def bench_listing(url: str, token: str) -> dict:
    """GET /v1/jobs of a user with 2,000 queued jobs behind 2,000 of another user: a page, and all pages."""
    import requests

    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token}"
    pages = []
    for _ in range(20):
        start = time.perf_counter()
        session.get(url + "/v1/jobs", params={"limit": 200}, timeout=120).raise_for_status()
        pages.append(time.perf_counter() - start)
    start = time.perf_counter()
    count, offset = 0, 0
    while True:
        page = session.get(url + "/v1/jobs", params={"offset": offset, "limit": 1000}, timeout=120).json()
        count += len(page)
        offset += len(page)
        if len(page) < 1000:
            break
    return {"mode": "list", "page_ms": 1000 * statistics.median(pages), "all_seconds": time.perf_counter() - start,
            "jobs": count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--chunk-mb", type=int, default=16, help="upload chunk size (the client's default: 16)")
    parser.add_argument("--repeat", type=int, default=3, help="upload runs per parser (the machine is shared)")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--no-write", action="store_true", help="print only, do not update docs/benchmarks.md")
    args = parser.parse_args()

    # uvicorn picks httptools when it is installed, else its pure-Python parser (h11): measure both.
    parsers = ["httptools", "h11"] if importlib.util.find_spec("httptools") else ["h11"]
    parsers = [p for p in parsers for _ in range(args.repeat)]
    with tempfile.TemporaryDirectory(prefix="bench-server-") as tmp:
        work = Path(tmp)
        uploads = bench_upload(work, args.size_mb, args.chunk_mb, parsers)
        polling = bench_polling(work, args.clients, args.seconds)

    size = args.size_mb
    lines = [
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores (1-min load "
        f"average {os.getloadavg()[0]:.1f} at the end, this benchmark's own clients included), Python {platform.python_version()}; client and "
        "server in separate processes on 127.0.0.1. Script: `benchmarks/bench_server.py`.",
        "",
        f"### Upload of a {size} MB archive ({args.chunk_mb} MB chunks, CRC32 per chunk, SHA-256 of the whole "
        "file)",
        "",
        "| run | uvicorn HTTP parser | transfer (chunks + complete) | end to end incl. client hashing | "
        "server CPU per GB | server peak RSS (idle) | client peak RSS |",
        "|---|---|---|---|---|---|---|",
    ]
    for index, up in enumerate(uploads, 1):
        lines.append(
            f"| {index} | {up['http']} | {size / up['upload_seconds']:.0f} MB/s | "
            f"{size / (up['upload_seconds'] + up['hash_seconds']):.0f} MB/s | "
            f"{up['server_cpu'] * 1024 / size:.1f} s | {up['server_peak_rss'] / MB:.0f} MB "
            f"({up['server_idle_rss'] / MB:.0f} MB) | {up['client_peak_rss'] / MB:.0f} MB |")
    best = uploads[0]
    transfer = statistics.median(size / u["upload_seconds"] for u in uploads)
    lines += [
        "",
        "The idle figure is the server as `autonnunet serve` starts it (FastAPI, uvicorn, SQLite; the command "
        "imports only the server's own module, no numpy, SimpleITK or torch). An upload adds only its in-flight "
        "blocks (1 MB, at most two at a time per chunk being received).",
        "",
        f"### Polling by {args.clients} concurrent clients ({args.seconds:.0f} s; each round = what `RemoteJob` "
        "fetches: job status + a page of events + a 16 KB log page)",
        "",
        "| rate | requests/s | p50 ms | p95 ms | p99 ms | max ms | server CPU ms/request | server CPU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    listing = polling.pop()
    for row in polling:
        lines.append(f"| {row['mode']} | {row['rps']:.0f} | {row['p50']:.1f} | {row['p95']:.1f} | {row['p99']:.1f} | "
                     f"{row['max']:.1f} | {row['cpu_ms_per_request']:.2f} | {100 * row['server_cpu_share']:.0f}% |")
    realistic = polling[0]
    lines += [
        "",
        f"Job list with 2,000 queued jobs of this user behind 2,000 of another: one page (200 jobs, with their "
        f"queue positions) {listing['page_ms']:.0f} ms (median of 20); all {listing['jobs']} jobs in pages of "
        f"1,000: {listing['all_seconds']:.2f} s (before the list was paged and linear: 98-104 s for 2,000).",
        "",
        f"Goal p99 < 50 ms at the realistic rate (each client polls once per second, as the Slicer module and "
        f"`follow_logs` do): {'met' if realistic['p99'] < 50 else 'NOT met'} ({realistic['p99']:.1f} ms). "
        f"Upload goal >= 200 MB/s: {'met' if transfer >= 200 else 'NOT met'} (median {transfer:.0f} MB/s; the "
        "server needs the CPU time above per GB, split over its receiving thread and a hashing thread, so "
        "the rate follows the CPU share left by other work on this machine); memory goal: "
        f"{'met' if max(max(u['server_peak_rss'], u['client_peak_rss']) for u in uploads) < 200 * MB else 'NOT met'}"
        f" (default parser: {best['http']}). "
        "Back to back shows where one server process saturates; the latencies there are queueing, not "
        "per-request cost.",
    ]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("Remote runner", body)


if __name__ == "__main__":
    main()
