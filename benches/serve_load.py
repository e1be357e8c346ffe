"""Load on `icedit serve`: concurrent OpenAI-style edit requests against one server, then the same
through a Redis queue with 1 and 2 `icedit worker`s. Throughput, latency percentiles, peak RSS,
429s, and a check that no job is lost or duplicated (every answer carries its own seed, and the
queue holds exactly one result per job). The baseline is what a user has without a server: one
`icedit edit` process per edit (a model load each time).

  .venv-ref/bin/python benches/serve_load.py [--pipeline tiny|medium] [--jobs N]

Needs redis-server on PATH (apt install redis-server). The machine's cores are shared fairly:
the server, or each of N workers, gets cores/N threads.
"""

import argparse
import base64
import io
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benches"))
CORES = os.cpu_count() or 2


def pipeline(name):
    """The model folder and (photo PNG bytes, width, steps) of a load run."""
    if name == "tiny":
        photo = (ROOT / "tests/fixtures/edit/source.png").read_bytes()
        return ROOT / "tests/fixtures/fill_pipeline/tiny", photo, 64, 12
    from fill_bench import prepare
    from PIL import Image
    import numpy as np

    model = ROOT / "target" / "bench" / "fill-medium"
    model.parent.mkdir(parents=True, exist_ok=True)
    prepare(model)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:192, 0:256]
    img = np.stack([128 + 100 * np.sin(x / 17.0), 128 + 100 * np.cos(y / 13.0),
                    128 + 60 * np.sin((x + y) / 21.0)], axis=-1) + rng.normal(0, 10, (192, 256, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return model, buf.getvalue(), 256, 4


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args, env, ready):
    """Starts `icedit ARGS`; returns (process, the text after `ready` on its stderr line)."""
    proc = subprocess.Popen(args, env=env, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if ready in line:
            after = line.split(ready, 1)[1].strip()
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return proc, after
    raise RuntimeError(f"{args[1]} exited before it was ready")


def peak_rss_mib(proc):
    try:
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def stop(proc):
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def multipart(fields, photo):
    boundary = "icedit-load-boundary"
    body = io.BytesIO()
    for name, value in fields.items():
        body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
                   f"{value}\r\n".encode())
    body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; '
               f'filename="photo.png"\r\nContent-Type: image/png\r\n\r\n'.encode())
    body.write(photo)
    body.write(f"\r\n--{boundary}--\r\n".encode())
    return f"multipart/form-data; boundary={boundary}", body.getvalue()


def recipe_seed(png):
    from PIL import Image

    return json.loads(Image.open(io.BytesIO(png)).info["icedit"])["seed"]


def load(url, photo, width, steps, jobs, concurrency):
    """`jobs` edits (seeds 0..jobs) from `concurrency` clients; a 429 waits and retries."""
    seeds = list(range(jobs))
    lock = threading.Lock()
    latencies, answers, refused, errors = [], {}, [0], []

    def client():
        while True:
            with lock:
                if not seeds:
                    return
                seed = seeds.pop(0)
            content_type, body = multipart({
                "prompt": "make it night", "n": 1, "seed": seed, "steps": steps,
                "size": f"{width}x{width}", "response_format": "b64_json"}, photo)
            while True:
                request = urllib.request.Request(url + "/v1/images/edits", data=body,
                                                 headers={"Content-Type": content_type})
                started = time.perf_counter()
                try:
                    with urllib.request.urlopen(request, timeout=3600) as response:
                        data = json.loads(response.read())["data"]
                    with lock:
                        latencies.append(time.perf_counter() - started)
                        answers.setdefault(seed, []).extend(
                            recipe_seed(base64.b64decode(d["b64_json"])) for d in data)
                    break
                except urllib.error.HTTPError as e:
                    if e.code == 429:
                        with lock:
                            refused[0] += 1
                        time.sleep(float(e.headers.get("Retry-After", "1")) / 10)
                        continue
                    with lock:
                        errors.append(f"seed {seed}: {e.code} {e.read()[:200]}")
                    break

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    lost = [s for s in range(jobs) if s not in answers]
    wrong = [s for s, got in answers.items() if got != [s]]
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    return {"jobs": jobs, "concurrency": concurrency, "wall_s": wall, "jobs_per_min": 60 * jobs / wall,
            "p50_s": q[49], "p95_s": q[94], "p99_s": q[98], "refused_429": refused[0],
            "lost": len(lost), "duplicated_or_wrong": len(wrong), "errors": errors}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pipeline", choices=["tiny", "medium"], default="tiny")
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--queue-size", type=int, default=8)
    args = parser.parse_args()
    model, photo, width, steps = pipeline(args.pipeline)
    jobs = args.jobs or (48 if args.pipeline == "tiny" else 8)
    subprocess.run(["cargo", "build", "--release", "-p", "icedit-cli"], cwd=ROOT, check=True)
    icedit = str(ROOT / "target" / "release" / "icedit")
    common = ["--model", str(model), "--no-lora", "--dtype", "f32", "--max-seq-len", "16", "--quiet"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    work = Path(tempfile.mkdtemp(prefix="icedit-load-"))
    rows = []

    # Without a server: one process per edit.
    (work / "photo.png").write_bytes(photo)
    per_edit = []
    for seed in range(3):
        started = time.perf_counter()
        subprocess.run([icedit, "edit", *common, "--image", str(work / "photo.png"),
                        "--instruction", "make it night", "--width", str(width), "--steps", str(steps),
                        "--seed", str(seed), "--out", str(work / f"cli-{seed}.png")],
                       env=env, check=True, stderr=subprocess.DEVNULL)
        per_edit.append(time.perf_counter() - started)
    baseline = 60 / statistics.median(per_edit)
    print(f"icedit edit, one process per edit: {statistics.median(per_edit):.2f} s/edit, "
          f"{baseline:.1f} edits/min", flush=True)

    def run_all(label, url, processes):
        for c in [int(x) for x in args.concurrency.split(",")]:
            row = load(url, photo, width, steps, jobs, c)
            row.update(setup=label, vs_cli=row["jobs_per_min"] / baseline)
            rows.append(row)
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v)
                              for k, v in row.items()}), flush=True)
        return [round(peak_rss_mib(p)) for p in processes]

    # One server running the jobs itself.
    server, listening = start([icedit, "serve", *common, "--port", "0", "--queue-size",
                               str(args.queue_size)], dict(env, RAYON_NUM_THREADS=str(CORES)),
                              "listening on ")
    rss = run_all("serve", listening, [server])
    stop(server)
    for row in rows:
        row["peak_rss_mib"] = rss

    # The same through Redis, with 1 and 2 workers sharing the cores.
    if shutil.which("redis-server") is None:
        print("redis-server not found: the queue runs are skipped (apt install redis-server)")
    for workers in (1, 2):
        if shutil.which("redis-server") is None:
            break
        port = free_port()
        redis = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--appendonly",
                                  "no", "--dir", str(work)], stdout=subprocess.DEVNULL)
        time.sleep(0.5)
        queue = f"redis://127.0.0.1:{port}"
        procs = []
        for w in range(workers):
            procs.append(start([icedit, "worker", *common, "--queue", queue, "--name", f"w{w}"],
                               dict(env, RAYON_NUM_THREADS=str(max(1, CORES // workers))),
                               "taking jobs from ")[0])
        server, listening = start([icedit, "serve", *common, "--port", "0", "--queue", queue,
                                   "--queue-size", str(args.queue_size)], env, "listening on ")
        first = len(rows)
        rss = run_all(f"redis, {workers} worker{'s' if workers > 1 else ''}", listening,
                      [server, *procs])
        results = subprocess.run(["redis-cli", "-p", str(port), "--scan", "--pattern",
                                  "icedit:result:*"], capture_output=True, text=True).stdout.split()
        expected = jobs * (len(rows) - first)
        for row in rows[first:]:
            row["peak_rss_mib"] = rss
            row["queue_results"] = f"{len(results)} of {expected}"
        stop(server)
        for p in procs:
            stop(p)
        redis.terminate()
        redis.wait()

    print("\n| setup | clients | jobs | edits/min | vs one process per edit | p50 s | p95 s | p99 s "
          "| 429s | lost | duplicated | results in Redis | peak RSS MiB (server, workers) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setup']} | {r['concurrency']} | {r['jobs']} | {r['jobs_per_min']:.1f} | "
              f"{r['vs_cli']:.1f}x | {r['p50_s']:.2f} | {r['p95_s']:.2f} | {r['p99_s']:.2f} | "
              f"{r['refused_429']} | {r['lost']} | {r['duplicated_or_wrong']} | "
              f"{r.get('queue_results', '-')} | "
              f"{', '.join(str(x) for x in r['peak_rss_mib'])} |")
    shutil.rmtree(work, ignore_errors=True)
    if any(r["lost"] or r["duplicated_or_wrong"] or r["errors"] for r in rows):
        sys.exit("some jobs were lost, duplicated or failed (above)")


if __name__ == "__main__":
    main()
