"""Man pages and shell completions: what ``tools/cli_docs.py`` generates from the argparse
parsers is what is committed, the man pages render without a warning, and the bash and zsh
completions complete (zsh's run in an interactive zsh on a pseudo-terminal)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from daemon import Daemon, Raw, wait_job
from ramctl_support import ok

from ramd.config import Config, Limits

ROOT = Path(__file__).resolve().parent.parent
GENERATOR = ROOT / "tools" / "cli_docs.py"
FILES = (
    "man/ramd.8",
    "man/ramctl.1",
    "completions/bash/ramd",
    "completions/bash/ramctl",
    "completions/zsh/_ramd",
    "completions/zsh/_ramctl",
)


def test_committed_files_are_the_generator_output(tmp_path: Path) -> None:
    p = subprocess.run(
        [sys.executable, str(GENERATOR), str(tmp_path)],
        capture_output=True,
        check=True,
        timeout=60,
    )
    written = sorted(str(Path(line).relative_to(tmp_path)) for line in p.stdout.decode().split())
    assert written == sorted(FILES)
    for name in FILES:
        assert (ROOT / name).read_text() == (tmp_path / name).read_text(), (
            f"{name} is stale: run `python tools/cli_docs.py`"
        )


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed")
@pytest.mark.parametrize("page", ["man/ramd.8", "man/ramctl.1"])
def test_man_pages_render_without_warnings(page: str) -> None:
    p = subprocess.run(
        ["groff", "-man", "-Tutf8", "-ww", "-z", str(ROOT / page)],
        capture_output=True,
        timeout=60,
    )
    assert p.returncode == 0 and p.stderr == b""
    rendered = subprocess.run(
        ["groff", "-man", "-Tascii", str(ROOT / page)], capture_output=True, timeout=60
    ).stdout.decode()
    text = re.sub(".\b", "", rendered)  # overstrike bold and underline
    for word in ("NAME", "SYNOPSIS", "OPTIONS", "--socket", "--version"):
        assert word in text
    for section in ("EXAMPLES", "ENVIRONMENT", "FILES"):
        assert re.search(rf"^{section}$", text, re.MULTILINE), section
    assert "RAMD_SOCKET" in text


def test_ramd_man_page_lists_every_configuration_key() -> None:
    text = (ROOT / "man" / "ramd.8").read_text().replace("\\-", "-")
    section = text.split(".SH CONFIGURATION", 1)[1].split(".SH ", 1)[0]
    for name, field in Config.model_fields.items():
        key = field.alias or name
        if key not in ("limits", "block"):
            assert f"\\fB{key}\\fR" in section, key
    for name, field in Limits.model_fields.items():
        assert f"\\fB[limits] {field.alias or name}\\fR" in section, name
    assert '(default: "8M")' in section and '(default: "0600")' in section


def _shell(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[bytes]:
    """Run a shell that completes: no ``RAMD_SOCKET`` or ``XDG_RUNTIME_DIR`` from the test
    run, and ``ramctl`` on ``PATH`` is this interpreter's (as in an activated virtualenv)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAMD_SOCKET", "XDG_RUNTIME_DIR")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(argv, capture_output=True, check=True, cwd=cwd, env=env, timeout=60)


def complete(program: str, words: list[str], cwd: Path = ROOT) -> list[str]:
    """What the bash completion of ``program`` offers for the command line ``words``
    (the last word is the one being completed); it must print nothing on stderr. ``ramctl``
    on ``PATH`` is this interpreter's (as in an activated virtualenv)."""
    script = ROOT / "completions" / "bash" / program
    line = " ".join(shlex.quote(w) for w in [program, *words])
    code = (
        f"source {shlex.quote(str(script))}\n"
        f"COMP_WORDS=({line})\n"
        f"COMP_CWORD={len(words)}\n"
        f"_{program}\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    p = _shell(["bash", "--norc", "--noprofile", "-c", code], cwd)
    assert p.stderr == b""
    return [w for w in p.stdout.decode().split("\n") if w]


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_of_ramctl_and_ramd(shell: str, tmp_path: Path) -> None:
    def got(program: str, words: list[str], cwd: Path = ROOT) -> list[str]:
        return sorted((complete if shell == "bash" else zsh_complete)(program, words, cwd))

    assert got("ramctl", ["li"]) == ["list"]
    assert got("ramctl", ["--socket", "/x.sock", "--timeout", "5", "wa"]) == ["watch"]
    assert got("ramctl", ["list", "--j"]) == ["--json"]
    assert got("ramctl", ["del", "ram0", "--if"]) == ["--if-exists"]
    assert got("ramctl", ["watch", "RAM_BLOCK_RE"]) == ["RAM_BLOCK_REMOVED", "RAM_BLOCK_RESIZED"]
    assert set(got("ramctl", [""])) >= {"add", "del", "read", "watch", "call"}
    (tmp_path / "dump.bin").write_bytes(b"")
    assert got("ramctl", ["read", "a", "0", "1", "-o", "du"], tmp_path) == ["dump.bin"]
    assert got("ramd", ["--log-level", "w"]) == ["warning"]
    assert got("ramd", ["--event-loop", ""]) == ["asyncio", "uvloop"]
    assert got("ramd", ["--qmp"]) == ["--qmp-socket"]


def test_bash_completion_asks_the_daemon_for_ids_images_methods_and_jobs(
    any_daemon: Daemon, tmp_path: Path
) -> None:
    s = str(any_daemon.path)
    ok(s, "add", "ram0", "1M")
    ok(s, "add", "rom1", "1M")
    ok(s, "save", "img-a", "ram0")
    jid = ok(s, "save", "img-b", "--no-wait").strip()
    try:
        assert complete("ramctl", ["--socket", s, "info", ""]) == ["ram0", "rom1"]
        assert complete("ramctl", ["info", "--socket", s, "r"]) == ["ram0", "rom1"]
        assert complete("ramctl", ["--socket", s, "resize", "ra"]) == ["ram0"]
        assert complete("ramctl", ["--socket", s, "resize", "ram0", ""]) == []  # SIZE
        assert complete("ramctl", ["--socket", s, "add", ""]) == []  # a new id
        assert complete("ramctl", ["--socket", s, "save", "img-c", "ro"]) == ["rom1"]
        assert complete("ramctl", ["--socket", s, "save", "img-c", "ram0", "ro"]) == ["rom1"]
        assert complete("ramctl", ["--socket", s, "load", "img"]) == ["img-a", "img-b"]
        assert complete("ramctl", ["--socket", s, "rm-image", "img-a", "img-"]) == [
            "img-a",
            "img-b",
        ]
        assert complete("ramctl", ["--socket", s, "call", "query-ram"]) == ["query-ram-blocks"]
        assert complete("ramctl", ["--socket", s, "jobs", ""]) == ["list", "cancel", "dismiss"]
        assert complete("ramctl", ["--socket", s, "jobs", "dismiss", ""]) == [jid]
        # no daemon there: nothing offered, nothing printed
        missing = str(tmp_path / "missing.sock")
        assert complete("ramctl", ["--socket", missing, "info", ""]) == []
    finally:
        with Raw(s) as r:  # the pooled daemon must be left as it was found
            wait_job(r, jid)
            r.call("job-dismiss", id=jid)
        ok(s, "rm-image", "img-a", "img-b")


# -- zsh: the completion system run for real, in an interactive zsh on a pseudo-terminal -------

#: Starts an interactive ``zsh -f`` on a pty (zsh/zpty) with ``$1`` first in ``fpath`` and
#: compinit, types the command line ``$2`` and a TAB, and prints what the terminal shows. Every
#: candidate the completion offers is printed as ``<M>candidate`` by a ``compadd`` wrapper; a
#: completion post-function prints the end marker (spelled apart, so that its echo does not
#: end the read early) and exits.
ZSH_DRIVER = r"""
zmodload zsh/zpty || exit 2
zpty z zsh -f -i
zpty -w z "fpath=(${(q)1} \$fpath); autoload -Uz compinit; compinit -u -D"
zpty -w z "PROMPT= RPROMPT=; unset zle_bracketed_paste; setopt no_beep"
zpty -w z 'compadd () {
  if [[ ${@[1,(i)(-|--)]} == *-(O|A|D)\ * ]]; then builtin compadd "$@"; return $?; fi
  typeset -a __hits; builtin compadd -A __hits "$@"; local ret=$?
  (( $#__hits )) && print -rl -- "" "<""M>"${^__hits}
  return ret
}'
zpty -w z 'comppostfuncs=(__done); __done () { print -r -- "" "<E""ND>"; exit }'
zpty -w -n z "$2"$'\t'
while zpty -r z line; do
  print -rn -- "$line"
  [[ $line == *"<END>"* ]] && break
done
zpty -d z
"""


def zsh_complete(program: str, words: list[str], cwd: Path = ROOT) -> list[str]:
    """What the zsh completion of ``program`` offers for the command line ``words`` (the last
    word is the one being completed), sorted. ``ramctl`` on ``PATH`` is this interpreter's."""
    if shutil.which("zsh") is None:
        pytest.skip("zsh is not installed (.ci/run installs it)")
    line = " ".join([program, *(shlex.quote(w) for w in words[:-1]), words[-1]])
    fpath = str(ROOT / "completions" / "zsh")
    out = _shell(["zsh", "-f", "-c", ZSH_DRIVER, "zsh", fpath, line], cwd).stdout.decode()
    assert "<END>" in out, out  # the completion ran to its end
    return sorted(set(re.findall(r"<M>([^\r\n]*)", out)))


def test_zsh_completion_asks_the_daemon_for_ids_images_and_methods(
    any_daemon: Daemon, tmp_path: Path
) -> None:
    s = str(any_daemon.path)
    ok(s, "add", "ram0", "1M")
    ok(s, "add", "rom1", "1M")
    ok(s, "save", "img-a", "ram0")
    try:
        assert zsh_complete("ramctl", ["--socket", s, "info", ""]) == ["ram0", "rom1"]
        assert zsh_complete("ramctl", ["--socket", s, "resize", "ra"]) == ["ram0"]
        assert zsh_complete("ramctl", ["--socket", s, "load", "img"]) == ["img-a"]
        assert zsh_complete("ramctl", ["--socket", s, "call", "query-ram"]) == ["query-ram-blocks"]
        # no daemon there: nothing offered
        missing = str(tmp_path / "missing.sock")
        assert zsh_complete("ramctl", ["--socket", missing, "info", ""]) == []
    finally:
        ok(s, "rm-image", "img-a")
