"""No comment or docstring cites a document the repository lacks: every `docs/<name>.md` the code
names exists (README/CHANGELOG too), and no code cites the steering notes kept outside it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITED = re.compile(r"(?<![\w/])((?:docs/)?[A-Z_a-z][\w-]*\.md)\b")
OUTSIDE = ("DESIGN.md", "MODEL_FACTS", "TOOLCHAIN.md", "STYLE.md")  # notes beside the checkout, not in it
# onnx-tensorrt's operator table; the bench report walkforge writes
FOREIGN = {"docs/operators.md", "operators.md", "bench.md"}


def test_every_cited_document_exists():
    missing = []
    for path in [*ROOT.glob("walkforge/**/*.py"), *ROOT.glob("tests/**/*.py"), *ROOT.glob("scripts/*")]:
        text = path.read_text(errors="replace")
        missing += [f"{path.relative_to(ROOT)} cites {name}" for name in OUTSIDE if name in text]
        for name in set(CITED.findall(text)) - FOREIGN:
            if not ((ROOT / name).is_file() or (ROOT / "docs" / name).is_file()):
                missing.append(f"{path.relative_to(ROOT)} cites {name}")
    assert not [m for m in missing if "test_doc_citations.py" not in m], missing
