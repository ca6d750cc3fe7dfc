"""The method pages state each method's formula and sign convention in the same words as the code's docstring.

For every (page, object) pair below, each paragraph of the object's docstring description (and/or of its
``Notes`` section) must appear on the page, up to whitespace and Sphinx roles (``:class:`~a.b.C``` is written
```C``` on the pages). When a docstring changes, the page must be updated with it.
"""
import importlib
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"

pytestmark = pytest.mark.docs

CASES = [
    ("methods/first_order.md", "deel.influenciae.influence.FirstOrderInfluenceCalculator", "description"),
    ("methods/second_order.md", "deel.influenciae.influence.SecondOrderInfluenceCalculator", "description"),
    ("methods/arnoldi.md", "deel.influenciae.influence.ArnoldiInfluenceCalculator", "description"),
    ("methods/tracin.md", "deel.influenciae.trac_in.TracIn", "description"),
    ("methods/trak.md", "deel.influenciae.trak.TRAK", "description"),
    ("methods/rps_l2.md", "deel.influenciae.rps.RepresenterPointL2", "description"),
    ("methods/rps_l2.md", "deel.influenciae.rps.BaseRepresenterPoint", "description"),
    ("methods/rps_lje.md", "deel.influenciae.rps.RepresenterPointLJE", "description"),
    ("methods/rps_lje.md", "deel.influenciae.rps.BaseRepresenterPoint", "description"),
    ("methods/boundary.md", "deel.influenciae.boundary_based.SampleBoundaryCalculator", "notes"),
    ("methods/boundary.md", "deel.influenciae.boundary_based.WeightsBoundaryCalculator", "notes"),
    ("ihvp.md", "deel.influenciae.common.ExactIHVP", "description"),
    ("ihvp.md", "deel.influenciae.common.ConjugateGradientDescentIHVP", "description"),
    ("ihvp.md", "deel.influenciae.common.LissaIHVP", "description"),
    ("ihvp.md", "deel.influenciae.common.ArnoldiIHVP", "description"),
]

ROLE = re.compile(r":(?:class|meth|func|mod|attr):`~?([^`]+)`")
SECTION = re.compile(r"^(\w[\w ]*)\n-{3,}$", re.MULTILINE)


def _short_role(match):
    target = match.group(1)
    # ``:class:`~a.b.C``` shows ``C``; ``:meth:`C.m``` shows ``C.m``.
    return "`" + (target.rsplit(".", 1)[-1] if match.group(0).split("`")[1].startswith("~") else target) + "`"


def normalize(text):
    """Collapse whitespace and write Sphinx roles as plain code spans."""
    return " ".join(ROLE.sub(_short_role, text).split())


def resolve(dotted):
    """The object named by a dotted path."""
    module, name = dotted.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def sections(docstring):
    """{"summary": str, "description": str, "<section name lower>": str} of a numpy-style docstring."""
    first, _, rest = docstring.partition("\n")
    parts = SECTION.split(rest)
    result = {"summary": first.strip(), "description": parts[0]}
    for name, body in zip(parts[1::2], parts[2::2]):
        result[name.strip().lower()] = body
    return result


def paragraphs(text):
    """Blank-line separated paragraphs, without ``.. math::`` directive lines."""
    return [block for block in re.split(r"\n\s*\n", text)
            if block.strip() and not block.strip().startswith(".. math::")]


@pytest.mark.parametrize("page, dotted, part", CASES, ids=[f"{p}:{d.rsplit('.', 1)[1]}" for p, d, _ in CASES])
def test_page_quotes_docstring(page, dotted, part):
    """Every paragraph of the docstring part appears, in the same words, on the page."""
    page_text = normalize((DOCS / page).read_text(encoding="utf-8"))
    parts = sections(inspect.getdoc(resolve(dotted)))
    assert part in parts, f"{dotted} has no {part} section"
    expected = paragraphs(parts[part]) + ([parts["summary"]] if part == "description" else [])
    missing = [normalize(paragraph) for paragraph in expected if normalize(paragraph) not in page_text]
    assert not missing, f"docs/{page} does not quote these words of {dotted}'s docstring:\n" + "\n".join(missing)
