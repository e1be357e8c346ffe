"""What the early-filter seed search costs against a single edit, measured end to end with
`icedit edit` on the random "medium" Fill pipeline of fill_bench.py (built there if missing).

  .venv-ref/bin/python benches/search_bench.py        # 4 candidates, 2 early steps of 8, CPU f32

The judge is a local stand-in server (instant answers), so the figures are icedit's own cost:
transformer evaluations, the VAE decodes of the previews, and the rest. A real VLM judge adds
its latency per call (N - 1 calls), which --json reports.
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benches"))


class Judge(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        body = json.dumps({"choices": [{"message": {"content": "2"}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--candidates", type=int, default=4)
    p.add_argument("--early-steps", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--width", type=int, default=256)
    a = p.parse_args()

    from fill_bench import inputs, prepare

    model = ROOT / "target" / "bench" / "fill-medium"
    prepare(model)
    image, _ = inputs(model, 512)
    server = HTTPServer(("127.0.0.1", 0), Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    judge = f"openai:http://127.0.0.1:{server.server_port}/v1"

    subprocess.run(["cargo", "build", "--release", "-q", "-p", "icedit-cli"], cwd=ROOT, check=True)
    binary = ROOT / "target" / "release" / "icedit"
    out = ROOT / "target" / "bench" / "search"
    out.mkdir(parents=True, exist_ok=True)
    base = [str(binary), "edit", "--model", str(model), "--image", str(image), "--instruction",
            "make it night", "--no-lora", "--width", str(a.width), "--steps", str(a.steps),
            "--dtype", "f32", "--quiet", "--json"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")

    def run(name, extra):
        t = time.perf_counter()
        res = subprocess.run(base + ["--out", str(out / f"{name}.png")] + extra, env=env,
                             check=True, capture_output=True, text=True)
        return time.perf_counter() - t, json.loads(res.stdout)

    single_s, _ = run("single", ["--seed", "42"])
    rows = [("single edit", single_s, a.steps)]
    for filt in ("continue", "restart"):
        secs, summary = run(filt, ["--seeds", str(a.candidates), "--early-steps", str(a.early_steps),
                                   "--judge", judge, "--early-filter", filt])
        rows.append((f"search, {filt}", secs, summary["search"]["transformer_evaluations"]))
    print(f"{a.candidates} candidates x {a.early_steps} early steps of {a.steps}, "
          f"diptych {2 * a.width} wide, CPU f32, medium random pipeline")
    print(f"{'':22}{'wall':>9}{'NFE':>6}{'time vs single':>16}{'NFE vs single':>15}")
    for name, secs, nfe in rows:
        print(f"{name:22}{secs:8.1f}s{nfe:6d}{secs / single_s:15.2f}x{nfe / a.steps:14.2f}x")


if __name__ == "__main__":
    main()
