"""Hooks into training. Every rank calls them at the same points of the loop, so a hook may be
collective (Ray's ``report`` is). Override what you need; the rest do nothing."""

from __future__ import annotations

from pathlib import Path


class Callback:
    def before_step(self, step: int) -> None:
        """Before every optimizer step; ``step`` counts this process's steps from 1."""

    def after_checkpoint(self, step: int, path: Path) -> None:
        """After a complete checkpoint of optimizer step ``step`` was written to ``path``."""

    def after_evaluate(self, step: int, metrics: dict[str, float]) -> None:
        """After the test set was evaluated at optimizer step ``step`` (same on every rank)."""
