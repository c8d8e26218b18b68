"""Which chatproxy a benchmark runs: the working tree (the default), or
``chatproxy/`` and ``twisted/plugins/`` as committed at a git revision, or a
copy in another directory, put on the path of its processes."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from processes import BenchError

BENCH_DIR = Path(__file__).resolve().parent


def _git(*args: str) -> str:
    completed = subprocess.run(["git", "-C", str(BENCH_DIR.parent), *args], capture_output=True, text=True,
                               check=False)
    return completed.stdout


def export_chatproxy(rev: str, directory: Path) -> str:
    """Put ``chatproxy/`` and ``twisted/plugins/`` as committed at ``rev`` in ``directory``; the commit."""
    commit = _git("rev-parse", "--short", "--verify", f"{rev}^{{commit}}").strip()
    if not commit:
        raise BenchError(f"no such revision: {rev}")
    archive = subprocess.run(["git", "-C", str(BENCH_DIR.parent), "archive", "--format=tar", commit,
                              "chatproxy", "twisted"], capture_output=True, check=False)
    if archive.returncode != 0:
        raise BenchError(f"git archive failed: {archive.stderr.decode(errors='replace')}")
    directory.mkdir()
    subprocess.run(["tar", "-x", "-C", str(directory)], input=archive.stdout, check=True)
    return commit


def chatproxy_pythonpath(source: Path, shim: Path) -> list[Path]:
    """PYTHONPATH for running chatproxy from ``source`` instead of the working tree.

    The editable install puts the working tree on sys.path (a .pth file), and with it the
    working tree's twisted/plugins: a ``sitecustomize`` module in ``shim`` takes it off
    again, so that only ``source`` is seen.
    """
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(
        "import os, sys\n"
        f"_TREE = {str(BENCH_DIR.parent.resolve())!r}\n"
        "sys.path[:] = [p for p in sys.path if os.path.realpath(p or '.') != _TREE]\n")
    return [shim, source.resolve()]


def baseline_pythonpath(rev: str | None, source: Path | None, workdir: Path) -> tuple[list[Path] | None, dict[str, str]]:
    """PYTHONPATH for the ``*-baseline`` targets (``--baseline REV`` exported
    into ``workdir``, or ``--baseline-src DIR`` as it is; None with neither)
    and what the run records of it: ``baseline_commit`` or ``baseline_source``."""
    if rev:
        commit = export_chatproxy(rev, workdir / "baseline-src")
        return chatproxy_pythonpath(workdir / "baseline-src", workdir / "baseline-shim"), {"baseline_commit": commit}
    if source:
        described = f"{source.resolve()} ({describe_build_at(source)})"
        return chatproxy_pythonpath(source, workdir / "baseline-shim"), {"baseline_source": described}
    return None, {}


def with_pythonpath(argv: list[str], path: list[Path] | None) -> list[str]:
    """``argv`` run with ``path`` in front of PYTHONPATH (unchanged when None)."""
    if path is None:
        return argv
    pythonpath = os.pathsep.join(filter(None, [*map(str, path), os.environ.get("PYTHONPATH")]))
    return ["/usr/bin/env", f"PYTHONPATH={pythonpath}", *argv]


def describe_build_at(source: Path) -> str:
    """Which build the chatproxy in ``source`` is (pure Python, or compiled: its
    extension modules beside the .py files), as its own start-up line says it."""
    import runpy

    module = source / "chatproxy" / "compiled.py"
    if not module.exists():
        return "pure Python (from before the compiled build)"
    return str(runpy.run_path(str(module))["describe"]())
