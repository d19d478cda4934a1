"""Running the project's traces on NDIF: host, API key, model key, and a backend with clear errors and retries.

`load_model(source, remote=True)` (lib/models.py) comes here: the weights stay on the server, the client keeps a
meta-device copy for tracing, and every `handle.trace()` / `handle.session()` ships its block to NDIF.

- host: `backend="http://..."` or `host=`, else `NDIF_HOST`, else nnsight's config (the public NDIF).
- API key: `api_key=`, else `NDIF_API_KEY`, else nnsight's config (`CONFIG.set_default_api_key`).
- model key: what the server knows the model by. For a hub id it is nnsight's own key; for a local directory
  (a self-hosted NDIF, `make ndif-up`) it names the directory, as ndif/make_models.py deploys it.

Failures become `NDIFError`s (subclasses of nnsight's `RemoteError`) whose message says what to do;
connection failures before a job is accepted are retried with exponential backoff, a bounded number of times.

    python -m lib.remote check MODEL_DIR --host http://127.0.0.1:8001   # one remote trace == local, or exit 1
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from nnsight.intervention.backends.remote import RemoteBackend, RemoteError

log = logging.getLogger(__name__)

PUBLIC_HOST = "https://api.ndif.us"
TRANSIENT_HTTP = {429, 502, 503, 504}


class NDIFError(RemoteError):
    """A remote run failed for a reason outside the traced code; the message says what to do."""


class NDIFUnreachable(NDIFError):
    """No NDIF server answered at the host (after the retries)."""


class NDIFModelNotHosted(NDIFError):
    """The server answered but does not host the requested model."""


class NDIFRequestRejected(NDIFError):
    """The server refused the request (API key, client version, malformed request)."""


def resolve_host(host: str | None = None) -> str:
    from nnsight import CONFIG

    return (host or os.environ.get("NDIF_HOST") or CONFIG.API.HOST or PUBLIC_HOST).rstrip("/")


def resolve_api_key(api_key: str | None = None) -> str | None:
    from nnsight import CONFIG

    return api_key or os.environ.get("NDIF_API_KEY") or CONFIG.API.APIKEY or None


def model_key(repo_id: str, revision: str | None = None, task: str = "text-generation") -> str:
    """The remote key of a `TransformersModel` (nnsight's format, built without asking the hub)."""
    data = {"repo_id": repo_id, "revision": revision, "task": task}
    return f"nnsight.modeling.transformers.TransformersModel:{json.dumps(data)}"


def parse_model_key(key: str) -> dict:
    """`nnsight...TransformersModel:{json}` -> the json dict (repo_id, revision, task)."""
    _, _, data = key.partition(":")
    return json.loads(data)


def is_model_key(source: str) -> bool:
    return source.startswith("nnsight.") and ":{" in source


def key_for(lm: Any) -> str:
    """The key the server knows `lm` by: its directory for a local model, nnsight's hub-canonical key otherwise."""
    repo_id = getattr(lm, "repo_id", None) or lm._module.config.name_or_path
    if Path(repo_id).is_dir():
        return model_key(str(Path(repo_id).resolve()), task=getattr(lm, "task", None) or "text-generation")
    try:
        return lm.to_model_key()  # canonicalises the id through the hub, as nnsight's remote=True does
    except Exception as err:  # offline or hub error: the id as spelled
        log.debug("hub lookup for %s failed (%s); using the id as given", repo_id, err)
        return model_key(repo_id, getattr(lm, "revision", None))


class ProjectRemoteBackend(RemoteBackend):
    """nnsight's blocking `RemoteBackend` with bounded retries and errors that say what to do.

    Only failures before the server accepted the job are retried (nothing ran yet, so a retry is safe);
    a connection lost while a job runs, a rejected request or an unknown model raise at once.
    """

    def __init__(self, model_key: str, host: str | None = None, api_key: str | None = None, *,
                 retries: int = 3, backoff_s: float = 1.0, **kwargs: Any) -> None:
        super().__init__(model_key, host=resolve_host(host), api_key=resolve_api_key(api_key), **kwargs)
        self.retries = retries
        self.backoff_s = backoff_s

    def __getstate__(self) -> dict:
        # A handle (and so its backend) sits in the frame of every trace and is shipped with it: the API key
        # stays here (it travels only as the request header), and so does the status display (a terminal).
        # No __setstate__: it would run on the server, rebuilt from source, where its imports fail.
        state = dict(self.__dict__)
        state["display"] = None
        state["api_key"] = ""
        return state

    def send(self, request, blob):
        response = self._post(request, blob)
        self._accepted = True
        return self.handle(response)

    def request(self, request, tracer):
        last: BaseException | None = None
        for attempt in range(self.retries + 1):
            self._accepted = False
            try:
                return super().request(request, tracer)
            except NDIFError:
                raise
            except RemoteError as err:
                error = self._classify(err)
                if not isinstance(error, NDIFUnreachable) or self._accepted:
                    raise error from err
                last = err
            except Exception as err:
                # websocket-client raises OSErrors (refused, reset, DNS, timeout) and its own exceptions
                # (handshake refused, connection closed); anything else is not a connection problem.
                if not (isinstance(err, OSError) or type(err).__module__.startswith("websocket")):
                    raise
                if self._accepted:
                    raise NDIFUnreachable(
                        f"lost the connection to NDIF at {self.host} while the job ran ({err!r}); "
                        "the server may have restarted: run it again") from err
                last = err
            if attempt < self.retries:
                delay = self.backoff_s * 2**attempt
                log.warning("NDIF at %s not reachable (%s); retry %d/%d in %.0f s",
                            self.host, last, attempt + 1, self.retries, delay)
                time.sleep(delay)
        raise NDIFUnreachable(
            f"could not reach NDIF at {self.host} after {self.retries + 1} tries ({last}). "
            f"{_unreachable_hint(self.host)}") from last

    def _classify(self, err: RemoteError) -> RemoteError:
        """Turn nnsight's RemoteError into the project's error for its cause (or leave it as it is)."""
        text = str(err)
        cause = err.__cause__
        status = getattr(getattr(cause, "response", None), "status_code", None)
        if status is None and cause is not None and not self._accepted:  # httpx transport error on POST
            return NDIFUnreachable(text)
        if status in TRANSIENT_HTTP:
            return NDIFUnreachable(text)
        if status is not None:
            hint = ("set NDIF_API_KEY (get a key at https://login.ndif.us) or pass api_key="
                    if status in (401, 403) else "check the client versions (nnsight, python) the server accepts")
            return NDIFRequestRejected(f"NDIF at {self.host} rejected the request (HTTP {status}): "
                                       f"{text.removeprefix('Failed to send request: ')}; {hint}")
        if _not_hosted(text):
            return NDIFModelNotHosted(
                f"NDIF at {self.host} does not host model {self.model_key}: {_first_line(text)}. "
                f"{_not_hosted_hint(self.host)}")
        return err  # the traced code failed on the server: nnsight's RemoteError with the server's traceback


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


def _is_local(host: str) -> bool:
    return any(h in host for h in ("127.0.0.1", "localhost", "[::1]"))


def _unreachable_hint(host: str) -> str:
    if _is_local(host):
        return "Start the local server with `make ndif-up` (and check `make ndif-status`)."
    return "Check NDIF_HOST and your network, or see https://status.ndif.us for outages; then run again."


def _not_hosted_hint(host: str) -> str:
    if _is_local(host):
        return "Deploy it: `make ndif-up` deploys .ndif/models and lib/toy_models (see docs/REMOTE.md)."
    return "See the hosted models at https://nnsight.net/status and pass one of them (docs/REMOTE.md)."


# How servers word "no such model": ndif 0.1.2 tries to deploy an unknown key on demand and answers
# "Could not deploy this model. <reason>" or "Error provisioning model."; other phrasings for other servers.
NOT_HOSTED_MARKERS = ("could not deploy", "error provisioning model", "not deployed", "no deployment",
                      "unknown model", "not hosted", "model not found", "is not a local folder", "not a valid model")


def _not_hosted(text: str) -> bool:
    low = text.lower()
    return any(marker in low for marker in NOT_HOSTED_MARKERS)


def make_backend(key: str, backend: Any = None, *, lm: Any = None, **kwargs: Any) -> RemoteBackend:
    """The backend for `key`: `backend` as given if it is one, else ours at host `backend` (a URL) or the default."""
    if isinstance(backend, RemoteBackend):
        return backend
    env = lm._remoteable_get_env() if lm is not None else None
    return ProjectRemoteBackend(key, host=backend, env=env, **kwargs)


def load_remote(source: str, *, tokenizer: Any = None, backend: Any = None, **load_kwargs: Any):
    """`load_model(..., remote=True)`: a meta-device model for tracing, bound to the server's copy."""
    from nnsight.modeling.transformers import TransformersModel

    from lib import models

    source = name = str(source)
    key = None
    if is_model_key(source):
        key, source = source, parse_model_key(source)["repo_id"]
    elif source.startswith(models.BUILTIN_PREFIXES):
        source = str(_builtin_dir(source))
    path = Path(source).expanduser()
    if path.exists():
        source = str(path.resolve())
        if not (path / "config.json").exists():
            raise models.ModelLoadError(f"{path} has no config.json: give a directory written by save_pretrained")
    load_kwargs.pop("device_map", None)  # the server places the weights
    try:
        tok = models._load_tokenizer(source, tokenizer)
        lm = TransformersModel(source, task="text-generation", tokenizer=tok, dispatch=False, **load_kwargs)
    except OSError as err:
        raise models.ModelLoadError(
            f"could not read the config of {source!r} to trace it remotely: it is neither a local directory "
            "nor reachable on the Hugging Face hub. Pass a local save_pretrained directory or a hub id.") from err
    key = key or key_for(lm)
    handle = models._wrap(lm, name, remote=True, backend=make_backend(key, backend, lm=lm))
    log.info("remote model %s via %s", key, handle.backend.host)
    return handle


def _builtin_dir(name: str) -> Path:
    """A built-in model's saved directory, as `make ndif-up` deploys it: lib/toy_models/<name> for toy:<name>,
    .ndif/models/planted-<variant> (written by ndif/make_models.py) for planted:<variant>."""
    kind, _, variant = name.partition(":")
    root = Path(__file__).resolve().parent.parent
    path = root / "lib" / "toy_models" / variant if kind == "toy" else root / ".ndif" / "models" / f"planted-{variant}"
    if not (path / "config.json").exists():
        raise ValueError(f"{name} has no saved copy at {path} to serve remotely: `make ndif-up` writes and deploys "
                         "the built-in models it knows (ndif/make_models.py); on the public NDIF use a hub id")
    return path


def check(path: str, host: str, timeout: float) -> float:
    """Until `timeout`: one remote trace of `path`; its logits must equal a local run. Returns the seconds it took."""
    from lib.models import load_model

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
    parser = argparse.ArgumentParser(description="Check that an NDIF server runs a model like a local run.")
    sub = parser.add_subparsers(dest="command", required=True)
    chk = sub.add_parser("check", help="one remote trace on MODEL_DIR equals the local trace")
    chk.add_argument("model_dir")
    chk.add_argument("--host", default=None, help="NDIF URL (default: NDIF_HOST or nnsight's config)")
    chk.add_argument("--timeout", type=float, default=120, help="seconds to keep trying while the model deploys")
    args = parser.parse_args(argv)
    seconds = check(args.model_dir, resolve_host(args.host), args.timeout)
    log.info("%s answers at %s: remote logits == local (%.2f s)", Path(args.model_dir).name,
             resolve_host(args.host), seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
