"""``st`` (the schemathesis CLI) with one interpreter bug kept out of its way.

CPython 3.11's ``ast.parse`` can fail with ``SystemError: AST constructor recursion depth
mismatch`` when it runs deep inside a recursion. Hypothesis calls it to describe lambdas
in a strategy's ``repr`` (it reads the lambda's source), and schemathesis builds reprs of
deeply nested strategies while it generates request bodies, so a run can die of it. A
description is only ever used in messages, so here it is a fixed word instead: nothing
that is generated or checked changes.

Usage: ``python schemathesis_cli.py run ...`` (the arguments of ``st``).
"""

from __future__ import annotations

import sys

from hypothesis.internal import lambda_sources
from schemathesis.cli import schemathesis


def _plain_description(f: object) -> str:
    return "lambda"


lambda_sources.lambda_description = _plain_description

if __name__ == "__main__":
    sys.argv[0] = "st"
    sys.exit(schemathesis())
