"""Starting an HTTP server process on a free loopback port and talking JSON to it: shared by
the bench scripts (tokenomy and llama.cpp's llama-server are started the same way)."""
import json
import socket
import subprocess
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(argv_for_port, ready_path: str, timeout_s: float = 120):
    """Starts `argv_for_port(port)` and waits until GET `ready_path` answers 200.
    Returns (process, base URL); raises if the process exits or never gets ready."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(argv_for_port(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        try:
            if urllib.request.urlopen(base + ready_path, timeout=1).status == 200:
                return proc, base
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise TimeoutError(f"{base}{ready_path} not ready after {timeout_s} s")


def stop(proc):
    proc.terminate()
    proc.wait(30)


def post(base: str, path: str, body, timeout_s: float = 600):
    """POSTs JSON; returns the open response (read it, or json.load it)."""
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    return urllib.request.urlopen(req, timeout=timeout_s)


def post_json(base: str, path: str, body):
    return json.load(post(base, path, body))


def build_info(base: str) -> str:
    """The server's llama.cpp build, as `/props` names it."""
    return json.load(urllib.request.urlopen(base + "/props")).get("build_info", "unknown")


def write_json(path: str, obj) -> None:
    """Test data as the recorders write it: indented, UTF-8 as is, one final newline."""
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")
