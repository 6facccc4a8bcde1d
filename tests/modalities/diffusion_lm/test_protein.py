"""Proteins: tokenizer round-trips, FASTA errors, hand-computed metric oracles, the ESM denoiser adapter, data."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from modalities.diffusion_lm.backbone import DenoiserBackbone
from modalities.diffusion_lm.masked_diffusion import MaskedDiffusionLM
from modalities.diffusion_lm.protein.data import (
    PROTEIN_LIKE_FASTA,
    ProteinDataset,
    encode_rows,
    generate_protein_like,
    load_sequences,
)
from modalities.diffusion_lm.protein.esm_teacher import build_tiny_esm_denoiser, build_tiny_protein_teacher
from modalities.diffusion_lm.protein.fasta import FastaRecord, format_fasta, parse_fasta, read_fasta, write_fasta
from modalities.diffusion_lm.protein.tokenizer import (
    STANDARD_AMINO_ACIDS,
    ProteinVocab,
    build_protein_tokenizer,
    id_mapping,
)
from rewards.protein import metrics as M
from rewards.protein.plddt import ESMFoldPLDDTReward, mean_plddt

TOL = 1e-5
residues = st.text(alphabet=STANDARD_AMINO_ACIDS, min_size=1, max_size=40)

# ---------------------------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("layout", ["compact", "esm"])
@given(sequence=residues)
@settings(max_examples=25, deadline=None)
def test_tokenizer_round_trip(layout: str, sequence: str) -> None:
    vocab = ProteinVocab.from_layout(layout)
    tokenizer = build_protein_tokenizer(layout)  # type: ignore[arg-type]
    ids = vocab.encode(sequence)
    assert tokenizer(sequence).input_ids == ids
    assert ids[0] == vocab.bos_id and ids[-1] == vocab.eos_id and len(ids) == len(sequence) + 2
    assert vocab.decode(ids + [vocab.pad_id] * 3) == sequence
    assert tokenizer.decode(ids, skip_special_tokens=True) == sequence
    assert M.sequence_of(tokenizer.decode(ids + [vocab.pad_id])) == sequence


def test_vocabulary_ids() -> None:
    compact, esm = ProteinVocab.from_layout("compact"), ProteinVocab.from_layout("esm")
    assert (compact.size, compact.mask_id, compact.pad_id, compact.bos_id, compact.eos_id) == (25, 24, 0, 1, 2)
    # The ESM-2 / DPLM vocabulary: <cls>=0 <pad>=1 <eos>=2 <unk>=3 L=4 A=5 ... C=23 X=24 <mask>=32.
    assert (esm.size, esm.mask_id, esm.pad_id, esm.bos_id, esm.eos_id) == (33, 32, 1, 0, 2)
    assert [esm.token_to_id[a] for a in "LAGC"] == [4, 5, 6, 23]
    assert build_protein_tokenizer("esm").mask_token_id == 32
    to_esm, back = id_mapping("compact", "esm"), id_mapping("esm", "compact")
    ids = torch.tensor(compact.encode("MKVWC") + [compact.pad_id, compact.mask_id])
    assert torch.equal(back[to_esm[ids]], ids)
    assert esm.decode(to_esm[ids]) == "MKVWC"
    assert back[esm.token_to_id["B"]] == compact.unk_id


def test_tokenizer_errors_and_invalid_rows() -> None:
    vocab = ProteinVocab.from_layout("compact")
    assert vocab.encode("MXK", add_special_tokens=False) == [14, vocab.unk_id, 12]
    with pytest.raises(ValueError, match=r"'X' at position 1"):
        vocab.encode("MXK", strict=True)
    with pytest.raises(ValueError, match="layout='bpe'"):
        ProteinVocab.from_layout("bpe")
    # A leftover mask inside a generated row is kept visible as X; no eos reads the whole row.
    assert vocab.decode([vocab.bos_id, 14, vocab.mask_id, 12, vocab.eos_id, 4]) == "MXK"
    assert vocab.decode([14, 12, vocab.pad_id, vocab.pad_id]) == "MK"
    with pytest.raises(ValueError, match="outside"):
        vocab.decode([99])


# ------------------------------------------------------------------------------------------------- FASTA


def test_fasta_round_trip(tmp_path: Path) -> None:
    text = ">p1 first protein\nMKV\nLAW\n\n; comment\n>p2\nacde\n"
    records = parse_fasta(text)
    assert records == [FastaRecord("p1", "MKVLAW", "first protein"), FastaRecord("p2", "ACDE", "")]
    path = write_fasta(tmp_path / "out.fasta", records, line_width=4)
    assert path.read_text() == ">p1 first protein\nMKVL\nAW\n>p2\nACDE\n"
    assert read_fasta(path) == records


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("MKV\n>p1\nMKV\n", "line 1: sequence data before the first '>' header"),
        (">\nMKV\n", "line 1: empty FASTA header"),
        (">p1\nMKV\n>p2\n", r"record 'p2' \(line 3\): empty sequence"),
        (">p1\nMKV\n>p2\nMKBV\n", "record 'p2': residue 'B' at position 3"),
        (">p1\nMKV\n>p1\nMKV\n", "duplicate record id 'p1'"),
    ],
)
def test_fasta_errors_name_the_record(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "bad.fasta"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        read_fasta(path)


def test_fasta_missing_file_and_bad_ids(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_fasta(tmp_path / "nope.fasta")
    with pytest.raises(ValueError, match="whitespace"):
        format_fasta([("a b", "MKV")])
    assert read_fasta(_write(tmp_path, ">p\nMKBV\n"), alphabet=None)[0].sequence == "MKBV"
    with pytest.raises(ValueError, match="length 3 outside"):
        read_fasta(_write(tmp_path, ">p\nMKV\n"), min_length=4)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "x.fasta"
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------------------------- metrics


def test_composition_oracles() -> None:
    residue = M.amino_acid_composition(["AAC", "C"], alphabet="AC", pooling="residue")
    sequence = M.amino_acid_composition(["AAC", "C"], alphabet="AC", pooling="sequence")
    assert torch.allclose(residue, torch.tensor([0.5, 0.5], dtype=torch.float64), atol=TOL)
    assert torch.allclose(sequence, torch.tensor([1 / 3, 2 / 3], dtype=torch.float64), atol=TOL)
    with pytest.raises(ValueError, match="pooling='mean'"):
        M.amino_acid_composition(["A"], pooling="mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no residue"):
        M.amino_acid_composition(["XX"])


def test_divergence_oracles() -> None:
    p, q = torch.tensor([0.5, 0.5]), torch.tensor([0.9, 0.1])
    assert abs(float(M.composition_divergence(p, q, kind="js", units="nats")) - 0.101749) < TOL
    assert abs(float(M.composition_divergence(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))) - math.log(2)) < TOL
    kl = M.composition_divergence(p, torch.tensor([0.25, 0.75]), kind="kl", units="nats", smoothing=0.0)
    assert abs(float(kl) - 0.143841) < TOL
    js_bits = M.composition_divergence(torch.tensor([1.0, 0.0]), p, kind="js", units="bits")
    assert abs(float(js_bits) - 0.311278) < TOL
    assert torch.isfinite(M.composition_divergence(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), kind="kl"))


@given(st.lists(st.floats(0.0, 1.0), min_size=20, max_size=20), st.lists(st.floats(0.0, 1.0), min_size=20, max_size=20))
@settings(max_examples=40, deadline=None)
def test_js_properties(a: list[float], b: list[float]) -> None:
    p, q = torch.tensor(a, dtype=torch.float64) + 1e-3, torch.tensor(b, dtype=torch.float64) + 1e-3
    p, q = p / p.sum(), q / q.sum()
    js = float(M.js_divergence(p, q))
    assert 0.0 <= js <= math.log(2) + 1e-12
    assert abs(js - float(M.js_divergence(q, p))) < 1e-12
    assert float(M.js_divergence(p, p)) < 1e-12


@given(st.lists(st.text(alphabet=STANDARD_AMINO_ACIDS + "XB", max_size=30), min_size=1, max_size=6))
@settings(max_examples=30, deadline=None)
def test_counts_match_a_loop(sequences: list[str]) -> None:
    counts = M.amino_acid_counts(sequences)
    for row, sequence in enumerate(sequences):
        counter = Counter(c for c in sequence if c in STANDARD_AMINO_ACIDS)
        assert counts[row].tolist() == [counter[a] for a in STANDARD_AMINO_ACIDS]


def test_sequence_metric_oracles() -> None:
    assert M.shannon_entropy_bits("AABB") == 1.0 and M.shannon_entropy_bits("ACDE") == 2.0
    # windows of 4: AAAA, AAAA (0 bits), AAAC (0.811) are low; AACD (exactly 1.5) is not -> positions 0-5 of 9.
    assert abs(M.low_complexity_fraction("AAAAACDEF", window=4, threshold=1.5) - 6 / 9) < TOL
    assert M.low_complexity_fraction("ACDE", window=12, threshold=2.2) == 1.0  # one short window, 2 bits
    assert math.isnan(M.low_complexity_fraction(""))
    assert abs(M.repeat_fraction("ACACAC", k=2) - 0.6) < TOL  # AC CA AC CA AC: 2 distinct of 5
    assert M.repeat_fraction("AC", k=3) == 0.0
    assert M.pairwise_identity("ACDE", "ACDF") == 0.75 and M.pairwise_identity("ACD", "ACDEF") == 0.6
    assert abs(M.mean_pairwise_identity(["AAAA", "AAAC", "CCCC"]) - 1 / 3) < TOL  # 0.75, 0, 0.25
    assert math.isnan(M.mean_pairwise_identity(["A"]))
    assert abs(M.distinct_kmer_fraction(["ACAC", "ACG"], k=2) - 0.6) < TOL  # AC CA AC AC CG: 3 of 5
    assert M.is_valid_sequence("MKV") and not M.is_valid_sequence("MXV") and not M.is_valid_sequence("")
    assert not M.is_valid_sequence("MKV", max_length=2)
    assert M.validity_rate(["MKV", "MXV", "A", ""]) == 0.5


def test_sequence_of_cleans_decoded_text() -> None:
    assert M.sequence_of("<bos>MKV<eos><pad><pad>") == "MKV"
    assert M.sequence_of("<cls>MK<mask>V") == "MKXV"
    assert M.sequence_of("<pad>MK<pad>V<pad> <pad>") == "XMKXV"  # interior pads are not silently dropped
    assert M.sequence_of({"text": "m k v", "tokens": [1, 2]}) == "MKV"
    with pytest.raises(ValueError, match="'sequence' or 'text'"):
        M.sequence_of({"tokens": [1]})


def test_metrics_reward_oracle() -> None:
    reward = M.ProteinMetricsReward(reference_sequences=["AC"], repeat_coef=0.5)
    out = reward(["", "", ""], ["AA", {"text": "<bos><mask><eos>"}, "ACAC"])
    # "AA": JS([1,0], [.5,.5]) = 0.311278 bits; repeat 0 (no 3-mer in 2 residues). Score 1 - 0.311278.
    assert torch.allclose(out.components["composition_js"], torch.tensor([0.311278, 1.0, 0.0]), atol=TOL)
    assert out.components["valid"].tolist() == [1.0, 0.0, 1.0]
    # "ACAC": 3-mers ACA CAC, no repeat, JS 0 -> 1. The masked row: invalid (0), worst JS (1) and repeat (1).
    assert torch.allclose(out.scores, torch.tensor([0.688722, 0.0 - 1.0 - 0.5 * 1.0, 1.0]), atol=TOL)
    assert out.metrics["validity"] == pytest.approx(2 / 3)
    assert set(out.metrics) >= {"mean_pairwise_identity", "distinct_3mer", "pooled_composition_js", "mean_length"}
    default = M.ProteinMetricsReward()
    assert abs(
        float(default.reference.sum()) - 1.0
    ) < 1e-12 and default.reference.argmax() == "ACDEFGHIKLMNPQRSTVWY".index("L")
    with pytest.raises(ValueError, match="at most one"):
        M.ProteinMetricsReward(reference_sequences=["A"], reference_composition={"A": 1.0})


def test_mean_plddt_and_gpu_error() -> None:
    plddt = torch.zeros(2, 2, 37)
    mask = torch.zeros(2, 2, 37)
    plddt[0, 0, :2], mask[0, 0, :2] = torch.tensor([0.8, 0.6]), 1.0
    plddt[0, 1, 0], mask[0, 1, 0] = 0.4, 1.0
    plddt[0, 1, 5] = 0.99  # an atom that does not exist: ignored
    out = mean_plddt(plddt, mask)
    assert abs(float(out[0]) - 60.0) < 1e-4 and math.isnan(float(out[1]))
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        ESMFoldPLDDTReward(device="cpu")(["p"], ["MKV"])


# -------------------------------------------------------------------------------------------------- data


def test_shipped_set_is_the_documented_process() -> None:
    assert PROTEIN_LIKE_FASTA.read_text() == format_fasta(generate_protein_like())
    sequences = load_sequences()
    assert len(sequences) == 120 and all(20 <= len(s) <= 44 and s[0] == "M" for s in sequences)
    composition = M.amino_acid_composition(sequences)
    assert float(M.composition_divergence(composition, torch.full((20,), 0.05))) > 0.02  # clearly not uniform


def test_rows_and_packings() -> None:
    vocab = ProteinVocab.from_layout("compact")
    rows = encode_rows(["MKV", "ACDEFGHIK"], vocab, seq_len=6, packing="pad")
    assert rows[0] == [1, 14, 12, 21, 2, 0]
    assert rows[1][0] == vocab.bos_id and vocab.eos_id not in rows[1] and vocab.decode(rows[1]) == "ACDEF"
    wrap = encode_rows(["MKV", "ACDE"], vocab, seq_len=4, packing="wrap")
    assert wrap == [[1, 14, 12, 21], [2, 1, 4, 5]]
    assert encode_rows(["MKV", "ACDEFG"], vocab, seq_len=4, packing="crop") == [vocab.encode("ACDE", False)]
    with pytest.raises(ValueError, match="packing='stack'"):
        encode_rows(["MKV"], vocab, 6, packing="stack")  # type: ignore[arg-type]


def test_dataset_resumes_exactly() -> None:
    data = ProteinDataset(seq_len=48, layout="esm")
    assert len(data) == 108 and len(ProteinDataset(split="valid")) == 12
    data.next_batch(5)
    state = data.state_dict()
    expected = data.next_batch(7)
    again = ProteinDataset(seq_len=48, layout="esm")
    again.load_state_dict(state)
    assert again.next_batch(7) == expected
    assert all(len(row["input_ids"]) == 48 and row["input_ids"][0] == 0 for row in expected)


# ------------------------------------------------------------------------------------------- ESM adapter


@pytest.mark.parametrize("positions", ["rotary", "absolute"])
def test_esm_denoiser_implements_the_protocol(positions: str) -> None:
    model = build_tiny_esm_denoiser(position_embedding_type=positions)  # type: ignore[arg-type]
    assert isinstance(model, DenoiserBackbone)
    assert (model.vocab_size, model.mask_id, model.hidden_size, len(model.blocks)) == (33, 32, 32, 2)
    tokens = torch.randint(4, 24, (3, 12), generator=torch.Generator().manual_seed(0))
    tokens[0, 2:5] = model.mask_id
    tokens[1, -3:] = 1  # padding (absolute positions skip it, as in ESM)
    tokens[2] = model.mask_id
    sigma = torch.zeros(3)
    logits = model(tokens, sigma)
    assert logits.shape == (3, 12, 33) and logits.dtype == torch.float32 and torch.isfinite(logits).all()
    stock = model(input_ids=tokens).logits  # transformers' own path (NaN on the all-mask row: 0/0 scale)
    assert torch.allclose(logits[:2], stock[:2], atol=1e-5)
    soft = F.one_hot(tokens, 33).float() * 1e9
    assert torch.allclose(model(soft, sigma), logits, atol=1e-5)
    assert model.features(tokens, sigma).shape == (3, 12, 32)


def test_esm_soft_tokens_carry_gradients_and_outputs_can_be_restricted() -> None:
    model = build_tiny_esm_denoiser()
    soft = torch.randn(2, 8, 33, requires_grad=True)
    model(soft, torch.zeros(2)).pow(2).mean().backward()
    assert soft.grad is not None and soft.grad.abs().sum() > 0
    model.restrict_output_tokens("residues")
    probs = model(torch.full((1, 8), 32), torch.zeros(1)).softmax(-1)
    residue_ids = ProteinVocab.from_layout("esm").residue_ids
    assert torch.allclose(probs[..., residue_ids].sum(-1), torch.ones(1, 8), atol=1e-6)
    with pytest.raises(ValueError, match="output_tokens='gaps'"):
        model.restrict_output_tokens("gaps")  # type: ignore[arg-type]


def test_esm_teacher_runs_masked_diffusion() -> None:
    teacher = MaskedDiffusionLM(build_tiny_esm_denoiser(output_tokens="residues"))
    generator = torch.Generator().manual_seed(0)
    x = torch.tensor(ProteinDataset(seq_len=16, layout="esm", packing="crop").next_batch(4)[0]["input_ids"])[None]
    loss = teacher.nelbo(x.repeat(2, 1), generator)
    assert torch.isfinite(loss) and loss > 0
    samples = teacher.sample(3, 16, num_steps=4, generator=generator)
    vocab = ProteinVocab.from_layout("esm")
    assert all(M.is_valid_sequence(s) and len(s) == 16 for s in vocab.decode_batch(samples))


def test_protein_dit_teacher_trains_a_step() -> None:
    from modalities.diffusion_lm.teacher import train_teacher

    teacher = build_tiny_protein_teacher(max_length=48)
    before = [p.detach().clone() for p in teacher.parameters()]
    result = train_teacher(
        teacher, ProteinDataset(seq_len=48), num_steps=2, batch_size=4, warmup_steps=1, progress=False
    )
    assert math.isfinite(result.loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, teacher.parameters(), strict=True))


# ---------------------------------------------------------------------------------------- protein config


def test_protein_tiny_config_trains_a_step(tmp_path: Path) -> None:
    from toolkit.config import load_config
    from toolkit.train.runner import build_trainer

    config = load_config(
        Path(__file__).resolve().parents[3] / "configs" / "diffusion_lm" / "protein_tiny.yaml",
        [f"trainer.run_dir={tmp_path}", "trainer.prompts_per_step=2", "trainer.group_size=2"],
    )
    trainer = build_trainer(config)
    before = [p.detach().clone() for p in trainer.policy.module.parameters()]
    metrics, rollout = trainer.step()
    assert math.isfinite(metrics["loss/policy"]) and len(rollout) == 4
    assert {"reward/discriminator", "reward/protein/valid", "reward/protein/composition_js"} <= set(metrics)
    assert torch.equal(rollout.scores, rollout.rewards["discriminator"])  # protein metrics are logged, not weighted
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.policy.module.parameters(), strict=True))


def test_protein_dplm_recipe_runs_with_a_tiny_esm_stand_in(tmp_path: Path) -> None:
    """The GPU recipe's wiring (ESM teacher, student and discriminator trunk; crop rows) on a tiny random ESM."""
    from toolkit.config import load_config
    from toolkit.train.runner import build_trainer

    config = load_config(
        Path(__file__).resolve().parents[3] / "configs" / "diffusion_lm" / "protein_dplm.yaml",
        [f"trainer.run_dir={tmp_path}", "trainer.prompts_per_step=2", "trainer.group_size=2", "data.seq_len=24"],
    )
    tiny = {"_component_": "modalities.diffusion_lm.protein.esm_teacher.build_tiny_esm_teacher", "seed": 0}
    config["policy"]["student"] = config["policy"]["teacher"] = dict(tiny, output_tokens="residues")
    config["rewards"]["discriminator"]["discriminator"].update(teacher=dict(tiny), num_trainable_blocks=1)
    config["data"]["path"] = None
    config["trainer"]["mixed_precision"] = "no"
    trainer = build_trainer(config)
    metrics, rollout = trainer.step()
    assert math.isfinite(metrics["loss/policy"]) and math.isfinite(metrics["reward/discriminator"])
    assert metrics["reward/protein/valid"] == 1.0  # residue-only outputs: every sample is a valid protein
    assert all(len(M.sequence_of(c)) == 24 for c in rollout.completions)
