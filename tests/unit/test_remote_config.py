"""Where remote runs go and what travels with them, without a server: host resolution and the backend's pickle."""
import cloudpickle

from lib.core.remote import ProjectRemoteBackend, model_key, resolve_host


def test_host_resolution_order(monkeypatch):
    monkeypatch.setenv("NDIF_HOST", "http://127.0.0.1:9")
    assert resolve_host() == "http://127.0.0.1:9"
    assert resolve_host("http://127.0.0.1:8/") == "http://127.0.0.1:8"
    monkeypatch.delenv("NDIF_HOST")
    assert resolve_host().startswith("https://")  # nnsight's configured host, the public NDIF by default


def test_backend_shipped_with_a_trace_leaves_the_api_key_behind(tmp_path):
    """A trace's frame holds the handle, so its backend is pickled into the request: no key in it."""
    backend = ProjectRemoteBackend(model_key(str(tmp_path)), host="http://127.0.0.1:9", api_key="secret-key")
    shipped = cloudpickle.loads(cloudpickle.dumps(backend))
    assert backend.api_key == "secret-key" and shipped.api_key == ""
    assert shipped.model_key == backend.model_key and shipped.display is None
