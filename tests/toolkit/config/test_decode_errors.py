"""A user file that is not UTF-8 is reported with its name, the bad byte, its offset and line — never a bare
`'utf-8' codec can't decode byte ...`: YAML configs (and their `base:` parents), JSONL/JSON prompt data and the
modality data loaders. Malformed JSON lines name the file and the line.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

from modalities.diffusion_lm.text_data import read_corpus
from modalities.text_agent.qa_data import read_rows
from toolkit.cli import main
from toolkit.config import ConfigError, load_config
from toolkit.config.types import read_text_file
from toolkit.data import PromptDataset, load_records

LATIN1 = "prompt: café\n".encode("latin-1")  # é is 0xe9 in Latin-1, not a UTF-8 sequence


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def assert_names_the_file(message: str, path: Path, byte: int, offset: int, line: int) -> None:
    assert path.name in message, message
    assert "is not valid UTF-8" in message, message
    assert f"byte 0x{byte:02x} at offset {offset}, line {line}" in message, message
    assert "codec can't decode" not in message, message


def test_read_text_file_names_file_byte_offset_and_line(tmp_path: Path) -> None:
    file = write(tmp_path / "notes.txt", b"ok\nok\n\xffbad\n")
    with pytest.raises(ValueError) as raised:
        read_text_file(file)
    assert_names_the_file(str(raised.value), file, 0xFF, 6, 3)
    assert isinstance(raised.value.__cause__, UnicodeDecodeError)  # the original error stays chained


def test_read_text_file_hints_at_utf16(tmp_path: Path) -> None:
    file = write(tmp_path / "utf16.yaml", "trainer: {}\n".encode("utf-16"))
    with pytest.raises(ValueError, match="UTF-16 byte-order mark"):
        read_text_file(file, name="shown/name.yaml")
    with pytest.raises(ValueError, match=re.escape("shown/name.yaml is not valid UTF-8")):
        read_text_file(file, name="shown/name.yaml")


def test_non_utf8_config_names_the_file(tmp_path: Path) -> None:
    config = write(tmp_path / "bad.yaml", b"trainer:\n  lr: 1.0e-3  # caf\xe9\n")
    with pytest.raises(ConfigError) as raised:
        load_config(config)
    assert_names_the_file(str(raised.value), config, 0xE9, 28, 2)


def test_non_utf8_base_parent_names_the_parent_and_the_child(tmp_path: Path) -> None:
    parent = write(tmp_path / "parent.yaml", b"# parent\n" + LATIN1)
    child = write(tmp_path / "child.yaml", b"# child\nbase: parent.yaml\ntrainer:\n  lr: 1.0e-3\n")
    with pytest.raises(ConfigError) as raised:
        load_config(child)
    message = str(raised.value)
    assert_names_the_file(message, parent, 0xE9, 9 + LATIN1.index(b"\xe9"), 2)
    assert "child.yaml:2" in message, message  # the line that included the parent


def test_cli_reports_a_non_utf8_config_by_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write(tmp_path / "run.yaml", LATIN1)
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "run.yaml is not valid UTF-8" in err and "codec can't decode" not in err, err


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_non_utf8_prompt_data_names_the_file(tmp_path: Path, suffix: str) -> None:
    good = b'{"prompt": "a"}\n' if suffix == ".jsonl" else b'[{"prompt": "a"},\n'
    data = write(tmp_path / f"prompts{suffix}", good + b'{"prompt": "caf\xe9"}\n')
    offset = len(good) + len(b'{"prompt": "caf')
    with pytest.raises(ValueError) as raised:
        load_records(data)
    assert_names_the_file(str(raised.value), data, 0xE9, offset, 2)
    with pytest.raises(ValueError, match=re.escape(f"prompts{suffix} is not valid UTF-8")):
        PromptDataset(path=str(data))


def test_malformed_json_line_names_file_and_line(tmp_path: Path) -> None:
    data = write(tmp_path / "prompts.jsonl", b'{"prompt": "a"}\n\n{"prompt": \n')
    with pytest.raises(ValueError, match=r"prompts\.jsonl, line 3: malformed JSON"):
        load_records(data)
    listed = write(tmp_path / "prompts.json", b'[{"prompt": "a"},\n {"prompt" "b"}]\n')
    with pytest.raises(ValueError, match=r"prompts\.json: malformed JSON at line 2"):
        load_records(listed)


def test_modality_loaders_name_the_file(tmp_path: Path) -> None:
    qa = write(tmp_path / "qa.jsonl", b'{"question": "q", "golden_answers": ["caf\xe9"]}\n')
    with pytest.raises(ValueError, match=re.escape("qa.jsonl is not valid UTF-8 (byte 0xe9 at offset")):
        read_rows(qa)
    corpus = write(tmp_path / "corpus.txt", b"one document\ncaf\xe9\n")
    with pytest.raises(ValueError, match=re.escape("corpus.txt is not valid UTF-8 (byte 0xe9 at offset 16, line 2)")):
        read_corpus(corpus)


def cli_error(argv: list[str]) -> None:
    """Run `renorm ARGV`; its one-line error (exit 2) is raised as the ValueError it reports."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    assert code == 2 and "Traceback" not in err.getvalue(), err.getvalue()
    raise ValueError(err.getvalue())


@pytest.mark.parametrize(
    ("name", "reader"),
    [
        ("captions.csv", "t2i_captions"),
        ("unigenbench.csv", "unigenbench"),
        ("predictions.jsonl", "medgrpo_predictions"),
        ("percentiles.json", "percentile_table"),
        ("proteins.fasta", "fasta"),
        ("teacher.yaml", "teacher_config"),
        ("rows.jsonl", "score_input"),
    ],
)
def test_more_user_files_are_named_on_a_decode_error(tmp_path: Path, name: str, reader: str) -> None:
    from modalities.diffusion_lm.protein.fasta import read_fasta
    from modalities.medical_video.percentiles import load_predictions
    from modalities.text_to_image.sampler import read_captions
    from modalities.text_to_image.unigenbench import load_unigenbench_csv
    from toolkit.evaluation import score_file
    from toolkit.reward_transforms.medgrpo import PercentileTable

    file = write(tmp_path / name, b"ok\n\xe9\n")
    call = {
        "t2i_captions": lambda: read_captions(str(file)),
        "unigenbench": lambda: load_unigenbench_csv(file),
        "medgrpo_predictions": lambda: load_predictions(file),
        "percentile_table": lambda: PercentileTable.load(file),
        "fasta": lambda: read_fasta(file),
        "teacher_config": lambda: cli_error(["dlm", "train-teacher", str(tmp_path / "run"), "--config", str(file)]),
        "score_input": lambda: score_file("rewards.text.toy.TargetCharReward", file, None),
    }[reader]
    with pytest.raises(ValueError) as raised:
        call()
    assert_names_the_file(str(raised.value), file, 0xE9, 3, 2)
