"""`renorm data prepare medvidbench | medvidbench-percentiles`: MedVidBench as the MedGRPO recipes read it.

The public release (hub dataset UII-AI/MedVidBench) holds the test questions only: `cleaned_test_data_11_04.json`
(6,245 SFT-format records whose answers and `struc_info` stay on the leaderboard server) and their frames in
`testdata.zip` (~18 GB). The training split with answers is not public (the MedVidU challenge's train/val release
is gated): put its SFT-format JSON (a name holding "train") in a folder and pass that folder as `source`.
The frames or video files the rows name are found in the source folder or its zip files (matched by the longest
unique tail of their path, so a release that roots its paths elsewhere still resolves), linked or extracted under
OUT/media, and the rows rewritten to point there. The percentile table is fitted from SFT-model predictions
(`source` required) with the `renorm medgrpo fit-percentiles` code.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path, PurePosixPath
from typing import Any

from modalities.medical_video.data import record_to_row
from modalities.medical_video.percentiles import fit_from_predictions, load_predictions, save_table
from rewards.video.rl import MedVidReward
from toolkit.data import load_records
from toolkit.io.datasets import is_hub_id
from toolkit.io.prepare import atomic_output, progress_bar

log = logging.getLogger(__name__)
MEDVIDBENCH_HUB = "UII-AI/MedVidBench"
TEST_FILE = "cleaned_test_data_11_04.json"  # the public test questions
MEDIA_DIR = "media"
_SPLIT_SUFFIXES = (".json", ".jsonl")
# A media reference: ("file", path) in the source folder, or ("zip", archive, member name).
Ref = tuple[str, ...]


def prepare_medvidbench(out: Path, *, source: str | None = None, limit: int | None = None) -> list[Path]:
    """MedVidBench (UII-AI/MedVidBench) in the SFT JSON layout: test.json, train.json and the media they name.

    Args:
        out: folder to write `test.json` / `train.json` (JSON lists of SFT records) and `media/` into.
        source: a folder (or hub dataset id) holding `cleaned_test_data_11_04.json` or another file whose name
            holds "test"/"val" (-> test.json), a file whose name holds "train" (-> train.json), and the frames
            or videos the records name (files, or zip archives such as the release's testdata.zip). None
            downloads the public release: the test questions and ~18 GB of frames, no train split.
        limit: keep the first N records of each split; None keeps all.

    Returns:
        The JSON files written, then the media folder.

    Raises:
        FileNotFoundError: no split file in `source`, or a record names a frame/video found nowhere in it.
        ValueError: a malformed record (named with its file and index).
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    folder = source_folder(source)
    splits = {name: file for name, file in split_files(folder).items() if file is not None}
    records = {name: read_split(file, limit) for name, file in splits.items()}
    index = MediaIndex(folder, skip=set(splits.values()))
    staged = stage_media(records, index, Path(out))
    written = []
    for name, rows in records.items():
        with atomic_output(Path(out) / f"{name}.json") as handle:
            json.dump(rows, handle, ensure_ascii=False)
        written.append(Path(out) / f"{name}.json")
    if "train" not in records:
        log.warning("%s has no train split (the public release has none): the recipes' data.paths stays unmet", folder)
    return [*written, *([Path(out) / MEDIA_DIR] if staged else [])]


def prepare_medvidbench_percentiles(out: Path, *, source: str | None = None, limit: int | None = None) -> list[Path]:
    """MedGRPO percentile table (p25/p50/p75 per dataset and task) fitted from SFT-model predictions.

    Args:
        out: folder to write `percentile_table.json` (what LogisticDatasetNorm loads) into.
        source: the predictions file (required: MedGRPO released no table), e.g. MedGRPO-Code's vllm_infer
            results.json ({index: {qa_type, data_source, answer = prediction, gnd, struc_info, ...}}), a JSON
            list or JSONL of {dataset, task, answer, prediction}.
        limit: fit from the first N predictions; None uses all.

    Returns:
        The file written.

    Caption tasks (VS, RC) are scored by MiniLM similarity alone here; the recipes' reward adds the GPT-4.1
    judge, so for a table on that scale run `renorm medgrpo fit-percentiles PRED --judge-url URL --out FILE`.
    """
    if source is None:
        raise ValueError("medvidbench-percentiles needs --source PRED: the SFT model's predictions on the train split")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    records = load_predictions(source)[:limit]
    if any(record["task"] in ("vs", "rc") for record in records):
        log.warning("VS/RC rows are scored by similarity alone (no judge); see the docstring for the judged table")
    table = fit_from_predictions(records, MedVidReward(similarity="minilm"))
    target = Path(out) / "percentile_table.json"
    save_table(table, target)
    return [target]


def source_folder(source: str | None) -> Path:
    """The local folder of `source`: itself, or a download of the hub dataset it names (default: the release)."""
    if source is not None and not is_hub_id(source):
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"source {folder} is not a folder; give the folder holding the MedVidBench files")
        return folder
    import huggingface_hub

    repo = source or MEDVIDBENCH_HUB
    try:
        return Path(huggingface_hub.snapshot_download(repo, repo_type="dataset"))
    except OSError as error:  # offline and not cached, network down, gated or missing repository
        raise FileNotFoundError(
            f"cannot fetch the hub dataset {repo!r} ({type(error).__name__}: {error}); download it elsewhere and "
            "pass its folder as --source"
        ) from error


def split_files(folder: Path) -> dict[str, Path | None]:
    """{"test": file, "train": file} of the JSON/JSONL files directly in `folder` (None where a split has none).

    Raises:
        FileNotFoundError: neither split has a file (naming the names looked for).
        ValueError: several candidates for one split.
    """
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in _SPLIT_SUFFIXES)
    train = [p for p in files if "train" in p.name.lower()]
    test = [p for p in files if p.name == TEST_FILE] or [
        p for p in files if p not in train and ("test" in p.name.lower() or "val" in p.name.lower())
    ]
    for name, found in (("train", train), ("test", test)):
        if len(found) > 1:
            raise ValueError(f"{folder} has several {name} split files {[p.name for p in found]}; keep one")
    if not train and not test:
        raise FileNotFoundError(
            f"{folder} has no MedVidBench split file: expected {TEST_FILE} (or a .json/.jsonl name holding "
            f"'test'/'val') and/or one holding 'train'; found {[p.name for p in files]}"
        )
    return {"test": test[0] if test else None, "train": train[0] if train else None}


def read_split(file: Path, limit: int | None) -> list[dict[str, Any]]:
    """The first `limit` records of a split file, each checked as `MedVidBenchDataset` reads it."""
    records = load_records(file, max_rows=limit)
    for position, record in enumerate(records):
        record_to_row(record, f"{file}, record {position}")
    if not records:
        raise ValueError(f"{file} holds no records")
    return records


class MediaIndex:
    """The files under a folder and inside its zip archives, found by the longest unique tail of a path.

    "frames/AVOS/v1/0001.jpg" finds the archive member "testdata/frames/AVOS/v1/0001.jpg" or the file
    "AVOS/v1/0001.jpg"; a tail shared by two different files finds neither (it would be a guess).
    """

    def __init__(self, folder: Path, skip: set[Path]) -> None:
        self.folder = folder
        self._tails: dict[tuple[str, ...], Ref | None] = {}
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path not in skip and path.suffix != ".zip":
                self._add(path.relative_to(folder).parts, ("file", str(path)))
        for archive in sorted(folder.rglob("*.zip")):
            with zipfile.ZipFile(archive) as zipped:
                for member in zipped.namelist():
                    if not member.endswith("/"):
                        self._add(_safe_parts(member, archive), ("zip", str(archive), member))

    def _add(self, parts: Sequence[str], ref: Ref) -> None:
        for start in range(len(parts)):
            tail = tuple(parts[start:])
            self._tails[tail] = ref if self._tails.get(tail, ref) == ref else None

    def find(self, name: str) -> Ref | None:
        """The reference of `name` (relative or absolute), or None when no single file matches."""
        parts = [part for part in PurePosixPath(name.replace("\\", "/")).parts if part not in ("/", ".")]
        for start in range(len(parts)):
            tail = tuple(parts[start:])
            if tail in self._tails:
                return self._tails[tail]
        return None


def stage_media(records: Mapping[str, list[dict[str, Any]]], index: MediaIndex, out: Path) -> int:
    """Link or extract every frame/video the records name under `out`/media and point the records there.

    Absolute paths that exist are kept as they are. Everything is found before anything is written. Returns the
    number of files staged.

    Raises:
        FileNotFoundError: naming how many named files were found nowhere, and the first few.
    """
    names = sorted({name for rows in records.values() for row in rows for name in _media_names(row["video"])})
    kept = {name for name in names if Path(name).is_absolute() and Path(name).is_file()}
    refs = {name: None if name in kept else index.find(name) for name in names}
    missing = [name for name, ref in refs.items() if ref is None and name not in kept]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of the {len(names)} frames/videos the records name are not in {index.folder} or its zip "
            f"archives (first: {missing[:3]}); put them (e.g. the release's testdata.zip) in the source folder"
        )
    placed = {}
    with ExitStack() as archives, progress_bar("medvidbench media", len(names), unit="files") as advance:
        opened: dict[str, zipfile.ZipFile] = {}
        for name, ref in refs.items():
            if ref is not None:
                placed[name] = _place(ref, index.folder, out / MEDIA_DIR, opened, archives)
            advance(1)
    for rows in records.values():
        for row in rows:
            row["video"] = _renamed(row["video"], placed, out)
    return len(placed)


def _media_names(video: Any) -> Iterator[str]:
    for item in [video] if isinstance(video, str) else video:
        yield str(item).removeprefix("file://")


def _renamed(video: Any, placed: Mapping[str, Path], out: Path) -> Any:
    def one(item: Any) -> str:
        name = str(item).removeprefix("file://")
        return placed[name].relative_to(out).as_posix() if name in placed else name

    return one(video) if isinstance(video, str) else [one(item) for item in video]


def _place(ref: Ref, folder: Path, media: Path, opened: dict[str, zipfile.ZipFile], stack: ExitStack) -> Path:
    """Symlink a source file, or extract an archive member, to its place under `media` (atomically)."""
    if ref[0] == "file":
        source = Path(ref[1])
        target = media / source.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        temp.unlink(missing_ok=True)
        temp.symlink_to(source.resolve())
        os.replace(temp, target)
        return target
    archive, member = ref[1], ref[2]
    if archive not in opened:
        opened[archive] = stack.enter_context(zipfile.ZipFile(archive))
    target = media.joinpath(*_safe_parts(member, Path(archive)))
    with opened[archive].open(member) as stream, atomic_output(target, "wb") as handle:
        shutil.copyfileobj(stream, handle)
    return target


def _safe_parts(member: str, archive: Path) -> tuple[str, ...]:
    """The parts of an archive member's name; one that would escape the output folder is refused."""
    parts = PurePosixPath(member).parts
    if not parts or member.startswith("/") or ".." in parts:
        raise ValueError(f"{archive}: refusing the member {member!r} (an absolute path or '..' would escape)")
    return parts
