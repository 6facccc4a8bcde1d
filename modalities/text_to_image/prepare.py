"""`renorm data prepare` for the text-to-image recipes: Flow-GRPO's PickScore prompts and UniGenBench's prompts.

Both sets live in GitHub repositories, not on the Hugging Face hub. With no `source` the files are fetched at a
pinned commit through `datasets`' download manager (cached; offline mode fetches nothing and says what to pass
instead); `source` names a local copy in the upstream layout (a clone, or the folder holding the files).
Each preparer writes exactly the files its recipe reads; registered under the `renorm.datasets` entry points.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from pathlib import Path

from modalities.text_to_image.unigenbench import load_unigenbench_csv
from toolkit.data import load_records, read_text_file
from toolkit.io.atomic import write_text_atomic

# Pinned upstream commits: the files a recipe was written against (https://github.com/<repo>/tree/<commit>).
PICKSCORE_REPO, PICKSCORE_COMMIT = "yifan123/flow_grpo", "ac4c86e8cae021841f1fde853d340e0db67690dd"
UNIGENBENCH_REPO, UNIGENBENCH_COMMIT = "CodeGoat24/UniGenBench", "49d0bcebb0b9418d975d3957c2fee10f34811d14"
# {file written: its path in the upstream repository}
PICKSCORE_FILES = {"train.txt": "dataset/pickscore/train.txt", "test.txt": "dataset/pickscore/test.txt"}
UNIGENBENCH_FILES = {"train_prompt.txt": "data/train_prompt.txt", "test_prompts_en.csv": "data/test_prompts_en.csv"}


def prepare_pickscore(out: Path, *, source: str | None = None, limit: int | None = None) -> list[Path]:
    """PickScore prompts of Flow-GRPO (Pick-a-Pic v1 captions): train.txt (25,432) and test.txt (2,048).

    Args:
        out: folder to write `train.txt` and `test.txt` into (one caption per line, as flow_grpo reads them).
        source: a clone of yifan123/flow_grpo or its `dataset/pickscore` folder; None fetches both files at
            the pinned commit.
        limit: keep the first N captions of each file; None keeps all.

    Returns:
        The files written.
    """
    files = fetch_upstream(source, PICKSCORE_REPO, PICKSCORE_COMMIT, PICKSCORE_FILES)
    return [write_captions(files[name], Path(out) / name, limit) for name in PICKSCORE_FILES]


def prepare_unigenbench(out: Path, *, source: str | None = None, limit: int | None = None) -> list[Path]:
    """UniGenBench prompts: train_prompt.txt (9,999 training captions) and test_prompts_en.csv (600 test prompts).

    Args:
        out: folder to write `train_prompt.txt` (one caption per line) and `test_prompts_en.csv` (columns
            index, prompt_en, sub_dims_en, as `renorm unigenbench` reads it) into.
        source: a clone of CodeGoat24/UniGenBench or its `data` folder; None fetches both files at the pinned
            commit.
        limit: keep the first N training captions and the first N test prompts; None keeps all.

    Returns:
        The files written.
    """
    files = fetch_upstream(source, UNIGENBENCH_REPO, UNIGENBENCH_COMMIT, UNIGENBENCH_FILES)
    test_csv = files["test_prompts_en.csv"]
    load_unigenbench_csv(test_csv)  # the benchmark layout, checked before anything is written
    captions = write_captions(files["train_prompt.txt"], Path(out) / "train_prompt.txt", limit)
    return [captions, write_csv_rows(test_csv, Path(out) / "test_prompts_en.csv", limit)]


def fetch_upstream(source: str | None, repo: str, commit: str, files: Mapping[str, str]) -> dict[str, Path]:
    """{file name: local path} of the upstream `files` ({name: path in the repo}).

    Raises:
        FileNotFoundError: `source` is not a folder, or lacks a file (named, with the places looked in); or the
            download failed / offline mode is on (naming the URL and what to pass as `source` instead).
    """
    if source is None:
        return _download(repo, commit, files)
    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"source {folder} is not a folder; give a clone of {repo} or the folder with its files")
    found = {}
    for name, repo_path in files.items():
        candidates = [folder / repo_path, folder / Path(repo_path).name]
        hit = next((path for path in candidates if path.is_file()), None)
        if hit is None:
            looked = " or ".join(str(path) for path in dict.fromkeys(candidates))
            raise FileNotFoundError(
                f"source {folder} lacks {name} (the upstream {repo}/{repo_path}); looked for {looked}"
            )
        found[name] = hit
    return found


def _download(repo: str, commit: str, files: Mapping[str, str]) -> dict[str, Path]:
    import datasets

    urls = {name: f"https://raw.githubusercontent.com/{repo}/{commit}/{path}" for name, path in files.items()}
    try:
        paths = datasets.DownloadManager().download(urls)
    except (ConnectionError, OSError) as error:
        raise FileNotFoundError(
            f"could not fetch {', '.join(urls.values())} ({type(error).__name__}: {error}); without network access "
            f"(or with offline mode on) clone https://github.com/{repo} elsewhere and pass its folder as --source"
        ) from error
    return {name: Path(path) for name, path in paths.items()}


def write_captions(source: Path, target: Path, limit: int | None) -> Path:
    """The non-empty stripped lines of `source` (the first `limit`) written atomically to `target`, one per line."""
    _check_limit(limit)
    captions = [line.strip() for line in read_text_file(source).splitlines() if line.strip()][:limit]
    if not captions:
        raise ValueError(f"{source} holds no captions (one per line expected)")
    write_text_atomic(target, "\n".join(captions) + "\n")
    return target


def write_csv_rows(source: Path, target: Path, limit: int | None) -> Path:
    """The header and the first `limit` rows of the CSV `source` written atomically to `target` (cells unchanged)."""
    _check_limit(limit)
    rows = load_records(source, max_rows=limit)
    if not rows:
        raise ValueError(f"{source} has a header but no rows")
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(target, text.getvalue())
    return target


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
