"""Running the project's traces on NDIF: host, API key, model key, and a backend with clear errors and retries.

`load_model(source, remote=True)` binds a meta-device copy of the model to a backend made here: every
`handle.trace()` / `handle.session()` then ships its block to NDIF.

- host: `backend="http://..."` or `host=`, else `NDIF_HOST`, else nnsight's config (the public NDIF).
- API key: `api_key=`, else `NDIF_API_KEY`, else nnsight's config (`CONFIG.set_default_api_key`).
- model key: what the server knows the model by. For a hub id it is nnsight's own key; for a local directory
  (a self-hosted NDIF, `make ndif-up`) it names the directory, as ndif/make_models.py deploys it.

Failures become `NDIFError`s (subclasses of nnsight's `RemoteError`) whose message says what to do;
connection failures before a job is accepted are retried with exponential backoff, a bounded number of times.

What a remote run costs in traffic is counted on the backend: `handle.backend.traffic` is
{"requests", "bytes_sent", "bytes_received"} since the backend was made (or `reset_traffic()`), e.g. to check
that a DCM run is one request whatever its number of steps (bench/remote.py).
"""
from __future__ import annotations

import json
import logging
import os
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
    """The NDIF host: `host`, else NDIF_HOST, else nnsight's config, else the public NDIF."""
    from nnsight import CONFIG

    return (host or os.environ.get("NDIF_HOST") or CONFIG.API.HOST or PUBLIC_HOST).rstrip("/")


def resolve_api_key(api_key: str | None = None) -> str | None:
    """The API key: `api_key`, else NDIF_API_KEY, else nnsight's config (None: a server without auth)."""
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
    """Whether `source` is already an nnsight model key rather than an id or a path."""
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


TRAFFIC_KEYS = ("requests", "bytes_sent", "bytes_received")


class ProjectRemoteBackend(RemoteBackend):
    """nnsight's blocking `RemoteBackend` with bounded retries, errors that say what to do, and a traffic count.

    Only failures before the server accepted the job are retried (nothing ran yet, so a retry is safe);
    a connection lost while a job runs, a rejected request or an unknown model raise at once.

    `traffic` counts what this backend exchanged with the server: `requests` (jobs the server accepted; a
    POST that failed and was retried counts once, when it got through), `bytes_sent` (their serialized
    payloads, compressed when nnsight compresses; the small JSON routing envelope and headers are not counted)
    and `bytes_received` (the result blobs as they arrived, before decompression; status messages are not
    counted).
    """

    def __init__(self, model_key: str, host: str | None = None, api_key: str | None = None, *,
                 retries: int = 3, backoff_s: float = 1.0, **kwargs: Any) -> None:
        super().__init__(model_key, host=resolve_host(host), api_key=resolve_api_key(api_key), **kwargs)
        self.retries = retries
        self.backoff_s = backoff_s
        self.traffic = dict.fromkeys(TRAFFIC_KEYS, 0)

    def reset_traffic(self) -> dict:
        """Zero the traffic count; returns the count before.

        Returns:
            {"requests": int, "bytes_sent": int, "bytes_received": int}.
        """
        before, self.traffic = self.traffic, dict.fromkeys(TRAFFIC_KEYS, 0)
        return before

    def __getstate__(self) -> dict:
        # A handle (and so its backend) sits in the frame of every trace and is shipped with it: the API key
        # stays here (it travels only as the request header), and so does the status display (a terminal).
        # No __setstate__: it would run on the server, rebuilt from source, where its imports fail.
        state = dict(self.__dict__)
        state["display"] = None
        state["api_key"] = ""
        state.pop("traffic", None)  # the client's count; the server has no use for it
        return state

    def send(self, request, blob):
        """Post the request (counted in `traffic` once the server accepted it); after that nothing is retried."""
        response = self._post(request, blob)
        self._accepted = True
        self.traffic["requests"] += 1
        self.traffic["bytes_sent"] += len(blob)
        return self.handle(response)

    def finalize(self, content: bytes):
        """nnsight's decompress-and-load of a result blob, its size counted in `traffic` first."""
        self.traffic["bytes_received"] += len(content)
        return super().finalize(content)

    def request(self, request, tracer):
        """nnsight's request with bounded retries before the job is accepted, and errors that say what to do."""
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


def ship_project_code() -> None:
    """Send the project's own modules (lib) with every request as source, to be rebuilt on the server.

    An NDIF server does not have this project installed, and once it is installed here (`pip install -e .`)
    nnsight no longer registers it as a local module by itself: a request naming lib's classes or functions
    would fail on the server with ModuleNotFoundError.
    """
    import nnsight

    nnsight.register("lib")


def make_backend(key: str, backend: Any = None, *, lm: Any = None, **kwargs: Any) -> RemoteBackend:
    """The backend for `key`: `backend` as given if it is one, else ours at host `backend` (a URL) or the default."""
    ship_project_code()
    if isinstance(backend, RemoteBackend):
        return backend
    env = lm._remoteable_get_env() if lm is not None else None
    return ProjectRemoteBackend(key, host=backend, env=env, **kwargs)
