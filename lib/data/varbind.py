"""Variable-binding data (Davies et al.): value programs and the Value Dependence / Operation Invariance pairs.

A program assigns two-digit values and asks for an expression over two of the variables:
"x=12, y=40, z=73. y-x=" -> "2" (the first digit; the whole number is meta["full_answer"]), or in the authors'
code's format (VB_TEMPLATES["authors"]) "x = 12\ny = 40\nx + y = " -> "5". Accuracy is judged on the first digit,
so every pair is built such that the digits it should tell apart really differ, and the targets are balanced over
the first digits 1-9 so that no answer token dominates. Where a tokenizer merges digits ("52" one token), score
with lib.scores' first-digit rule.
"""
from __future__ import annotations

import random
from collections.abc import Sequence

from lib.data.templates import VarBindTemplate, load_vb_template
from lib.types import Prompt, Triple

OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def variable_binding_prompt(values: dict[str, int], left: str, op: str, right: str,
                            template: VarBindTemplate | None = None) -> Prompt:
    """ "x=12, y=40, z=7. x+y=" -> first digit of 52 ("5"), or in `template`'s wording; the full answer is in
    meta["full_answer"]."""
    t = template or _DEFAULT
    text, spans = "", {}
    for i, (name, value) in enumerate(values.items()):
        text += t.separator if i else ""
        text = _render(t.assignment, text, spans, {"name": (name, f"var_{name}"),
                                                   "value": (str(value), f"value_{name}")})
    text = _render(t.query, text, spans, {"left": (left, "left"), "op": (op, "op"), "right": (right, "right")})
    spans["last"] = (len(text) - 1, len(text))
    full = OPERATIONS[op](values[left], values[right])
    meta = {"values": dict(values), "left": left, "op": op, "right": right, "full_answer": str(full)}
    if t.name != "default":
        meta["template"] = t.name
    return Prompt(text=text, answer=t.answer_prefix + str(full)[0], spans=spans, meta=meta)


def _render(pattern: str, text: str, spans: dict, fill: dict[str, tuple[str, str]]) -> str:
    """Append `pattern` to `text` with each {key} replaced by its value, recording the value's span by name."""
    rest = pattern
    while rest:
        starts = [(rest.find("{" + k + "}"), k) for k in fill if "{" + k + "}" in rest]
        if not starts:
            return text + rest
        cut, key = min(starts)
        text += rest[:cut]
        value, span = fill[key]
        spans[span] = (len(text), len(text) + len(value))
        text += value
        rest = rest[cut + len(key) + 2:]
    return text


_DEFAULT = VarBindTemplate()
VB_NAMES = _DEFAULT.names
DIGITS = "123456789"
# desideratum -> (kind, operations): VD changes the left operand's value, OI swaps the two operations
VB_DESIDERATA = {
    "value_dependence": ("vd", ("+", "-")),
    "operation_invariance": ("oi", ("+", "-")),
    "value_dependence_mul": ("vd", ("*",)),          # transfer: never seen in training
    "operation_invariance_add_mul": ("oi", ("+", "*")),  # transfer
}


def value_program(values: dict[str, int], left: str, op: str, right: str,
                  template: VarBindTemplate | None = None) -> Prompt:
    """`variable_binding_prompt` plus spans with names common to every program: left_value, right_value
    (the operands' assigned values), left, op, right and last."""
    if op not in OPERATIONS:
        raise ValueError(f"unknown operation {op!r}; valid: {', '.join(OPERATIONS)}")
    missing = [name for name in (left, right) if name not in values]
    if missing:
        raise ValueError(f"operand(s) {missing} have no assigned value in {values}")
    if OPERATIONS[op](values[left], values[right]) < 0:
        raise ValueError(f"{left}{op}{right} is negative for {values}: the answers must be non-negative")
    prompt = variable_binding_prompt(values, left, op, right, template)
    prompt.spans["left_value"] = prompt.spans[f"value_{left}"]
    prompt.spans["right_value"] = prompt.spans[f"value_{right}"]
    return prompt


def _digit(prompt: Prompt) -> str:
    return prompt.meta["full_answer"][0]


def _first_digit(op: str, a: int, b: int) -> str | None:
    result = OPERATIONS[op](a, b)
    return None if result < 0 else str(result)[0]


def random_value_program(rng: random.Random, op: str, names: Sequence[str] = VB_NAMES,
                         non_negative_for: Sequence[str] = (), template: VarBindTemplate | None = None) -> Prompt:
    """Two-digit values for every name and two distinct operands; left >= right when `op` or an operation in
    `non_negative_for` (e.g. the one an alternate flips to) is subtraction."""
    if len(names) < 2 or len(set(names)) != len(names):
        raise ValueError(f"need at least two distinct variable names, got {names}")
    values = {name: rng.randint(10, 99) for name in names}
    left, right = rng.sample(list(names), 2)
    if (op == "-" or "-" in non_negative_for) and values[left] < values[right]:
        values[left], values[right] = values[right], values[left]
    return value_program(values, left, op, right, template)


def _vd_pair(rng: random.Random, op: str, names: Sequence[str], digit: str,
             template: VarBindTemplate | None) -> tuple[Prompt, Prompt]:
    """The alternate gives the left operand a new value so that the answer's first digit becomes `digit`."""
    for _ in range(10_000):
        original = random_value_program(rng, op, names, template=template)
        if _digit(original) == digit:
            continue
        values, left, right = original.meta["values"], original.meta["left"], original.meta["right"]
        choices = [a for a in range(10, 100) if a != values[left] and _first_digit(op, a, values[right]) == digit]
        if choices:
            alternate = value_program({**values, left: rng.choice(choices)}, left, op, right, template)
            return original, alternate
    raise RuntimeError(f"no value-dependence pair with answer digit {digit} for {op!r}")


def _oi_pair(rng: random.Random, ops: Sequence[str], names: Sequence[str], digit: str,
             template: VarBindTemplate | None) -> tuple[Prompt, Prompt]:
    """The alternate swaps the operation; the original's first digit is `digit` and the alternate's differs."""
    for _ in range(100_000):
        op = rng.choice(list(ops))
        flipped = ops[1] if op == ops[0] else ops[0]
        original = random_value_program(rng, op, names, non_negative_for=ops, template=template)
        if _digit(original) != digit:
            continue
        values, left, right = original.meta["values"], original.meta["left"], original.meta["right"]
        if _first_digit(flipped, values[left], values[right]) in (None, digit):
            continue
        return original, value_program(values, left, flipped, right, template)
    raise RuntimeError(f"no operation-invariance pair with answer digit {digit} for {ops}")


def vb_triples(desideratum: str, n: int, *, seed: int = 0, names: Sequence[str] | None = None,
               template: VarBindTemplate | str | None = None) -> list[Triple]:
    """`n` triples of a variable-binding desideratum (see VB_DESIDERATA), targets balanced over digits 1-9.

    value_dependence(_mul): target = the alternate's answer (its first digit differs from the original's).
    operation_invariance(_add_mul): target = the original's answer (the flipped operation's first digit differs).
    template: a VarBindTemplate, a built-in name (VB_TEMPLATES: "default", "authors") or a JSON file; names default
    to the template's. Original texts are unique within the returned list.
    """
    if desideratum not in VB_DESIDERATA:
        raise ValueError(f"unknown variable-binding desideratum {desideratum!r}; valid: {', '.join(VB_DESIDERATA)}")
    template = load_vb_template(template)
    names = template.names if names is None else names
    kind, ops = VB_DESIDERATA[desideratum]
    rng = random.Random(seed)
    digits = [DIGITS[i % len(DIGITS)] for i in range(n)]
    rng.shuffle(digits)
    out, seen = [], set()
    for digit in digits:
        for _ in range(1000):
            if kind == "vd":
                original, alternate = _vd_pair(rng, rng.choice(ops), names, digit, template)
            else:
                original, alternate = _oi_pair(rng, ops, names, digit, template)
            if original.text not in seen:
                break
        else:
            raise RuntimeError(f"could not find {n} distinct {desideratum} programs: ask for fewer or add names")
        seen.add(original.text)
        target = alternate.answer if kind == "vd" else original.answer
        meta = {"full_answers": [original.meta["full_answer"], alternate.meta["full_answer"]]}
        out.append(Triple(original, alternate, target, desideratum, meta))
    return out


def value_dependence_triples(n: int, *, seed: int = 0, names: Sequence[str] | None = None,
                             template: VarBindTemplate | str | None = None) -> list[Triple]:
    """vb_triples("value_dependence", ...)."""
    return vb_triples("value_dependence", n, seed=seed, names=names, template=template)


def operation_invariance_triples(n: int, *, seed: int = 0, names: Sequence[str] | None = None,
                                 template: VarBindTemplate | str | None = None) -> list[Triple]:
    """vb_triples("operation_invariance", ...)."""
    return vb_triples("operation_invariance", n, seed=seed, names=names, template=template)


def vb_transfer_sets(n: int, *, seed: int = 0, names: Sequence[str] | None = None,
                     template: VarBindTemplate | str | None = None) -> dict[str, list[Triple]]:
    """The transfer test: VD on multiplication and OI swapping + and *."""
    transfer = ("value_dependence_mul", "operation_invariance_add_mul")
    return {d: vb_triples(d, n, seed=seed, names=names, template=template) for d in transfer}
