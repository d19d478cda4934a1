"""Path patching (q/k/v receivers, batched senders) and attention knockout on a real local NDIF server equal the
local runs on the same deployed model (planted-strong). Skipped when the server is not running, like
tests/acceptance/test_remote.py (whose fixtures these are)."""
from __future__ import annotations

import pytest

from lib.builtin import planted
from lib.data_gen import encode_pairs, path_patching_noise
from lib.knockout import knockout_curve
from lib.models import load_model
from lib.path_patching import path_patch
from lib.types import Component, Site
from tests.acceptance.test_remote import server  # noqa: F401  (the running server's state, or a skip)

pytestmark = pytest.mark.remote


@pytest.fixture(scope="module")
def handles(server):  # noqa: F811
    local = load_model("planted:strong")
    remote = load_model("planted:strong", remote=True, backend=server["host"])
    remote.backend.display.enabled = False
    batch = encode_pairs(path_patching_noise("absent_query", 6, n_boxes=3, seed=1, tokenizer=local.tokenizer),
                         local.tokenizer)
    return local, remote, batch


def test_path_patching_into_a_query_remote_equals_local(handles):
    """One request per call: the clean and noise reads and every pass of stacked senders in one session."""
    local, remote, batch = handles
    fetcher = [Site(planted.FETCHER, "last")]
    senders = [Site(Component(layer, h), "last") for layer in (0, 1) for h in range(4)]
    scores_l = path_patch(local, batch, senders, fetcher, receiver_input="q", senders_per_pass=3)
    scores_r = path_patch(remote, batch, senders, fetcher, receiver_input="q", senders_per_pass=3)
    assert scores_r == pytest.approx(scores_l, abs=1e-5)
    assert scores_r[Site(planted.MOVER, "last")] < -0.5   # the mover's path was measured on the server


def test_knockout_curve_remote_equals_local(handles):
    local, remote, batch = handles
    curve_l = knockout_curve(local, [batch], "last", "prev_query_label")
    curve_r = knockout_curve(remote, [batch], "last", "prev_query_label")
    assert curve_r == pytest.approx(curve_l, abs=1e-6)
    assert curve_r[0] == 0.0 and curve_r[planted.N_LAYERS] == 1.0
