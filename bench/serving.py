"""Serving a registered model (issue 23): a bounded burst on loopback against ``mlflow models serve``.

    python bench/serving.py [--rows 256] [--workers 1 2] [--max-batch 1 32] [--requests 160] [--clients 8]
                            [--reuse /tmp/servebench-XXXX]

Trains one ``early`` head on ``--rows`` real Fashion pairs (EfficientNet-Lite0 + MiniLM, 3 epochs), registers it,
then for each ``--workers`` and ``--max-batch`` value (``MM_SERVE_MAX_BATCH``: 1 answers each request alone, as
before micro-batching) serves it with ``mlflow models serve --env-manager local -w N`` on 127.0.0.1 and measures:
the time until the server answers its first request (the encoders load at start), single-client latency (p50
over 20 requests), ``--clients`` concurrent clients (p50, p99, requests/s over ``--requests``), and the status
of each bad payload. Each request is one sample: an inline JPEG (base64) and a product title. The server's CPU
seconds per request and the cores the server and the clients kept busy say how much of a small machine the load
generator itself took (it runs on the same cores). ``--reuse``: serve the model an earlier run trained there.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import struct
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]

BAD = {  # name -> the records sent
    "all modalities null": [{"image": None, "text": None}],
    "server-side path /etc/passwd": [{"image": "/etc/passwd", "text": None}],
    "not base64": [{"image": "base64:%%%", "text": None}],
    "a decompression bomb (inline)": None,  # filled in main: a 20000x20000 PNG
    "unknown column": [{"picture": "x", "text": "shirt"}],
}


def bomb_png_bytes(side: int = 20000) -> bytes:
    """A 1-bit PNG declaring side x side pixels whose zlib stream is a few hundred KB (decoded: side^2 bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    comp, row = zlib.compressobj(9), b"\0" * (1 + side // 8)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def body(records: list[dict]) -> bytes:
    return json.dumps({"dataframe_records": records}).encode()


def train(rows: int, tmp: Path) -> tuple[str, str]:
    """An ``early`` head on ``rows`` Fashion pairs, registered; returns (model URI, tracking URI)."""
    sys.path.insert(0, str(ROOT))
    from bench.scaling import DATA, manifest  # (it sets Prefect's cache off for this process: fine here)
    from flows.pipeline import extract_flow, train_flow
    from stores.config_files import load_config
    man = manifest(rows, 1, tmp / "raw")
    cfg = load_config(None, [
        "data.dataset=manifest", f"data.manifest={man}", f"data.allowed_roots=[{DATA}]", "data.name=servebench",
        "encoders.image.kind=efficientnet_lite0", "encoders.text.kind=minilm", f"store.root={tmp}/store",
        f"tracking.uri=sqlite:///{tmp}/mlruns/mlflow.db", f"tracking.artifact_root={tmp}/mlruns/art",
        "head.name=early", "train.epochs=3", "train.device=cpu", "eval.test_rates=[0.0,1.0]"])
    extract_flow(cfg, version=False)
    train_flow(cfg)
    return "models:/servebench@champion", cfg.tracking.uri


def serve(model: str, tracking: str, workers: int, max_batch: int, port: int, tmp: Path) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking, "MM_SERVE_MAX_BATCH": str(max_batch),  # the scoring server runs `uvicorn` from the PATH
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", model, "--env-manager", "local",
                             "-h", "127.0.0.1", "-p", str(port), "-w", str(workers)], env=env, cwd=tmp,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def burst(url: str, payload: bytes, n: int, clients: int) -> tuple[list[float], float, list[int]]:
    """``n`` requests from ``clients`` threads: latencies (s), wall time, status codes. Each thread keeps one
    HTTP client (a keep-alive connection, as a real client would): a new ``httpx.Client`` per request costs
    more CPU than the request itself (an SSL context each), taken from the server's cores on a small machine."""
    local = threading.local()

    def one(_):
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=120)
        t = time.perf_counter()
        r = local.client.post(url, content=payload, headers={"Content-Type": "application/json"})
        return time.perf_counter() - t, r.status_code
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        got = list(pool.map(one, range(n)))
    return [g[0] for g in got], time.perf_counter() - t0, [g[1] for g in got]


def cpu_seconds(group: int) -> float:
    """User + system CPU seconds of the processes in a process group (the model server's)."""
    pids = subprocess.run(["pgrep", "-g", str(group)], capture_output=True, text=True).stdout.split()
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--max-batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--requests", type=int, default=160)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--port", type=int, default=5091)
    ap.add_argument("--reuse", type=Path, help="an earlier run's folder: serve the model it trained")
    args = ap.parse_args()
    if args.reuse:
        sys.path.insert(0, str(ROOT))
        tmp, model = args.reuse.resolve(), "models:/servebench@champion"
        tracking = f"sqlite:///{tmp}/mlruns/mlflow.db"
    else:
        tmp = Path(tempfile.mkdtemp(prefix="servebench-"))
        model, tracking = train(args.rows, tmp)
        print(f"trained in {tmp} (--reuse it)", file=sys.stderr)
    from bench.scaling import DATA  # importable once train() put the checkout on the path
    photo = next((DATA / "fashion" / "images").glob("*.jpg"))
    good = body([{"image": "data:image/jpeg;base64," + base64.b64encode(photo.read_bytes()).decode(),
                  "text": "Men Navy Blue Solid Casual Shirt"}])
    BAD["a decompression bomb (inline)"] = [{"image": "base64:" + base64.b64encode(bomb_png_bytes()).decode(),
                                             "text": None}]
    lines = [f"rows {args.rows}, {os.cpu_count()} CPU cores; one sample a request (inline JPEG + title)", "",
             "| workers | max batch | ready after start (s) | first request (s) | 1 client p50 (ms) | "
             f"{args.clients} clients p50 (ms) | p99 (ms) | req/s | server CPU per request (ms) | server / client "
             "cores busy | errors |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    statuses: dict[str, str] = {}
    for w, b in [(w, b) for w in args.workers for b in args.max_batch]:
        url = f"http://127.0.0.1:{args.port}"
        t0 = time.perf_counter()
        proc = serve(model, tracking, w, b, args.port, tmp)
        try:
            while True:
                try:
                    if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if proc.poll() is not None or time.perf_counter() - t0 > 600:
                    raise SystemExit(f"the model server did not start (rc {proc.poll()})")
                time.sleep(0.5)
            ready = time.perf_counter() - t0
            first, _, _ = burst(f"{url}/invocations", good, 1, 1)
            single, _, _ = burst(f"{url}/invocations", good, 20, 1)
            server0, client0 = cpu_seconds(proc.pid), os.times()
            lat, wall, codes = burst(f"{url}/invocations", good, args.requests, args.clients)
            server, client = cpu_seconds(proc.pid) - server0, os.times()
            client = client.user + client.system - client0.user - client0.system
            errors = sum(c != 200 for c in codes)
            lines.append(f"| {w} | {b} | {ready:.1f} | {first[0]:.2f} | {statistics.median(single) * 1000:.0f} | "
                         f"{pct(lat, 50) * 1000:.0f} | {pct(lat, 99) * 1000:.0f} | {args.requests / wall:.1f} | "
                         f"{server / args.requests * 1000:.0f} | {server / wall:.2f} / {client / wall:.2f} | {errors} |")
            for name, records in BAD.items():
                r = httpx.post(f"{url}/invocations", content=body(records), timeout=120,
                               headers={"Content-Type": "application/json"})
                text = r.text.replace("\n", " ")
                statuses[name] = f"{r.status_code}: {text[:140]}{'...' if len(text) > 140 else ''} ({len(r.text)} B)"
        finally:  # the whole group: `mlflow models serve` runs uvicorn in a child that would keep the port
            os.killpg(proc.pid, 15)
            proc.wait(30)
            while subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True).returncode == 0:
                time.sleep(0.2)
    lines += ["", "| bad payload | status: response (size) |", "|---|---|"]
    lines += [f"| {k} | {v.replace('|', '/')} |" for k, v in statuses.items()]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
