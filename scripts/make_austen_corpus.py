"""Rebuild pruning_core/lm/data/{emma,pride_and_prejudice,persuasion}.txt.gz from Debian's r-cran-janeaustenr.

The novels are public domain; the Debian package (MIT) stores them in an R lazy-load database.
This script reads that database with a small pure-Python reader of R's XDR serialization, so
the shipped files can be reproduced bit for bit:

    apt-get download r-cran-janeaustenr
    dpkg-deb -x r-cran-janeaustenr_*.deb /tmp/janeaustenr
    python scripts/make_austen_corpus.py /tmp/janeaustenr/usr/lib/R/site-library/janeaustenr/data
"""

from __future__ import annotations

import argparse
import gzip
import struct
import zlib
from pathlib import Path

BOOKS = {"emma": "emma", "prideprejudice": "pride_and_prejudice", "persuasion": "persuasion"}


class _XDRReader:
    """A reader of the subset of R's XDR serialization format used by janeaustenr."""

    def __init__(self, buf: bytes) -> None:
        self.buf, self.pos, self.refs = buf, 0, []

    def i32(self) -> int:
        (v,) = struct.unpack_from(">i", self.buf, self.pos)
        self.pos += 4
        return v

    def raw(self, n: int) -> bytes:
        b = self.buf[self.pos : self.pos + n]
        self.pos += n
        return b

    def header(self) -> None:
        if self.raw(2) != b"X\n":
            raise ValueError("not an XDR-serialized R object")
        version = self.i32()
        self.i32()
        self.i32()
        if version == 3:
            self.raw(self.i32())

    def obj(self):
        """The next R object (SEXP): NULL, a reference, a symbol, a string, a pairlist or a vector."""
        flags = self.i32()
        typ, has_attr, has_tag = flags & 0xFF, bool(flags & 0x200), bool(flags & 0x400)
        if typ == 254:
            return None
        if typ == 255:
            i = flags >> 8
            return self.refs[(i if i else self.i32()) - 1]
        if typ == 1:
            s = self.obj()
            self.refs.append(s)
            return s
        if typ == 9:
            n = self.i32()
            return None if n == -1 else self.raw(n).decode("utf-8", "replace")
        if typ == 2:
            return self.pairlist(has_attr, has_tag)
        return self.vector(typ, has_attr)

    def pairlist(self, has_attr: bool, has_tag: bool) -> dict:
        d = {}
        while True:
            if has_attr:
                self.obj()
            tag = self.obj() if has_tag else None
            d[tag] = self.obj()
            flags = self.i32()
            if flags & 0xFF == 254:
                return d
            has_attr, has_tag = bool(flags & 0x200), bool(flags & 0x400)

    def vector(self, typ: int, has_attr: bool):
        n = self.i32()
        if typ in (16, 19):
            val = [self.obj() for _ in range(n)]
        elif typ in (13, 10):
            val = [self.i32() for _ in range(n)]
        elif typ == 14:
            val = list(struct.unpack_from(f">{n}d", self.raw(8 * n)))
        else:
            raise ValueError(f"unsupported R SEXP type {typ}")
        if has_attr:
            a = self.obj()
            if isinstance(a, dict) and "names" in a:
                return dict(zip(a["names"], val, strict=True))
        return val


def parse_rds(buf: bytes):
    """Parse the subset of R's XDR serialization format used by janeaustenr."""
    reader = _XDRReader(buf)
    reader.header()
    return reader.obj()


def load_austen(datadir: Path) -> dict[str, list[str]]:
    """Return {book key: list of lines} from a janeaustenr data directory."""
    idx = parse_rds(gzip.decompress((datadir / "Rdata.rdx").read_bytes()))
    rdb = (datadir / "Rdata.rdb").read_bytes()
    return {
        key: parse_rds(zlib.decompress(rdb[off : off + n][4:]))
        for key, (off, n) in idx["variables"].items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("datadir", type=Path, help="janeaustenr's data directory (holds Rdata.rdx/.rdb)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "pruning_core" / "lm" / "data")
    args = parser.parse_args()
    books = load_austen(args.datadir)
    args.out.mkdir(parents=True, exist_ok=True)
    for key, name in BOOKS.items():
        text = "\n".join(line or "" for line in books[key]) + "\n"
        # mtime=0 makes the gzip bytes reproducible.
        with open(args.out / f"{name}.txt.gz", "wb") as raw_file:
            with gzip.GzipFile(filename=f"{name}.txt", mode="wb", fileobj=raw_file, mtime=0, compresslevel=9) as f:
                f.write(text.encode("utf-8"))
        print(f"{name}: {len(books[key])} lines, {len(text)} characters")  # noqa: T201 (script output)


if __name__ == "__main__":
    main()
