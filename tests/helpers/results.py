# The RESULT {json} records test scripts print, read from output where ranks' lines may interleave.
"""With ``MOREH_AP_RANK_OUTPUT=all`` rank 0's process writes its own prints and (from torch elastic's tail
thread) the other ranks' lines to one stdout; ``print`` writes a text and its newline in two calls, so two
records can share a line (``RESULT {...}RESULT {...}``). :func:`result_records` finds every record wherever it starts."""
from __future__ import annotations

import json

MARK = "RESULT "


def result_records(stdout: str) -> list[dict]:
    """Every ``RESULT {json}`` record in ``stdout``, in order of appearance."""
    decoder = json.JSONDecoder()
    found, at = [], stdout.find(MARK)
    while at >= 0:
        try:
            record, end = decoder.raw_decode(stdout, at + len(MARK))
        except json.JSONDecodeError:
            end = at + len(MARK)  # "RESULT " in other text: not a record
        else:
            found.append(record)
        at = stdout.find(MARK, end)
    return found
