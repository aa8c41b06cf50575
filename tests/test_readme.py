"""The README's pass table is generated from the registry; this keeps it in sync.

To refresh it: ONNXOPT_UPDATE_README=1 python -m pytest tests/test_readme.py
"""

import os
import re
from pathlib import Path

from onnxopt.cli import pass_rows, pass_table_markdown

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"(<!-- passes:begin -->\n)(.*?)(<!-- passes:end -->)", re.S)


def test_readme_pass_table_matches_the_registry():
    text = README.read_text()
    table = pass_table_markdown(pass_rows()) + "\n"
    if os.environ.get("ONNXOPT_UPDATE_README"):
        README.write_text(BLOCK.sub(lambda m: m.group(1) + table + m.group(3), text))
        text = README.read_text()
    assert BLOCK.search(text).group(2) == table, "README pass table is stale: see this file's docstring"
