"""The known circuits of the built-in models, in one place, as groups of sites (heads at named positions).

- planted models: read from `lib.builtin.planted.ground_truth` (the construction itself): every circuit head at
  the position it works at ("label_i" expands to every box label); the paper pair by Prakash et al.'s groups.
- toy entity models: the mechanism measured in docs/TOY_MODELS.md (binding at the box labels, label matching at
  the query label, the mover at the last token), plus control groups at positions where it does not run.

Methods are tested against these (a method is right when it finds them), and the measurement scripts in
workflows/ evaluate them.
"""
from __future__ import annotations

from lib.builtin import planted
from lib.types import Component, Site


def _expand(component: Component, position: str, n_boxes: int) -> list[Site]:
    """ "label_i" / "object_i" mean every box's label / object; other positions are themselves."""
    if position.endswith("_i"):
        return [Site(component, f"{position[:-2]}_{i}") for i in range(n_boxes)]
    return [Site(component, position)]


def planted_circuit(variant: str = "strong", n_boxes: int = 7) -> dict[str, list[Site]]:
    """{group: sites} of a planted model's circuit: by role for strong / weak / positional (e.g. "value fetcher":
    [L2H3@last]); by the paper's group for paper-base / paper-ft ("Value Fetcher": [L3H2@last, L3H0@last], ...,
    "Structure Reader": [L0H1@prev_query_label, L0H2@prev_query_label])."""
    groups: dict[str, list[Site]] = {}
    for entry in planted.ground_truth(variant)["circuit"]:
        sites = _expand(Component.parse(entry["component"]), entry["position"], n_boxes)
        groups.setdefault(entry.get("group", entry["role"]), []).extend(sites)
    return groups


def planted_working_sites(variant: str = "strong") -> list[Site]:
    """Each planted head at the one position where mean-ablating it breaks the model (the binder at the queried
    label's earlier occurrence, which is the one box label the fetcher reads)."""
    sites = []
    for entry in planted.ground_truth(variant)["circuit"]:
        position = "prev_query_label" if entry["position"] == "label_i" else entry["position"]
        sites.append(Site(Component.parse(entry["component"]), position))
    return sites


def _heads(layer: int, *heads: int) -> list[Component]:
    return [Component(layer, h) for h in (heads or (0, 1))]


def _at(components: list[Component], positions: list[str]) -> list[Site]:
    return [Site(c, p) for c in components for p in positions]


def toy_circuit(n_boxes: int = 7) -> dict[str, list[Site]]:
    """{group: sites} of the toy entity models' documented mechanism (docs/TOY_MODELS.md)."""
    labels = [f"label_{i}" for i in range(n_boxes)]
    return {
        "binding (label_i)": _at(_heads(0), labels),
        "label matching (query_label)": _at(_heads(1), ["query_label"]),
        "mover (last)": _at(_heads(2), ["last"]),
    }


def toy_cmap_groups(n_boxes: int = 7) -> dict[str, list[Site]]:
    """Head groups of the toy mechanism for cross-model patching, each at the positions it works at, plus
    controls at positions where the mechanism does not run (docs/CMAP.md)."""
    labels = [f"label_{i}" for i in range(n_boxes)]
    circuit = [s for sites in toy_circuit(n_boxes).values() for s in sites]
    return {
        "binding L0H0+L0H1 @ box labels": _at(_heads(0), labels),
        "binding head L0H1 @ box labels": _at(_heads(0, 1), labels),
        "L0H1 @ prev_query_label (queried box only)": _at(_heads(0, 1), ["prev_query_label"]),
        "L0H0 @ box labels": _at(_heads(0, 0), labels),
        "label matching L1H0+L1H1 @ query_label": _at(_heads(1), ["query_label"]),
        "mover L2H0+L2H1 @ last": _at(_heads(2), ["last"]),
        "circuit (the three above, each at its position)": circuit,
        "control: L0H0+L0H1 @ last": _at(_heads(0), ["last"]),
        "control: L0H0+L0H1 @ query_label": _at(_heads(0), ["query_label"]),
        "control: MLP0 @ box labels": _at([Component(0)], labels),
    }


def documented_circuit(model: str, n_boxes: int = 7) -> dict[str, list[Site]]:
    """The known circuit of a built-in entity model by name ("planted:strong", "toy:entity-base", ...)."""
    kind, _, variant = model.partition(":")
    if kind == "planted":
        return planted_circuit(variant, n_boxes)
    if model in ("toy:entity-base", "toy:entity-ft"):
        return toy_circuit(n_boxes)
    raise ValueError(f"no documented circuit for {model!r}: the planted models and toy:entity-base / toy:entity-ft "
                     "have one")
