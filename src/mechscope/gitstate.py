"""The git commit of a working tree, read safely in a checkout you did not write.

A repository's own ``.git/config`` can make ``git`` run commands: ``core.fsmonitor`` runs on every
``git status``, clean filters (``filter.<name>.clean``) run on files whose stat changed,
``core.hooksPath`` and ``include.path`` pull in more. A run record that called ``git status`` in a
cloned project would run whatever that project configured. So:

- the commit is read from the files (``HEAD``, ``refs/``, ``packed-refs``) without running git;
- whether the tree is dirty is asked of git only when the repository's config sets none of the keys
  that run a command, and then with ``core.fsmonitor`` and hooks switched off and no system config.
  Otherwise ``dirty`` is ``None`` and the record says which key stopped the check.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

# Config keys with which `git status` (or a config it includes) runs a program the repository names.
_EXECUTING = re.compile(r"^(core\.(fsmonitor|hookspath|pager|editor|sshcommand|askpass|gitproxy|alternaterefscommand)"
                        r"|diff\.external|filter\..+|diff\..+\.(textconv|command)|merge\..+\.driver"
                        r"|include\..+|includeif\..+|credential\..+|uploadpack\..+)$", re.IGNORECASE)
_SECTION = re.compile(r'^\[\s*([^\s\]"]+)(?:\s+"((?:[^"\\]|\\.)*)")?\s*\]')
_SHA = re.compile(r"^[0-9a-f]{40}([0-9a-f]{24})?$")


@dataclass(frozen=True)
class GitState:
    """``commit`` (None outside a repository), ``dirty`` (None when not checked) and why it was not checked."""

    commit: str | None
    dirty: bool | None
    unchecked: str | None = None

    def to_dict(self) -> dict:
        out = {"commit": self.commit, "dirty": self.dirty}
        if self.unchecked:
            out["dirty_unchecked"] = self.unchecked
        return out


def git_dir(start: str | Path) -> tuple[Path, Path] | None:
    """``(work tree, git dir)`` of the repository holding ``start``, found by walking up as git does."""
    here = Path(start).resolve()
    for folder in (here, *here.parents):
        dot = folder / ".git"
        if dot.is_dir():
            return folder, dot
        if dot.is_file():  # a worktree or submodule: "gitdir: <path>"
            text = dot.read_text(errors="replace").strip()
            if text.startswith("gitdir:"):
                target = Path(text[len("gitdir:"):].strip())
                return folder, (target if target.is_absolute() else (folder / target)).resolve()
    return None


def _common_dir(gdir: Path) -> Path:
    f = gdir / "commondir"
    if f.is_file():
        c = Path(f.read_text().strip())
        return (c if c.is_absolute() else gdir / c).resolve()
    return gdir


def read_ref(gdir: Path, ref: str = "HEAD", _depth: int = 0) -> str | None:
    """The commit ``ref`` points at, read from ``HEAD``, loose refs and ``packed-refs`` (no git process)."""
    if _depth > 5:
        return None
    for base in (gdir, _common_dir(gdir)):
        f = base / ref
        if f.is_file():
            text = f.read_text(errors="replace").strip()
            if text.startswith("ref:"):
                return read_ref(gdir, text[4:].strip(), _depth + 1)
            return text if _SHA.match(text) else None
    packed = _common_dir(gdir) / "packed-refs"
    if packed.is_file():
        for line in packed.read_text(errors="replace").splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1] == ref and _SHA.match(parts[0]):
                return parts[0]
    return None


def config_keys(path: Path) -> list[str]:
    """Every key set in one git config file, as ``section.subsection.key`` (lower-case section and key)."""
    keys, section = [], None
    if not path.is_file():
        return keys
    for raw in path.read_text(errors="replace").splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        m = _SECTION.match(line)
        if m:
            name, sub = m.group(1).lower(), m.group(2)
            section = f"{name}.{sub}" if sub is not None else name
            rest = line[m.end():].strip()
            if not rest or rest[0] in "#;":
                continue
            line = rest
        if section is not None:
            key = re.split(r"[\s=]", line, maxsplit=1)[0].lower()
            if key:
                keys.append(f"{section}.{key}")
    return keys


def executing_keys(gdir: Path) -> list[str]:
    """The keys of the repository's own config (and a worktree's) with which git would run a command."""
    files = [_common_dir(gdir) / "config", gdir / "config.worktree"]
    return sorted({k for f in files for k in config_keys(f) if _EXECUTING.match(k)})


def git_state(cwd: str | Path | None = None) -> GitState:
    """The commit of the repository holding ``cwd``, and whether its working tree has changes (see the module)."""
    found = git_dir(cwd or Path.cwd())
    if found is None:
        return GitState(None, None, "not inside a git repository")
    tree, gdir = found
    commit = read_ref(gdir)
    if commit is None:
        return GitState(None, None, "the repository has no commit yet")
    risky = executing_keys(gdir)
    if risky:
        return GitState(commit, None, f"not asked of git: the repository's config sets {', '.join(risky)}, with which "
                                      f"git would run a command")
    env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0", "GIT_OPTIONAL_LOCKS": "0"}
    cmd = ["git", "-c", "core.fsmonitor=false", "-c", "core.hooksPath=/dev/null", "-c", "core.untrackedCache=false",
           "status", "--porcelain", "--ignore-submodules=all"]
    try:
        out = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, timeout=10, env=env,
                             stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        return GitState(commit, None, f"git status failed: {e}")
    if out.returncode:
        return GitState(commit, None, f"git status failed: {out.stderr.strip()[:200]}")
    return GitState(commit, bool(out.stdout.strip()))
