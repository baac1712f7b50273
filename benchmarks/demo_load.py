"""Load test of `groma demo`: N users at once (default 20) each open a session through the page's API (gradio_client,
as a second process would), load the example image and ask for a grounded caption (or what `--task` says, with
boxes drawn on the picture by `--box`); prints latency percentiles, throughput, errors and the machine.

    python benchmarks/demo_load.py                       # starts `groma demo` (embedded model) on a free port
    python benchmarks/demo_load.py --url http://host:7860/ --users 20 --task "Locate" --question "the blue circle"
    python benchmarks/demo_load.py --task "Ask about drawn boxes" --box 40,50,160,180 --box 390,95,480,175

Every request must complete without error (the script exits 1 otherwise). Results: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "images" / "shapes.png"


def start_server(extra: list[str]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "groma_core.cli", "demo", "--port", str(port), *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(url, timeout=5).close()
            return proc, url
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                sys.exit("groma demo did not start (run it by hand to see why)")
            time.sleep(0.5)


def drawn(boxes: list[str], image) -> dict:
    """The value of the page's box tool (gradio-image-annotation) with ``boxes`` ("x1,y1,x2,y2" in pixels) drawn."""
    out = []
    for text in boxes:
        try:
            x1, y1, x2, y2 = (float(v) for v in text.split(","))
        except ValueError:
            sys.exit(f"--box {text!r}: expected four numbers X1,Y1,X2,Y2")
        out.append({"xmin": x1, "ymin": y1, "xmax": x2, "ymax": y2, "label": "", "color": "#ff0000"})
    return {"image": image, "boxes": out}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return f"{cpu}, {os.cpu_count()} cores{load}, Python {platform.python_version()}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running demo (default: start one with the embedded model)")
    parser.add_argument("--users", type=int, default=20, help="concurrent users (default 20)")
    parser.add_argument("--task", default="Grounded caption")
    parser.add_argument("--question", default="")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--image", default=str(EXAMPLE))
    parser.add_argument(
        "--box",
        action="append",
        default=[],
        metavar="X1,Y1,X2,Y2",
        help="a box drawn on the picture, in pixels (repeat for several), as the page's box tool sends it",
    )
    parser.add_argument("server_args", nargs="*", help="arguments for the started `groma demo` (after --)")
    args = parser.parse_args()
    from gradio_client import Client, handle_file

    annotation = drawn(args.box, handle_file(args.image)) if args.box else None
    proc = None
    url = args.url
    if not url:
        proc, url = start_server(args.server_args)
    try:
        clients = [Client(url, verbose=False) for _ in range(args.users)]  # one session each
        for c in clients:
            c.predict(handle_file(args.image), api_name="/load")
        latencies: list[float] = []
        errors: list[str] = []
        barrier = threading.Barrier(args.users + 1)
        lock = threading.Lock()

        def user(client):
            barrier.wait()
            t0 = time.perf_counter()
            try:
                out = client.predict(
                    annotation, args.task, args.question, args.max_new_tokens, False, 1.0, 1.0, api_name="/run"
                )
                status = out[-1]
                ok = status.startswith("done")
            except Exception as exc:  # noqa: BLE001 - counted and shown
                ok, status = False, f"{type(exc).__name__}: {exc}"
            with lock:
                latencies.append(time.perf_counter() - t0)
                if not ok:
                    errors.append(status)

        threads = [threading.Thread(target=user, args=(c,)) for c in clients]
        for t in threads:
            t.start()
        barrier.wait()
        start = time.perf_counter()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
    finally:
        if proc:
            proc.terminate()
            proc.wait(timeout=30)
    boxes = f", {len(args.box)} drawn box(es)" if args.box else ""
    print(f"groma demo load test: {args.users} concurrent users, task {args.task!r}{boxes}, max_new_tokens "
          f"{args.max_new_tokens}, {url}")
    print(f"machine: {machine()}")
    p50, p90, p99 = (percentile(latencies, q) for q in (0.5, 0.9, 0.99))
    print(f"latency s: p50 {p50:.2f}  p90 {p90:.2f}  p99 {p99:.2f}  max {max(latencies):.2f}  "
          f"mean {statistics.mean(latencies):.2f}")
    print(f"throughput: {len(latencies) / wall:.2f} requests/s ({len(latencies)} in {wall:.2f} s)")
    print(f"errors: {len(errors)}" + (f" (first: {errors[0]})" if errors else ""))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
