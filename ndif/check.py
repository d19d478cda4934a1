"""Check that an NDIF server runs a model like a local run: one remote trace whose logits equal the local ones.

    python ndif/check.py MODEL_DIR --host http://127.0.0.1:8001 [--timeout 120]    # exit 1 unless equal

`make ndif-up` runs it for every deployed model before it reports the server ready.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from lib.core.remote import ProjectRemoteBackend, RemoteError, model_key, resolve_host
from lib.models import load_model

log = logging.getLogger("ndif.check")


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


def check(path: str, host: str, timeout: float) -> float:
    """Until `timeout`: one remote trace of `path`; its logits must equal a local run. Returns the seconds it took."""
    local = load_model(path)
    enc = dict(local.tokenizer(["the apple is in box a"], return_tensors="pt"))
    with local.trace(enc):
        expected = local.arch.unembed(local.model).output.save()
    deadline = time.time() + timeout
    remote = load_model(path, remote=True, backend=ProjectRemoteBackend(
        model_key(str(Path(path).resolve())), host=host, retries=0))
    remote.backend.display.enabled = False
    while True:
        t0 = time.time()
        try:
            with remote.trace(enc):
                got = remote.arch.unembed(remote.model).output.save()
            # float32 on another torch build (the server's): equal up to ~1e-6 of the logits' scale
            diff, scale = (got - expected).abs().max(), expected.abs().max().clamp(min=1)
            if diff > 1e-5 * scale:
                raise SystemExit(f"remote logits differ from local ones by {diff:.3g} (scale {scale:.3g})")
            return time.time() - t0
        except RemoteError as err:
            if time.time() > deadline:
                raise SystemExit(f"{path} did not answer at {host} within {timeout:.0f} s: {err}")
            log.info("waiting for %s at %s (%s)", Path(path).name, host, _first_line(str(err))[:120])
            time.sleep(2)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--host", default=None, help="NDIF URL (default: NDIF_HOST or nnsight's config)")
    parser.add_argument("--timeout", type=float, default=120, help="seconds to keep trying while the model deploys")
    args = parser.parse_args(argv)
    seconds = check(args.model_dir, resolve_host(args.host), args.timeout)
    log.info("%s answers at %s: remote logits == local (%.2f s)", Path(args.model_dir).name,
             resolve_host(args.host), seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
