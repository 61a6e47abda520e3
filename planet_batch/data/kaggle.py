"""Kaggle round trip: download and safely extract the Planet files, submit a checked submission.

Everything that talks to Kaggle goes through one `KaggleApi` object (`api_factory`), so tests
put a fake at exactly that boundary. Credentials are checked, never printed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath

from planet_batch.errors import PlanetBatchError

log = logging.getLogger(__name__)

COMPETITION = "planet-understanding-the-amazon-from-space"
COMPETITION_FILES = (
    "train_v2.csv.zip",
    "train-jpg.tar.7z",
    "test-jpg.tar.7z",
    "test-jpg-additional.tar.7z",
    "sample_submission_v2.csv.zip",
)
DATASET = "nikitarom/planets-dataset"
DONE_DIR = ".planet-batch-done"


class KaggleError(PlanetBatchError, RuntimeError):
    pass


class ArchiveError(PlanetBatchError, ValueError):
    pass


def kaggle_json_path(env: Mapping[str, str] = os.environ) -> Path:
    return Path(env.get("KAGGLE_CONFIG_DIR") or Path.home() / ".kaggle") / "kaggle.json"


def check_credentials(env: Mapping[str, str] = os.environ) -> str:
    """Where the credentials come from ("environment" or the kaggle.json path); fails before any download."""
    if env.get("KAGGLE_USERNAME") and env.get("KAGGLE_KEY"):
        return "environment"
    path = kaggle_json_path(env)
    if path.is_file():
        if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            # The notebook's own warning: the key lets anyone who reads it act as you.
            log.warning("Your Kaggle API key is readable by other users on this system! To fix it, run: chmod 600 %s",
                        path)
        return str(path)
    raise KaggleError(
        f"no Kaggle credentials: set KAGGLE_USERNAME and KAGGLE_KEY, or save kaggle.json (kaggle.com > Settings > "
        f"API > Create New Token) as {path} and run chmod 600 {path}"
    )


def kaggle_api():
    """The real client, authenticated from the environment or kaggle.json."""
    from kaggle.api.kaggle_api_extended import KaggleApi

    api = KaggleApi()
    api.authenticate()
    return api


# ----------------------------------------------------------------------------------------------
# Extraction: refuse anything that would write outside the target


def _check_member(name: str, archive: Path) -> None:
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or name.startswith("/") or ".." in p.parts or (p.parts and ":" in p.parts[0]):
        raise ArchiveError(f"{archive.name}: refusing member {name!r}, it would be written outside the target")


def disk_budget(dest: Path, reserve: int = 1 << 30) -> int:
    """Bytes an extraction may write into `dest`: its free space less a reserve, so a bomb cannot fill the disk."""
    return max(0, shutil.disk_usage(dest).free - reserve)


class _Budget:
    """Counts the bytes an archive declares for its members (what tarfile and zipfile then write, at most)."""

    def __init__(self, archive: Path, limit: int):
        self.archive, self.limit, self.used = archive, limit, 0

    def take(self, n: int, name: str) -> None:
        self.used += n
        if self.used > self.limit:
            raise ArchiveError(f"{self.archive.name}: refusing to extract more than {self.limit:,} bytes (free disk "
                               f"less 1 GiB, or the limit given); reached at {name!r}")


def extract_zip(archive: Path, dest: Path, limit: int) -> None:
    budget = _Budget(archive, limit)
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            _check_member(info.filename, archive)
            if stat.S_ISLNK(info.external_attr >> 16):
                raise ArchiveError(f"{archive.name}: refusing link member {info.filename!r}")
            budget.take(info.file_size, info.filename)  # zipfile never writes past a member's declared size
        zf.extractall(dest)


def extract_tar(archive: Path, dest: Path, limit: int) -> None:
    """Stream a tar (mode r|, one pass, no index in memory) through tarfile's `data` filter, after our own checks.

    Every link member (symbolic or hard) is refused before the filter sees it: the competition's archives hold
    none, and the filter of the Python versions before 3.11.13 / 3.12.11 let a chain of links write outside
    `dest` (CVE-2025-4517), so no link is ever made. The filter then refuses absolute paths, `..` and device
    files; members are counted against the disk budget before each is written.
    """
    budget = _Budget(archive, limit)

    def refuse_then_data_filter(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo:
        _check_member(member.name, archive)  # the data filter would strip a leading '/', not refuse it
        if member.issym() or member.islnk():
            raise ArchiveError(f"{archive.name}: refusing link member {member.name!r} (-> {member.linkname!r})")
        budget.take(member.size, member.name)
        return tarfile.data_filter(member, path)

    try:
        with tarfile.open(archive, mode="r|*") as tf:
            tf.extractall(dest, filter=refuse_then_data_filter)
    except tarfile.FilterError as e:
        raise ArchiveError(f"{archive.name}: refusing member: {e}") from None


def extract_7z_tar(archive: Path, dest: Path, limit: int) -> None:
    """A .tar.7z: py7zr unpacks the inner tar next to `dest`, which is then streamed and removed.

    The inner tar and its contents are on disk together, so both count against one budget.
    """
    import py7zr

    budget = _Budget(archive, limit)
    tmp = Path(tempfile.mkdtemp(prefix=f".{archive.name}.unpack-", dir=dest))  # a new folder: ours to remove
    try:
        with py7zr.SevenZipFile(archive, mode="r") as z:
            for entry in z.list():
                _check_member(entry.filename, archive)
                if entry.is_symlink or not (entry.is_file or entry.is_directory):  # (a link, junction or socket)
                    raise ArchiveError(f"{archive.name}: refusing link member {entry.filename!r}")
                budget.take(entry.uncompressed, entry.filename)
            z.extractall(path=tmp)
        for inner in sorted(tmp.rglob("*")):
            if inner.is_file():
                if inner.name.endswith(".tar"):
                    extract_tar(inner, dest, limit - budget.used)
                else:
                    target = dest / inner.relative_to(tmp)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(inner, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def whole(archive: Path):
    """A damaged archive (a download cut short, a flipped byte) as one ArchiveError line; the file stays.

    What each reader raises for one, measured on truncated and byte-flipped archives: zipfile BadZipFile (no end
    record, bad CRC), tarfile ReadError ("unexpected end of data"), py7zr Bad7zFile ("next header size exceeds
    the archive size"), lzma's LZMAError ("Corrupt input data"). (tarfile's stream mode does not check the
    gzip CRC: a flipped byte in a .tar.gz goes unnoticed; Kaggle ships .7z and .zip.)"""
    import lzma
    import zlib

    import py7zr.exceptions

    try:
        yield
    except (zipfile.BadZipFile, tarfile.ReadError, tarfile.CompressionError, EOFError, zlib.error, lzma.LZMAError,
            py7zr.exceptions.ArchiveError) as e:
        raise ArchiveError(f"{archive}: damaged archive ({e}); delete it and run the same command to download it "
                           "again") from None


def extract(archive: Path, dest: Path, limit: int | None = None) -> None:
    """Extract safely; `limit` bytes at most (default: the free disk space less 1 GiB)."""
    limit = disk_budget(dest) if limit is None else limit
    name = archive.name
    with whole(archive):
        if name.endswith(".zip"):
            extract_zip(archive, dest, limit)
        elif name.endswith(".tar.7z") or name.endswith(".7z"):
            extract_7z_tar(archive, dest, limit)
        elif name.endswith(".tar") or name.endswith(".tar.gz"):
            extract_tar(archive, dest, limit)
        else:
            raise ArchiveError(f"{name}: unknown archive type")


def _done_marker(dest: Path, archive_name: str) -> Path:
    return dest / DONE_DIR / archive_name


def downloaded(dest: Path, name: str, before: set[str]) -> Path:
    """The file the Kaggle API wrote for `name`, as DEST/NAME. The API names a download after its URL and serves
    large files wrapped in a zip (NAME.zip, kaggle's `_resolve_download_path`): a wrapper is unwrapped here with
    the checks of any archive, and a single new file of another name is taken as NAME."""
    target, wrapper = dest / name, dest / f"{name}.zip"
    if not target.exists() and wrapper.name not in before and wrapper.exists() and not name.endswith(".zip"):
        extract(wrapper, dest)
        wrapper.unlink()  # the API wrote it just now
    if not target.exists():
        new = sorted(set(os.listdir(dest)) - before - {DONE_DIR})
        if len(new) != 1:
            raise KaggleError(f"the Kaggle API reported success but wrote no {name} into {dest} (new there: "
                              f"{', '.join(new) or 'nothing'})")
        (dest / new[0]).rename(target)
    return target


def fetch_and_extract(dest: Path, archive_name: str, fetch: Callable[[], None]) -> bool:
    """Download (unless the archive is already there) and extract one archive; False when already done."""
    marker = _done_marker(dest, archive_name)
    if marker.exists():
        log.info("%s: already downloaded and extracted, skipping", archive_name)
        return False
    archive = dest / archive_name
    ours = _done_marker(dest, f"{archive_name}.downloaded")  # the archive is one that download wrote
    if not archive.exists():
        log.info("downloading %s", archive_name)
        before = set(os.listdir(dest))
        fetch()
        downloaded(dest, archive_name, before)
        ours.parent.mkdir(parents=True, exist_ok=True)
        ours.touch()
    log.info("extracting %s", archive_name)
    extract(archive, dest)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    if ours.exists():  # the extracted files are what the data layer reads; the archive only costs disk
        archive.unlink()
        ours.unlink()
    else:
        log.info("%s: extracted, and kept: it was there before, not downloaded by planet-batch", archive_name)
    return True


def download(dest: Path | str, competition: str | None = None, dataset: str | None = None,
             api_factory: Callable | None = None) -> Path:
    """`planet-batch download`: the competition's files (default) or a Kaggle dataset, extracted in place."""
    dest = Path(dest)
    check_credentials()
    dest.mkdir(parents=True, exist_ok=True)
    api = (api_factory or kaggle_api)()
    if dataset:
        archive = f"{dataset.split('/')[-1]}.zip"
        fetch_and_extract(dest, archive, lambda: api.dataset_download_files(dataset, path=str(dest), quiet=True,
                                                                           unzip=False))
    else:
        competition = competition or COMPETITION
        for name in COMPETITION_FILES:
            fetch_and_extract(dest, name, lambda n=name: api.competition_download_file(
                competition, n, path=str(dest), quiet=True))
    return dest


def submit(file: Path | str, message: str, competition: str = COMPETITION, sample: Path | str | None = None,
           api_factory: Callable | None = None) -> None:
    """`planet-batch submit`: check-submission first, then upload through the Kaggle API."""
    from planet_batch.data.submission import check_submission

    problems = check_submission(file, sample)
    if problems:
        raise KaggleError(f"not submitting {file}: " + "; ".join(problems))
    check_credentials()
    (api_factory or kaggle_api)().competition_submit(str(file), message, competition, quiet=True)
    log.info("submitted %s to %s", file, competition)
