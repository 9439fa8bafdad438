"""Where the images are read from, in place: a folder (local or any fsspec URL), CelebA's
folder or zip, or the synthetic face generator. Nothing is copied.

A source lists its images as `Entry`s (a path relative to the source, size, modification time)
and reads one image's bytes by that path. The fetch stage lists and hashes them into the
inventory (dfcvae/inventory.py); the shard stage reads them back, in worker processes or Ray
tasks on other machines. Sources are frozen dataclasses of strings, so they pickle; the open
handles behind them (a zip, a remote filesystem) are made once per process.

Paths are POSIX strings; a local file name that is not valid UTF-8 keeps its bytes as
`os.fsdecode`'s surrogate escapes (`os.fsencode` gives the bytes back). Remote credentials come
from the environment, as fsspec's backends read them (s3fs: AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, or the instance's role).
"""

from __future__ import annotations

import io
import os
import random
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from dfcvae.images import FOLDER_SUFFIXES, NOT_READ, is_metadata, list_folder
from dfcvae.shards.format import DataError

READ_THREADS = 16  # concurrent reads of a remote source: object stores answer each in tens of ms


@dataclass(frozen=True)
class Entry:
    path: str  # relative to the source's root, POSIX separators
    size: int  # bytes
    mtime_ns: int  # modification time, ns since the epoch (a zip member's stored date)


def is_url(location: str) -> bool:
    """An fsspec URL (s3://bucket/prefix, gs://...); a plain path or file:// is local."""
    return "://" in location and not location.startswith("file://")


def filesystem(url: str):
    """fsspec's filesystem for url (fsspec keeps one per process: its instance cache starts again
    in a forked worker); DataError without the scheme's backend."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)[0]
    except ImportError as e:
        raise DataError(f"cannot read {url}: {e}; install the fsspec backend for its scheme (s3fs for s3://).") from e


def strip_scheme(url: str) -> str:
    return url.split("://", 1)[1].rstrip("/")


@dataclass(frozen=True)
class FolderSource:
    """Every image file under root: a local folder or an fsspec URL."""

    root: str

    def list(self) -> tuple[list[Entry], list[tuple[str, str]], int]:
        """(images sorted by path, [(path, why skipped)], symbolic links followed).
        DataError when root is not there."""
        if is_url(self.root):
            return self._list_url()
        root = Path(self.root.removeprefix("file://"))
        if not root.is_dir():
            raise DataError(f"data.folder_dir={self.root!r} is not a folder: set it to the folder of your images.")
        listing = list_folder(root)
        entries = []
        for path in listing.images:
            stat = path.stat()
            entries.append(Entry(path.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns))
        skipped = [(p.relative_to(root).as_posix(), why) for p, why in listing.skipped]
        return entries, skipped, listing.links_followed

    def _list_url(self) -> tuple[list[Entry], list[tuple[str, str]], int]:
        fs, base = filesystem(self.root), strip_scheme(self.root)
        fs.invalidate_cache(base)  # list the bucket as it is now, not as this process last saw it
        try:
            found = fs.find(base, detail=True)
        except (FileNotFoundError, PermissionError, OSError) as e:
            raise DataError(
                f"cannot list data.folder_dir={self.root} ({type(e).__name__}: {e}): "
                "check the URL and the credentials in the environment."
            ) from e
        entries, skipped = [], []
        for key, info in sorted(found.items()):
            rel = key[len(base) + 1 :]
            suffix = PurePosixPath(rel).suffix.lower()
            if is_metadata(PurePosixPath(rel)):
                skipped.append((rel, "a hidden or macOS metadata file"))
            elif suffix not in FOLDER_SUFFIXES:
                skipped.append((rel, NOT_READ.get(suffix, f"not an image type read here ({suffix or 'no suffix'})")))
            else:
                entries.append(Entry(rel, int(info["size"]), _mtime_ns(info)))
        if not entries and not skipped:
            raise DataError(
                f"data.folder_dir={self.root} lists no files: check the URL and the credentials in the environment."
            )
        return entries, skipped, 0

    def location(self, path: str) -> str:
        return f"{self.root.rstrip('/')}/{path}"

    def read(self, path: str) -> bytes:
        """The file's bytes; FileNotFoundError when it is gone."""
        if is_url(self.root):
            return filesystem(self.root).cat_file(f"{strip_scheme(self.root)}/{path}")
        with open(os.path.join(self.root.removeprefix("file://"), path), "rb") as f:
            return f.read()


def _mtime_ns(info: dict) -> int:
    """A remote object's modification time (S3's LastModified, or mtime/created) in ns; 0 if none."""
    value = info.get("LastModified") or info.get("mtime") or info.get("created")
    if value is None:
        return 0
    if isinstance(value, str):  # ISO 8601, as some backends give it
        from datetime import datetime

        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if hasattr(value, "timestamp"):
        return int(value.timestamp() * 1e9)
    return int(float(value) * 1e9)


@dataclass(frozen=True)
class CelebaSource:
    """CelebA's aligned images: a folder of NNNNNN.jpg, or img_align_celeba.zip read member by member."""

    images: str  # the folder, or the zip

    @property
    def zipped(self) -> bool:
        return self.images.lower().endswith(".zip")

    def members(self) -> dict[str, zipfile.ZipInfo | None]:
        """file name (NNNNNN.jpg) -> its zip member, or None in a folder. OSError when the folder
        or zip is not there; zipfile.BadZipFile for a zip that is not one."""
        if not self.zipped:
            return dict.fromkeys(os.listdir(self.images))
        infos = _zip(self.images).infolist()
        return {Path(i.filename).name: i for i in infos if i.filename.lower().endswith(".jpg")}

    def list(self, names: list[str]) -> list[Entry]:
        """An Entry for each of names, as the folder or the zip's central directory gives it;
        KeyError for a name that is not there."""
        members = self.members()
        entries = []
        for name in names:
            info = members[name]
            if info is None:
                stat = os.stat(os.path.join(self.images, name))
                entries.append(Entry(name, stat.st_size, stat.st_mtime_ns))
            else:
                entries.append(Entry(info.filename, info.file_size, _zip_time_ns(info)))
        return entries

    def location(self, path: str) -> str:
        return f"{self.images}:{path}" if self.zipped else f"{self.images}/{path}"

    def read(self, path: str) -> bytes:
        """The image's bytes; FileNotFoundError when it (or the folder or zip) is gone, DataError
        for a member the zip cannot give back."""
        if not self.zipped:
            with open(os.path.join(self.images, path), "rb") as f:
                return f.read()
        try:
            return _zip(self.images).read(path)
        except KeyError:
            raise FileNotFoundError(f"{self.images} has no member {path}") from None
        except (zipfile.BadZipFile, EOFError, zlib.error) as err:
            raise DataError(
                f"{self.images}: member {path} cannot be read ({err}); the zip is damaged: replace it."
            ) from None


_ZIPS: dict[tuple[str, int, int, int], zipfile.ZipFile] = {}


def _zip(path: str) -> zipfile.ZipFile:
    """One open ZipFile per process (a forked worker must not share its parent's file offset):
    reading a member then seeks to it, without rereading the central directory."""
    stat = os.stat(path)
    key = (path, os.getpid(), stat.st_mtime_ns, stat.st_size)  # a zip replaced meanwhile is opened anew
    if key not in _ZIPS:
        _ZIPS[key] = zipfile.ZipFile(path)
    return _ZIPS[key]


def _zip_time_ns(info: zipfile.ZipInfo) -> int:
    import calendar

    return calendar.timegm((*info.date_time, 0, 0, 0)) * 10**9


@dataclass(frozen=True)
class SyntheticSource:
    """The synthetic faces (dfcvae.synthetic), drawn when read: path NNNNNN.jpg is face NNNNNN of data.seed."""

    seed: int

    def location(self, path: str) -> str:
        return f"synthetic face {path} (data.seed={self.seed})"

    def read(self, path: str) -> bytes:
        """The face as JPEG bytes (quality 92), as an image file of CelebA's would be."""
        from dfcvae.synthetic import draw_face

        image, _ = draw_face(face_rng(self.seed, int(PurePosixPath(path).stem)))
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=92)
        return out.getvalue()


def face_rng(seed: int, index: int) -> random.Random:
    """The generator that draws synthetic face `index` (1-based) of data.seed: its attributes first."""
    return random.Random(f"synthetic:{seed}:{index}")


ImageSource = FolderSource | CelebaSource | SyntheticSource


def read_many(source: ImageSource, paths: list[str]) -> Iterator[bytes | BaseException]:
    """Each path's bytes in order, or the exception reading it raised; READ_THREADS at a time
    (a remote source), or one after another (local files, where the disk is the limit)."""
    if not isinstance(source, FolderSource) or not is_url(source.root):
        for path in paths:
            try:
                yield source.read(path)
            except Exception as e:  # the caller says what it means for this path
                yield e
        return
    from concurrent.futures import ThreadPoolExecutor

    def read(path: str) -> bytes | BaseException:
        try:
            return source.read(path)
        except Exception as e:
            return e

    with ThreadPoolExecutor(READ_THREADS) as pool:
        for start in range(0, len(paths), 1024):  # bounded: never a future per image of a huge corpus
            yield from pool.map(read, paths[start : start + 1024])


SOURCE_KINDS = {"folder": FolderSource, "celeba": CelebaSource, "synthetic": SyntheticSource}


def source_record(source: ImageSource) -> dict:
    """What dataset.json keeps of a source, so that shard reads the images fetch inventoried."""
    kind = next(k for k, cls in SOURCE_KINDS.items() if isinstance(source, cls))
    return {"kind": kind, **{f: getattr(source, f) for f in source.__dataclass_fields__}}


def source_from_record(record: dict) -> ImageSource:
    """The source a dataset.json's `read_from` names; KeyError for a kind this version lacks."""
    fields = {k: v for k, v in record.items() if k != "kind"}
    return SOURCE_KINDS[record["kind"]](**fields)


def resolved(source: ImageSource) -> ImageSource:
    """The source with a local path made absolute, so that worker processes (and Ray tasks,
    which need not share this process's working folder) read the same files."""
    if isinstance(source, FolderSource) and not is_url(source.root):
        return FolderSource(str(Path(source.root.removeprefix("file://")).resolve()))
    if isinstance(source, CelebaSource):
        return CelebaSource(str(Path(source.images).resolve()))
    return source
