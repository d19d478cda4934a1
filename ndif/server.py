"""Start, check and stop a self-hosted NDIF (PyPI ndif==0.1.2) on loopback, for `--remote` runs and tests.

    python ndif/server.py install   # server venv (.ndif/venv, Python 3.12) + redis-server
    python ndif/server.py up        # install, build the models, start the stack, deploy, wait until ready
    python ndif/server.py status    # is it up; memory of the stack
    python ndif/server.py down      # stop everything this script started, by process group

Standard library only: it runs under any Python 3.9+. The stack: redis-server (queue), moto_server (S3 store
for results), a Ray head with the NDIF controller (a GPU declared with RAY_OVERRIDE_RESOURCES, models on the
CPU through ndif/ndif_cpu_actor.py), and the API (gunicorn). Every service binds 127.0.0.1 where it can be
told to; each is started in its own process group, recorded in .ndif/run/state.json, and `down` signals
exactly those groups (never `ray stop`, which kills by process name).
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

log = logging.getLogger("ndif.server")

ROOT = Path(__file__).resolve().parent.parent
HOME = ROOT / ".ndif"
VENV = HOME / "venv"
RUN = HOME / "run"
LOGS = HOME / "logs"
STATE = RUN / "state.json"
REQUIREMENTS = ROOT / "ndif" / "requirements.txt"
PROJECT_PY = ROOT / ".venv" / "bin" / "python"
HOST = "127.0.0.1"

# Ports: the API's can be moved with NDIF_API_PORT; the rest avoid the defaults of a system Redis (6379),
# MinIO/RustFS (9000) and a user's own Ray (6379/10001/8265).
PORTS = {
    "api": int(os.environ.get("NDIF_API_PORT", "8001")),
    "redis": 6389,
    "s3": 9010,
    "ray_gcs": 6385,
    "ray_client": 10011,
    "ray_object_manager": 8076,
    "ray_metrics": 8090,
    "ray_dashboard": 8275,
    "ray_agent_grpc": 52366,
    "ray_node_manager": 8077,
    "ray_runtime_env_agent": 8078,
    "ray_dashboard_agent_listen": 52365,
    "ray_workers": 20100,  # first of 1000 ports for Ray's worker processes
}
# The declared GPU that lets ndif's controller place models; the models themselves run on the CPU.
# Each model actor and the controller take one logical CPU: room for a dozen models on the two real cores.
RAY_RESOURCES = {"GPU": 1, "CPU": 12, "cuda_memory_bytes": 8 * 1024**3}
SERVICE_TIMEOUT_S = 120
DEPLOY_TIMEOUT_S = 300
READY_TIMEOUT_S = 240
STOP_GRACE_S = 10


def python312() -> str:
    """A Python >= 3.12 for the server venv (ndif needs it; the project itself stays on 3.11)."""
    candidates = [os.environ.get("NDIF_PYTHON", ""), shutil.which("python3.12") or "",
                  *sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python3.12")), reverse=True),
                  "/usr/bin/python3.12", "/usr/local/bin/python3.12"]
    for exe in filter(None, candidates):
        try:
            out = subprocess.run([exe, "-c", "import sys; print(sys.version_info >= (3, 12))"],
                                 capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and out.stdout.strip() == "True":
            return exe
    raise SystemExit("ndif needs Python 3.12: install it (pyenv install 3.12, or apt-get install python3.12) "
                     "or point NDIF_PYTHON at one")


def install() -> None:
    """The server venv from ndif/requirements.txt (exact pins, ~5.5 GB with the CUDA torch wheel) and Redis."""
    stamp = VENV / ".installed"
    digest = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    if not (stamp.exists() and stamp.read_text() == digest):
        if not (VENV / "bin" / "python").exists():
            subprocess.run([python312(), "-m", "venv", str(VENV)], check=True)
        pip = [str(VENV / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        log.info("installing the NDIF server into %s (a few minutes: torch + its CUDA libraries)", VENV)
        t0 = time.time()
        subprocess.run([*pip, "-r", str(REQUIREMENTS)], check=True)
        stamp.write_text(digest)
        log.info("server venv installed in %.0f s", time.time() - t0)
    if shutil.which("redis-server") is None:
        if os.geteuid() != 0:
            raise SystemExit("redis-server is missing: sudo apt-get install redis-server")
        log.info("installing redis-server (Debian package)")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "-qq", "redis-server"], check=True, env=env,
                       stdout=subprocess.DEVNULL)


def ray_temp_dir() -> Path:
    # Ray's socket paths must stay short (< 108 bytes), so its temp dir lives in /tmp, one per checkout.
    return Path("/tmp") / f"ndif-ray-{hashlib.sha1(str(ROOT).encode()).hexdigest()[:8]}"


def service_env() -> dict:
    bin_dir = str(VENV / "bin")
    # Inherited NDIF_* settings (a Postgres for auth, Loki/Influx telemetry, another API's URL) would reach
    # beyond this stack: only ours are set.
    dropped = ("VIRTUAL_ENV", "PYTHONHOME", "RAY_ADDRESS", "NDIF_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
    env.update({
        "PATH": f"{bin_dir}:{env.get('PATH', '/usr/bin:/bin')}",
        "PYTHONPATH": str(ROOT / "ndif"),  # lets Ray's workers import ndif_cpu_actor
        "NDIF_HOME": str(HOME / "home"),
        "NDIF_REDIS_URL": f"redis://{HOST}:{PORTS['redis']}",
        "NDIF_OBJECT_STORE_URL": f"http://{HOST}:{PORTS['s3']}",
        "NDIF_RAY_ADDRESS": f"ray://{HOST}:{PORTS['ray_client']}",
        "NDIF_RAY_HEAD_PORT": str(PORTS["ray_gcs"]),
        "NDIF_API_PORT": str(PORTS["api"]),
        "NDIF_API_URL": f"http://{HOST}:{PORTS['api']}",
        "NDIF_RAY_TEMP_DIR": str(ray_temp_dir()),
        "NDIF_MODEL_IMPORT_PATH": "ndif_cpu_actor.CPUModelActor",
        "NDIF_DEFAULT_DTYPE": "float32",
        "GUNICORN_CMD_ARGS": f"--bind {HOST}:{PORTS['api']}",
        "RAY_OVERRIDE_RESOURCES": json.dumps(RAY_RESOURCES),
        "RAY_USAGE_STATS_ENABLED": "0",
        # Ray's single-machine mode: the node address is 127.0.0.1 rather than the machine's own IP.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "GRPC_ENABLE_FORK_SUPPORT": "0",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    })
    return env


def port_open(port: int, host: str = HOST) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def wait_for(what: str, check, timeout: float, proc: subprocess.Popen | None = None, logfile: Path | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        if proc is not None and proc.poll() is not None and proc.returncode != 0:
            raise SystemExit(f"{what} exited with {proc.returncode}; see {logfile}")
        time.sleep(0.5)
    raise SystemExit(f"{what} not ready after {timeout:.0f} s; see {logfile or LOGS}")


def read_state() -> dict:
    return json.loads(STATE.read_text()) if STATE.exists() else {}


def write_state(state: dict) -> None:
    RUN.mkdir(parents=True, exist_ok=True)
    STATE.write_text(json.dumps(state, indent=1))


def spawn(name: str, cmd: list[str], env: dict, state: dict) -> subprocess.Popen:
    """Start `cmd` in a new session (its own process group), log to .ndif/logs/NAME.log, record the group."""
    LOGS.mkdir(parents=True, exist_ok=True)
    logfile = LOGS / f"{name}.log"
    with open(logfile, "ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=HOME, start_new_session=True)
    state.setdefault("groups", {})[name] = proc.pid
    write_state(state)
    log.info("%s started (pid/pgid %d), log %s", name, proc.pid, logfile)
    return proc


def api_up(port: int | None = None) -> bool:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port or PORTS['api']}/ping", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def build_models() -> dict:
    """Save the project's models to .ndif/models and write the deploy file (runs in the project venv)."""
    if not PROJECT_PY.exists():
        raise SystemExit("the project venv is missing: run `make install` first")
    subprocess.run([str(PROJECT_PY), str(ROOT / "ndif" / "make_models.py"), "--out", str(HOME)], check=True,
                   cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    return json.loads((HOME / "models.json").read_text())


def up(args) -> None:
    t0 = time.time()
    install()
    t_installed = time.time()
    state = read_state()
    if state.get("groups") and api_up():
        log.info("NDIF is already up at %s (make ndif-down to stop it)", state.get("host"))
        return
    if state.get("groups"):
        down(None)
        state = {}
    for name, port in PORTS.items():
        if name != "ray_workers" and port_open(port):
            raise SystemExit(f"port {port} ({name}) is in use on {HOST}: stop what holds it, or set NDIF_API_PORT")
    models = build_models()
    env = service_env()
    state = {"host": f"http://{HOST}:{PORTS['api']}", "root": str(ROOT), "models": models, "groups": {}}
    write_state(state)
    (HOME / "home").mkdir(parents=True, exist_ok=True)
    try:
        start_stack(env, state)
        deploy(env)
        wait_ready(models)
    except BaseException:
        if args.keep:
            log.error("NDIF did not come up; left running for inspection (--keep): logs in %s and %s",
                      LOGS, ray_temp_dir() / "session_latest" / "logs")
            raise
        log.error("NDIF did not come up; stopping what was started (logs in %s)", LOGS)
        down(None)
        raise
    state["started_s"] = round(time.time() - t_installed, 1)
    write_state(state)
    log.info("NDIF up at %s in %.0f s (+%.0f s install check); models: %s", state["host"],
             time.time() - t_installed, t_installed - t0, ", ".join(models))


def start_stack(env: dict, state: dict) -> None:
    venv_bin = VENV / "bin"
    redis = spawn("redis", ["redis-server", "--bind", HOST, "--port", str(PORTS["redis"]), "--save", "",
                            "--appendonly", "no", "--protected-mode", "yes"], env, state)
    s3 = spawn("s3", [str(venv_bin / "moto_server"), "-H", HOST, "-p", str(PORTS["s3"])], env, state)
    wait_for("redis", lambda: port_open(PORTS["redis"]), SERVICE_TIMEOUT_S, redis, LOGS / "redis.log")
    wait_for("moto_server (S3)", lambda: port_open(PORTS["s3"]), SERVICE_TIMEOUT_S, s3, LOGS / "s3.log")

    temp = ray_temp_dir()
    temp.mkdir(parents=True, exist_ok=True)
    head_resources = {"head": 10, "cpu_memory_bytes": 4 * 1024**3}
    ray_cmd = [
        str(venv_bin / "ray"), "start", "--head", "--block", f"--node-ip-address={HOST}",
        f"--port={PORTS['ray_gcs']}", f"--ray-client-server-port={PORTS['ray_client']}",
        f"--object-manager-port={PORTS['ray_object_manager']}", f"--node-manager-port={PORTS['ray_node_manager']}",
        f"--metrics-export-port={PORTS['ray_metrics']}", f"--dashboard-agent-grpc-port={PORTS['ray_agent_grpc']}",
        f"--dashboard-agent-listen-port={PORTS['ray_dashboard_agent_listen']}",
        f"--runtime-env-agent-port={PORTS['ray_runtime_env_agent']}",
        f"--min-worker-port={PORTS['ray_workers']}", f"--max-worker-port={PORTS['ray_workers'] + 999}",
        "--include-dashboard=true", f"--dashboard-host={HOST}", f"--dashboard-port={PORTS['ray_dashboard']}", f"--resources={json.dumps(head_resources)}",
        f"--object-store-memory={512 * 1024**2}", f"--temp-dir={temp}", "--disable-usage-stats",
    ]
    ray = spawn("ray", ray_cmd, env, state)
    wait_for("Ray head", lambda: port_open(PORTS["ray_client"]), SERVICE_TIMEOUT_S, ray, LOGS / "ray.log")
    controller_env = {**env, "RAY_ADDRESS": f"{HOST}:{PORTS['ray_gcs']}"}
    with open(LOGS / "controller.log", "ab") as out:
        subprocess.run([str(venv_bin / "python"), "-m", "ndif.services.ray.deployments.controller.controller"],
                       env=controller_env, stdout=out, stderr=subprocess.STDOUT, check=True, cwd=HOME,
                       timeout=SERVICE_TIMEOUT_S)
    api = spawn("api", [str(venv_bin / "gunicorn"), "--config", "python:ndif.services.api.gunicorn_conf",
                        "--bind", f"{HOST}:{PORTS['api']}", "ndif.services.api.app:app"], env, state)
    wait_for("NDIF API", api_up, SERVICE_TIMEOUT_S, api, LOGS / "api.log")


def deploy(env: dict) -> None:
    cmd = [str(VENV / "bin" / "ndif"), "deploy", "-f", str(HOME / "deploy.yaml"),
           "--ray-address", env["NDIF_RAY_ADDRESS"], "--redis-url", env["NDIF_REDIS_URL"]]
    with open(LOGS / "deploy.log", "ab") as out:
        proc = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=HOME, timeout=DEPLOY_TIMEOUT_S)
    if proc.returncode != 0:
        raise SystemExit(f"ndif deploy failed ({proc.returncode}); see {LOGS / 'deploy.log'}")


def wait_ready(models: dict) -> None:
    """A real remote trace on each deployed model, compared with the local run (ndif/check.py)."""
    for name, spec in models.items():
        cmd = [str(PROJECT_PY), str(ROOT / "ndif" / "check.py"), spec["path"], "--host", f"http://{HOST}:{PORTS['api']}",
               "--timeout", str(READY_TIMEOUT_S)]
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if proc.returncode != 0:
            raise SystemExit(f"model {name} did not answer a remote trace; logs in {LOGS}")


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a group this script started: its process group or its session.

    Each service is started with setsid, so its session id is the recorded pid; Ray moves its workers into
    process groups of their own, but they stay in that session.
    """
    members = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state ppid pgrp session ...
        if pgid in (int(fields[2]), int(fields[3])) and fields[0] != "Z":
            members.append(int(proc.name))
    return members


def _alive(pgid: int) -> bool:
    return bool(group_members(pgid))


def _signal(pgid: int, sig: int) -> None:
    for pid in [pgid, *group_members(pgid)]:
        try:
            os.killpg(pid, sig) if pid == pgid else os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def down(_args) -> None:
    """SIGTERM what each recorded session holds (API first, Redis last); SIGKILL what is left after a grace."""
    state = read_state()
    groups = state.get("groups", {})
    for name in ["api", "ray", "s3", "redis"]:
        pgid = groups.get(name)
        if pgid and _alive(pgid):
            log.info("stopping %s (session %d: %d processes)", name, pgid, len(group_members(pgid)))
            _signal(pgid, signal.SIGTERM)
    deadline = time.time() + STOP_GRACE_S
    while time.time() < deadline and any(_alive(p) for p in groups.values()):
        time.sleep(0.5)
    for name, pgid in groups.items():
        if _alive(pgid):
            log.info("%s still running after %d s (Ray drains for 30 s, gunicorn waits for its workers): "
                     "killing it", name, STOP_GRACE_S)
            _signal(pgid, signal.SIGKILL)
    if STATE.exists():
        STATE.unlink()
    shutil.rmtree(ray_temp_dir(), ignore_errors=True)
    log.info("NDIF stopped")


def stack_memory_bytes(groups: dict) -> int:
    """Resident memory (PSS where the kernel gives it) of every process in the recorded groups."""
    total = 0
    for pid in [pid for pgid in groups.values() for pid in group_members(pgid)]:
        proc = Path("/proc") / str(pid)
        try:
            rollup = proc / "smaps_rollup"
            text = rollup.read_text() if rollup.exists() else (proc / "status").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith(("Pss:", "VmRSS:")):
                total += int(line.split()[1]) * 1024
                break
    return total


def status(_args) -> int:
    state = read_state()
    if not state.get("groups"):
        print("NDIF is not running (make ndif-up)")
        return 1
    ok = api_up()
    print(f"NDIF at {state['host']}: {'up' if ok else 'NOT answering'}; "
          f"stack memory {stack_memory_bytes(state['groups']) / 1024**3:.2f} GiB")
    for name, spec in state.get("models", {}).items():
        print(f"  {name}: {spec['path']}")
    return 0 if ok else 1


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s ndif %(message)s", datefmt="%H:%M:%S")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["install", "up", "down", "status"])
    parser.add_argument("--keep", action="store_true", help="up: leave a stack that failed to come up running")
    args = parser.parse_args()
    if args.command == "install":
        install()
    elif args.command == "up":
        up(args)
    elif args.command == "down":
        down(args)
    else:
        return status(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
