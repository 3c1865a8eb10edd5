"""The data stage's counts: what was read, kept, truncated, quarantined and left out (no Ray, no torch:
``rayalign validate``, the errors and summary.json read it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SkippedFiles:
    """What expanding the named directories left out: counts, and the first few names to show."""

    not_data: int = 0  # files not in a supported format
    links_outside: int = 0  # symbolic links to files outside the named directory: never read
    examples: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        return self.not_data + self.links_outside

    def as_dict(self) -> dict[str, Any]:
        return {"not_data": self.not_data, "links_outside": self.links_outside, "examples": list(self.examples)}


@dataclass
class DataReport:
    total: int = 0
    ok: int = 0
    truncated: int = 0
    quarantined: dict[str, int] = field(default_factory=dict)
    quarantine_path: str = ""
    files: list[str] = field(default_factory=list)  # what was read (directories expanded)
    skipped_files: SkippedFiles = field(default_factory=SkippedFiles)  # what expanding directories left out
    first_quarantined: str = ""  # "<file> line|row N: <reason>: <detail>", for a refusal's one line

    @property
    def num_quarantined(self) -> int:
        return sum(self.quarantined.values())

    @property
    def quarantined_fraction(self) -> float:
        return self.num_quarantined / self.total if self.total else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "ok": self.ok,
            "truncated": self.truncated,
            "quarantined": self.num_quarantined,
            "quarantined_by_reason": dict(sorted(self.quarantined.items())),
            "quarantined_fraction": round(self.quarantined_fraction, 6),
            "quarantine_path": self.quarantine_path,
            "files": len(self.files),
            "skipped_files": self.skipped_files.as_dict(),
        }

    def summary_line(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.quarantined.items())) or "none"
        left_out = self.skipped_files
        kinds = [f"{left_out.not_data} not .jsonl/.json/.gz/.parquet"] * bool(left_out.not_data) + [
            f"{left_out.links_outside} links to outside the directory"
        ] * bool(left_out.links_outside)
        skipped = (
            (
                f"; {left_out.total} files skipped ({', '.join(kinds)}): "
                + ", ".join(left_out.examples)
                + (", ..." if left_out.total > len(left_out.examples) else "")
            )
            if left_out.total
            else ""
        )
        return (
            f"data: {self.total} records, {self.ok} usable, {self.truncated} truncated, "
            f"{self.num_quarantined} quarantined ({reasons}) -> {self.quarantine_path}{skipped}"
        )
