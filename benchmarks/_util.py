"""Small helpers shared by the benchmark modules."""

from __future__ import annotations

import shutil
from pathlib import Path


def dir_bytes(path: Path) -> int:
    """Bytes of every plain file under ``path`` (0 if it does not exist)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def remove(path: Path) -> None:
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def mb(n_bytes: float) -> float:
    return n_bytes / 1e6


def target(metric: str, value: float, minimum: float) -> dict:
    """A ``>= minimum`` target on a headline metric, as stored in a result's ``targets``."""
    return {"metric": metric, "target": f">= {minimum:g}", "value": value, "met": bool(value >= minimum)}


def target_max(metric: str, value: float, maximum: float) -> dict:
    """A ``<= maximum`` target on a headline metric, as stored in a result's ``targets``."""
    return {"metric": metric, "target": f"<= {maximum:g}", "value": value, "met": bool(value <= maximum)}
