"""Generator against generator: per dimension, how often side A's images beat side B's for the same prompt.

:mod:`.sides` reads each side (a folder of images, an ``mps dataset`` folder, a JSONL from ``mps score``)
and gives every image its prompt; :mod:`.compare` scores what needs scoring and compares every two
sides (win rate, mean difference, bootstrap interval; a Bradley-Terry ranking beyond two), with the
statistics of :mod:`.stats`. Nothing here prints.
"""

from __future__ import annotations

from .compare import DimResult, Matchup, NoNamesMatch, PromptResult, Strength, VersusReport, compare_sides
from .series import Series, build_series
from .sides import ALL_PAIRS, BY_NAME, PAIRINGS, Entry, Failure, Lineup, Side, SideError, line_up, read_side
from .stats import bootstrap_interval, bradley_terry

__all__ = [
    "ALL_PAIRS", "BY_NAME", "PAIRINGS", "DimResult", "Entry", "Failure", "Lineup", "Matchup", "NoNamesMatch",
    "PromptResult", "Series", "Side", "SideError", "Strength",
    "VersusReport", "bootstrap_interval", "bradley_terry", "build_series", "compare_sides", "line_up", "read_side",
]
