"""A real headless browser for the tests: Debian's ``chromium``, run once per page.

``dump_dom`` loads a page, lets its scripts run for a budget of *virtual* time (Chromium holds the
clock while fetches are pending, so timers and fetches finish in that budget however slow the
machine is) and returns the rendered DOM; ``screenshot`` writes a PNG of the same. Every run has
its own profile directory, a wall-clock bound, and is stopped by its own process group.
``Dom`` reads the serialized DOM: an element's text by id, its attributes, and tables as rows.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import struct
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser")
INSTALL_HINT = "install Debian's chromium: apt-get install chromium (scripts/install-test-deps.sh does)"
RUN_TIMEOUT_S = 90.0
# Elements without an end tag (the serialized DOM writes them as <meta ...>).
_VOID = frozenset(
    {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}
)


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path is not None:
            return path
    return None


def _run(chromium: str, *args: str, timeout: float = RUN_TIMEOUT_S) -> str:
    with tempfile.TemporaryDirectory(prefix="llmlb-chromium-") as profile:
        argv = [
            chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-extensions", "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args,
        ]  # fmt: skip
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group: its helpers are stopped with it
            env={**os.environ, "HOME": profile},
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=10)
            raise AssertionError(
                f"chromium did not finish within {timeout:.0f} s: {' '.join(argv)}"
            ) from None
        finally:
            # Helpers (zygote, GPU/utility processes) normally exit with the browser; never leave one.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        if proc.returncode != 0:
            raise AssertionError(f"chromium exited {proc.returncode}: {' '.join(argv)}\n{err[-3000:]}")
        return out


def dump_dom(chromium: str, url: str, budget_ms: int = 4000) -> Dom:
    """The page at ``url`` after ``budget_ms`` of virtual time, as a :class:`Dom`."""
    html = _run(chromium, f"--virtual-time-budget={budget_ms}", "--dump-dom", url)
    dom = Dom()
    dom.feed(html)
    dom.close()
    return dom


def screenshot(chromium: str, url: str, path: Path, size: tuple[int, int], budget_ms: int = 4000) -> None:
    """A PNG of the page at ``url`` (``size`` = window width, height) written to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    _run(
        chromium,
        f"--virtual-time-budget={budget_ms}",
        "--hide-scrollbars",
        f"--window-size={width},{height}",
        f"--screenshot={path}",
        url,
    )


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert head[12:16] == b"IHDR", f"{path} is not a PNG"
    width, height = struct.unpack(">II", head[16:24])
    return width, height


class Dom(HTMLParser):
    """The rendered page: ``text(id)``, ``attrs(id)`` and ``table(id)`` (rows as {heading: text})."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self._texts: dict[str, list[str]] = {}
        self._attrs: dict[str, dict[str, str | None]] = {}
        self._tables: dict[str, list[list[tuple[str, str, str]]]] = {}  # cells: (text, title, class)
        self._open: list[tuple[str, str | None]] = []  # (tag, id) of the elements open now
        self._table: str | None = None
        self._cell: list[str] | None = None
        self._cell_attrs: tuple[str, str] = ("", "")
        self._table_tags: dict[str, set[str]] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self._table is not None:
            self._table_tags[self._table].add(tag)
        ident = dict(attrs).get("id")
        if ident is not None:
            self._attrs[ident] = dict(attrs)
            self._texts[ident] = []
        if tag in _VOID:
            return
        self._open.append((tag, ident))
        if tag == "table" and ident is not None:
            self._table = ident
            self._tables[ident] = []
            self._table_tags[ident] = set()
        elif tag == "tr" and self._table is not None:
            self._tables[self._table].append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = []
            found = dict(attrs)
            self._cell_attrs = (found.get("title") or "", found.get("class") or "")

    def handle_endtag(self, tag: str) -> None:
        if tag in _VOID:
            return
        while self._open:
            open_tag, _ = self._open.pop()
            if open_tag == tag:
                break
        if tag in ("td", "th") and self._table is not None and self._cell is not None:
            self._tables[self._table][-1].append(("".join(self._cell).strip(), *self._cell_attrs))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        for _, ident in self._open:
            if ident is not None:
                self._texts[ident].append(data)
        if self._cell is not None:
            self._cell.append(data)

    def text(self, ident: str) -> str:
        assert ident in self._texts, f"no element with id {ident!r}"
        return " ".join("".join(self._texts[ident]).split())

    def attrs(self, ident: str) -> dict[str, str | None]:
        assert ident in self._attrs, f"no element with id {ident!r}"
        return self._attrs[ident]

    def hidden(self, ident: str) -> bool:
        return "hidden" in self.attrs(ident)

    def tags_in(self, table: str) -> set[str]:
        """The element names inside the table."""
        assert table in self._table_tags, f"no table with id {table!r}"
        return self._table_tags[table]

    def table(self, ident: str, part: int = 0) -> list[dict[str, str]]:
        """The table's rows under its first row's headings (a one-cell row: {first heading: text});
        ``part=1``: the cells' titles (what shows on hover), ``part=2``: their classes."""
        assert ident in self._tables, f"no table with id {ident!r}"
        head, *rows = self._tables[ident]
        headings = [text for text, _, _ in head]
        return [dict(zip(headings, (cell[part] for cell in row), strict=False)) for row in rows]

    def titles(self, ident: str) -> list[dict[str, str]]:
        """The table's rows as the titles of their cells, under its headings."""
        return self.table(ident, part=1)

    def classes(self, ident: str) -> list[dict[str, str]]:
        """The table's rows as the class names of their cells, under its headings."""
        return self.table(ident, part=2)
