"""Component and site names, the architecture adapter's error, and the scores every method shares."""
import pytest
import torch

from lib import scores
from lib.core.architectures import Architecture, UnsupportedArchitecture
from lib.core.components import by_layer, format_components, parse_components
from lib.types import Component, PairBatch, Site


def test_component_names_round_trip():
    for name in ["L0H0", "L12H3", "MLP27", "L39H39"]:
        assert str(Component.parse(name)) == name
    assert parse_components("L1H2,MLP0") == [Component(1, 2), Component(0)]
    assert format_components(parse_components("MLP1,L1H3,L0H1")) == "L0H1,L1H3,MLP1"  # execution order
    groups = by_layer(parse_components("MLP1,L1H3,L0H1,L1H0"))
    assert [str(c) for c in groups[1]["head"]] == ["L1H0", "L1H3"] and [str(c) for c in groups[1]["mlp"]] == ["MLP1"]
    with pytest.raises(ValueError, match="L<layer>H<head>"):
        Component.parse("head 3")


def test_site_names_round_trip():
    assert Site.parse("L2H3@query_label") == Site(Component(2, 3), "query_label")
    assert Site.parse("MLP1") == Site(Component(1), "last")
    assert str(Site.parse(" L0H1@t12 ")) == "L0H1@t12"
    with pytest.raises(ValueError, match="L<layer>H<head>"):
        Site.parse("head@last")


def test_unsupported_architecture_names_class_and_what_is_missing():
    from transformers import BertConfig

    with pytest.raises(UnsupportedArchitecture, match=r"BertModel \(model_type='bert'\).*attention output projection"):
        Architecture.from_config(BertConfig(), "BertModel")


def _batch(targets, foils=None):
    side = None  # the scores read only the batch's answers
    return PairBatch(side, target_ids=torch.tensor(targets), foil_ids=None if foils is None else torch.tensor(foils))


def test_scores():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0]])
    assert scores.target_hit(logits, _batch([1, 2])).mean() == 0.5
    assert scores.logit_diff(logits, _batch([1, 0], [2, 2])).mean() == pytest.approx(1.5)
    assert scores.target_prob(logits, _batch([1, 0])).shape == (2,)
    assert scores.target_prob(logits, _batch([1, 0])).tolist() == pytest.approx(
        [float(logits[0].softmax(-1)[1]), float(logits[1].softmax(-1)[0])])
    assert scores.target_logit(logits, _batch([1, 0])).tolist() == [2.0, 3.0]


def test_scores_say_what_the_batch_lacks():
    logits = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="accuracy scores against target tokens, but this batch has none"):
        scores.target_hit(logits, PairBatch(None))
    with pytest.raises(ValueError, match="logit_diff needs foil tokens"):
        scores.logit_diff(logits, _batch([1, 0]))
