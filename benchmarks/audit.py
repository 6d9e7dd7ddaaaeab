"""Dependency audit: ``pip-audit`` over the installed environment (PyPI's vulnerability data).

``make audit`` runs it (``.ci/run`` calls it before the tests) and prints the report: how many installed
packages were audited, the known vulnerabilities with their fixed versions, and the packages that could not
be audited. When the vulnerability service cannot be reached (no network, or PyPI answers nothing for the
packages) it says so plainly and exits 0: the build does not fail for that reason. Known vulnerabilities
are reported; ``--strict`` makes them fail the build.

    python -m benchmarks.audit [--strict] [--out benchmarks/results/pip-audit.txt]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

UNREACHABLE = ("ConnectionError", "NameResolutionError", "Max retries exceeded", "Temporary failure in name",
               "timed out", "Network is unreachable", "SSLError", "ProxyError")


def audit(timeout_s: float = 600) -> tuple[str, int]:
    """Run pip-audit; returns (report text, number of known vulnerabilities, or -1 when nothing was audited)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "audit.json"
        cmd = [sys.executable, "-m", "pip_audit", "--progress-spinner", "off", "--format", "json", "--output",
               str(out), "--skip-editable", "--local"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return f"pip-audit: no answer from the vulnerability service within {timeout_s:.0f} s: audit NOT done", -1
        doc = json.loads(out.read_text()) if out.exists() and out.stat().st_size else None
    if doc is None:
        err = proc.stderr.strip().splitlines()
        cause = next((line for line in reversed(err) if any(u in line for u in UNREACHABLE)), None)
        if cause is not None:
            return f"pip-audit could not reach the vulnerability service: audit NOT done\n  {cause[:300]}", -1
        return f"pip-audit failed (exit {proc.returncode}):\n" + "\n".join(err[-20:]), -1
    deps = doc.get("dependencies", [])
    skipped = [d for d in deps if d.get("skip_reason")]
    audited = [d for d in deps if not d.get("skip_reason")]
    vulns = [(d["name"], d["version"], v) for d in audited for v in d.get("vulns", [])]
    lines = []
    if not audited and skipped:
        lines.append(f"pip-audit could not get vulnerability data for any of the {len(deps)} installed packages "
                     "(the service is unreachable from here, or PyPI's JSON API answers nothing): audit NOT done")
        lines.append(f"  e.g. {skipped[0]['name']}: {skipped[0]['skip_reason']}")
        return "\n".join(lines), -1
    lines.append(f"pip-audit: {len(audited)} of {len(deps)} installed packages audited, "
                 f"{len(vulns)} known vulnerabilit{'y' if len(vulns) == 1 else 'ies'}")
    for name, version, v in sorted(vulns, key=lambda r: r[0].lower()):
        fix = ", ".join(v.get("fix_versions") or []) or "no fixed release"
        lines.append(f"  {name} {version}: {v['id']} (fixed in {fix}) {' '.join(v.get('aliases', []))}".rstrip())
    if skipped:
        lines.append(f"  not audited ({len(skipped)}): " + ", ".join(d["name"] for d in skipped))
    return "\n".join(lines), len(vulns)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--strict", action="store_true", help="Exit 1 when a known vulnerability is found.")
    ap.add_argument("--out", type=Path, help="Also write the report to this file.")
    args = ap.parse_args(argv)
    report, n = audit()
    print(report, flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report + "\n")
    return 1 if args.strict and n > 0 else 0


if __name__ == "__main__":
    sys.exit(main())
