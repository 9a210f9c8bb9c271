"""The demo corpus: Jane Austen's six novels, as shipped in Debian's `r-cran-janeaustenr` package.

The package (MIT-licensed packaging of public-domain texts) stores each novel as an R character vector (one
element per printed line) inside the lazy-load database `data/Rdata.rdb`. We read it without R: the index
`Rdata.rdx` (a gzip'd R serialization) gives each object's byte range; each blob is a 4-byte length followed by
a zlib stream holding an R XDR serialization of a STRSXP.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
import subprocess
import io
import tarfile
import zlib
from pathlib import Path

DEB_PACKAGE = "r-cran-janeaustenr"
DEB_VERSION = "1.0.0-1"
DEB_SHA256 = "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95"
DATA_DIR = "usr/lib/R/site-library/janeaustenr/data/"
NOVELS = ["sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion"]


def fetch_deb(work: Path) -> Path:
    """`apt-get download r-cran-janeaustenr=1.0.0-1` into `work` (skipped when the .deb is already there)."""
    existing = sorted(work.glob(f"{DEB_PACKAGE}_*.deb"))
    if existing:
        return existing[0]
    subprocess.run(["apt-get", "download", f"{DEB_PACKAGE}={DEB_VERSION}"], cwd=work, check=True)
    deb = sorted(work.glob(f"{DEB_PACKAGE}_*.deb"))[0]
    if sha256(deb) != DEB_SHA256:
        raise SystemExit(f"{deb.name}: sha256 {sha256(deb)} differs from the pinned {DEB_SHA256}")
    return deb


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _ar_members(deb: bytes) -> dict[str, bytes]:
    """Members of a Debian `ar` archive."""
    assert deb[:8] == b"!<arch>\n", "not a .deb (ar) file"
    pos, members = 8, {}
    while pos < len(deb):
        header = deb[pos:pos + 60]
        name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58].decode().strip())
        members[name] = deb[pos + 60:pos + 60 + size]
        pos += 60 + size + (size % 2)
    return members


def _data_files(deb_path: Path) -> dict[str, bytes]:
    members = _ar_members(deb_path.read_bytes())
    name = next(n for n in members if n.startswith("data.tar"))
    with tarfile.open(fileobj=io.BytesIO(members[name])) as tar:
        return {m.name.lstrip("./"): tar.extractfile(m).read() for m in tar.getmembers()
                if m.isfile() and DATA_DIR in m.name}


class _XDR:
    """Just enough of R's XDR serialization to read a character vector (and skip the index's list)."""

    def __init__(self, data: bytes, pos: int | None = None):
        """Parse the header when `pos` is None; otherwise start reading SEXPs at `pos`."""
        self.data, self.pos = data, pos if pos is not None else 2
        if pos is not None:
            return
        assert data[:2] == b"X\n", "not an XDR R serialization"
        version = self.int()
        self.int(), self.int()  # writer R version, minimal reader version
        if version == 3:
            n = self.int()  # native encoding name length (read before moving pos)
            self.pos += n

    def int(self) -> int:
        (value,) = struct.unpack(">i", self.data[self.pos:self.pos + 4])
        self.pos += 4
        return value

    def strings(self) -> list[str]:
        flags = self.int()
        assert flags & 0xFF == 16, f"expected a character vector (STRSXP), got SEXP type {flags & 0xFF}"
        out = []
        for _ in range(self.int()):
            self.int()  # CHARSXP flags (encoding bits)
            n = self.int()
            out.append("" if n == -1 else self.data[self.pos:self.pos + n].decode("utf-8"))
            self.pos += max(n, 0)
        return out


def _object_ranges(rdx: bytes) -> dict[str, tuple[int, int]]:
    """Byte range of each object in Rdata.rdb, from the index (a gzip'd serialized named list).

    The index's `variables` list holds one INTSXP [offset, length] per object (flags 13, length 2), followed by
    its `names` attribute (a STRSXP); we pick those out directly instead of walking the whole pairlist.
    """
    data = gzip.decompress(rdx)
    entries, pos, marker = [], 0, struct.pack(">ii", 13, 2)
    while (pos := data.find(marker, pos)) != -1:
        entries.append(struct.unpack(">ii", data[pos + 8:pos + 16]))
        pos += 16
    names = _XDR(data, pos=data.find(b"names") + len("names")).strings()
    return dict(zip(names, entries))


def read_novels(deb_path: Path) -> dict[str, list[str]]:
    """novel name -> its printed lines, in the package's order."""
    files = _data_files(deb_path)
    rdb = files[DATA_DIR + "Rdata.rdb"]
    novels = {}
    for name, (offset, length) in _object_ranges(files[DATA_DIR + "Rdata.rdx"]).items():
        blob = rdb[offset:offset + length]
        novels[name] = _XDR(zlib.decompress(blob[4:])).strings()
    return novels


def paragraphs(lines: list[str]) -> list[str]:
    """Join printed lines into paragraphs (blank lines separate them); whitespace collapsed."""
    paras, current = [], []
    for line in lines + [""]:
        if line.strip():
            current.append(line.strip())
        elif current:
            paras.append(" ".join(" ".join(current).split()))
            current = []
    return paras


def split_novel(paras: list[str], held_out_fraction: float) -> tuple[list[str], list[str]]:
    """Train = the first (1 - f) of the novel's characters, held-out = the rest (contiguous, no leakage)."""
    total = sum(len(p) for p in paras)
    seen, cut = 0, len(paras)
    for i, p in enumerate(paras):
        if seen >= total * (1 - held_out_fraction):
            cut = i
            break
        seen += len(p)
    return paras[:cut], paras[cut:]
