"""Placeholder for the verdicts branch's ``exporter/hazards.py`` (design.md): only the type the landing
page renders. At merge, the verdicts branch's file replaces this one wholesale."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Hazard:
    """An exposed feature whose prerequisite is missing and that the guest OS still shows and uses."""

    feature: str
    requires: tuple[str, ...]
