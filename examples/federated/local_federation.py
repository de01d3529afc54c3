"""Run a federation on this machine: a Flower SuperLink, one SuperNode per data partition,
and `flwr run` of the edgetune app, then print the result as JSON.

    python examples/federated/local_federation.py BUNDLE OUT DATA1 DATA2 [...] [--rounds 3]
        [--local-steps 10] [--lr 1e-3] [--batch-size 4]

Each DATA is one device's data (a folder with train.jsonl, or a .jsonl file). On real
devices, run the SuperNodes there instead (flower-supernode --superlink HOST:PORT
--node-config "bundle='...' data='...'"): nothing else changes.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

APP = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, seconds: float = 60) -> None:
    end = time.time() + seconds
    while time.time() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {seconds:.0f}s")


def run(bundle: Path, out: Path, datas: list[Path], rounds: int, local_steps: int, lr: float, batch_size: int,
        logs: Path, timeout: float = 1800) -> dict:
    bindir = Path(sys.executable).parent
    home = logs / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    link_port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n')
    # The SuperLink and SuperNodes start Flower helper programs found on PATH.
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
    procs = []
    try:
        procs.append(subprocess.Popen(
            [str(bindir / "flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
             "--port", str(link_port), "--database", str(logs / "superlink.db")],
            stdout=open(logs / "superlink.log", "w"), stderr=subprocess.STDOUT, env=env, cwd=logs))
        wait_for_port(link_port)
        for i, data in enumerate(datas):
            node_config = f"bundle='{bundle}' data='{data}' work='{logs / f'node-{i}'}'"
            procs.append(subprocess.Popen(
                [str(bindir / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                 "--port", str(free_port()), "--node-config", node_config],
                stdout=open(logs / f"supernode-{i}.log", "w"), stderr=subprocess.STDOUT, env=env, cwd=logs))
        run_config = (f"bundle='{bundle}' out='{out}' rounds={rounds} local-steps={local_steps} lr={lr} "
                      f"batch-size={batch_size} min-nodes={len(datas)}")
        p = subprocess.run([str(bindir / "flwr"), "run", str(APP), "local", "--stream", "--run-config", run_config],
                           capture_output=True, text=True, env=env, timeout=timeout, cwd=logs)
        (logs / "flwr-run.log").write_text(p.stdout + p.stderr)
        if p.returncode != 0 or not (out / "run.json").is_file():
            raise RuntimeError(f"the federated run failed (exit {p.returncode}); logs in {logs}:\n{p.stdout[-3000:]}{p.stderr[-2000:]}")
        return json.loads((out / "run.json").read_text())
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("data", type=Path, nargs="+", help="one per device")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-steps", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--logs", type=Path, default=None, help="where the processes log [a temporary folder]")
    a = ap.parse_args()
    logs = a.logs or Path(tempfile.mkdtemp(prefix="edgetune-fl-"))
    result = run(a.bundle.resolve(), a.out.resolve(), [d.resolve() for d in a.data], a.rounds, a.local_steps, a.lr,
                 a.batch_size, logs.resolve())
    print(json.dumps(result["federated"], indent=1))


if __name__ == "__main__":
    main()
