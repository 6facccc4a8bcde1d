"""Every shipped run recipe under configs/ trains a step, checkpoints and evaluates, as shipped but tiny.

One parametrized test over every YAML that is a run config (it has a `policy:`; the algorithm presets and the
accelerate files are not). Only key=value overrides change a recipe:
  * hub ids and checkpoint paths -> the tiny models of the same classes that `tests/recipe_models.py` saved in the
    recipe's own format, loaded through the recipe's own `from_pretrained` path (`model_swaps`, `component_swaps`);
  * data paths `data/NAME/FILE` -> tiny files in the layout each recipe reads (`recipe_data`);
  * judge endpoints -> a loopback OpenAI-compatible fake judge, the retriever -> a loopback `renorm serve-retriever`;
  * sizes -> `TRAINER_SHRINK`, `TRAINER_CAPS`, `SHRINK` (batch sizes, lengths, steps, image size).
Then one training step, one checkpoint and one `renorm eval` through the Python API. A recipe this test cannot run
is a failure (new hub ids, data paths or components fail with the key that needs a stand-in).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch

from modalities.text_agent.agent_tiny import shipped_file
from modalities.text_agent.tools.retriever_server import make_server
from modalities.text_agent.tools.search import BM25Search
from tests.modalities.medical_video.test_prepare import upstream_source
from tests.modalities.text_agent.test_prepare import MATH_FIXTURES, UPSTREAM
from tests.modalities.text_agent.test_text_agent_e2e import serve
from tests.recipe_models import GOLD, RecipeModels
from tests.test_tiny_configs import FAST, is_tiny
from toolkit.config import apply_overrides, load_config
from toolkit.evaluation.evaluate import evaluate
from toolkit.io.checkpoint import load_checkpoint
from toolkit.io.logging import read_metrics
from toolkit.io.prepare import prepare_dataset, write_jsonl
from toolkit.reward_transforms.medgrpo import PercentileTable
from toolkit.train.runner import build_trainer, fit

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def is_run_config(path: Path) -> bool:
    """A recipe is a YAML with a `policy:` (after its `base:` parents): presets and accelerate files have none."""
    return "policy" in load_config(path)


RECIPES = sorted(p for p in CONFIGS.rglob("*.yaml") if is_run_config(p))


def recipe_name(path: Path) -> str:
    return str(path.relative_to(CONFIGS))


def test_every_run_config_is_a_recipe_here() -> None:
    """The count is printed; every modality's GPU recipes are among them."""
    names = [recipe_name(p) for p in RECIPES]
    print(f"{len(names)} recipes run end to end: {names}")
    skipped = {recipe_name(p) for p in CONFIGS.rglob("*.yaml")} - set(names)
    assert all(n.startswith(("algorithms/", "accelerate/")) for n in skipped), skipped
    assert len(names) >= 20, names
    gpu = {recipe_name(p).split("/")[0] for p in RECIPES if not is_tiny(p)}
    assert gpu >= {"text_reasoning", "text_agent", "diffusion_lm", "text_to_image", "medical_video"}, gpu


# ---------------------------------------------------------------------------------------------- data


def write_percentiles(out: Path) -> None:
    """A percentile table (`renorm medgrpo fit-percentiles` format) with a row for every task the recipes train on:
    unseen datasets fall back to it (the preparer's fixture predictions cover only some tasks)."""
    quartiles = {"p25": 0.0, "p50": 0.1, "p75": 0.3}
    tasks = {task: quartiles for task in ("tal", "stg", "vs", "rc")}
    out.mkdir(parents=True, exist_ok=True)
    PercentileTable.from_dict({"pairs": {"SynthLap": tasks}, "tasks": tasks}).save(out / "percentile_table.json")


MATH_TESTS = ("math500", "amc23", "aime24", "aime25", "minerva", "olympiadbench")
QA_SETS = ("nq", "hotpotqa", "triviaqa", "popqa", "2wikimultihopqa", "musique", "bamboogle")


def recipe_data(name: str, out: Path) -> None:
    """Write dataset `name` under `out` with `renorm data prepare NAME --out out` run on its upstream-layout fixture
    (tests/data/upstream/NAME), so each recipe reads exactly what the preparer writes.

    Text sets keep the fixture's problems and questions with their gold answers set to `GOLD`, the answer the tiny
    stand-in LM can produce (a fixture's "100" or "\\frac{3}{4}" would leave every group without reward variance).
    MedVidBench's media are generated for its fixture's JSONs (tests/modalities/medical_video/test_prepare.py); the
    percentile table is a hand-made one for the recipe's tasks (its preparer needs SFT predictions).
    """
    if name == "medvidbench":
        (out.parent / "medvidbench-upstream").mkdir(parents=True, exist_ok=True)
        source = upstream_source(out.parent / "medvidbench-upstream")  # the fixture JSONs + generated media
        prepare_dataset(name, out, source=str(source))
    elif name == "medvidbench-percentiles":
        write_percentiles(out)
    else:
        written = prepare_dataset(name, out, source=str(UPSTREAM / MATH_FIXTURES.get(name, name)))
        if name in ("deepscaler", "math", *MATH_TESTS, *QA_SETS):
            for file in written:
                rows = [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines()]
                write_jsonl(file, [with_gold(row) for row in rows])


def with_gold(row: dict[str, Any]) -> dict[str, Any]:
    """A prepared row whose gold answer (in every field a reward reads it from) is `GOLD`."""
    row = dict(row)
    if "golden_answers" in row:
        row["golden_answers"] = [GOLD]
    if "answer" in row:
        row["answer"] = GOLD
    if "solution" in row:
        row["solution"] = f"\\boxed{{{GOLD}}}"
    return row


DATA_PATH = re.compile(r"^data/(?P<name>[^/]+)/(?P<file>.+)$")


class RecipeData:
    """Tiny datasets written on first use under one folder: `path("data/NAME/FILE")` -> the written file."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, recipe_path: str) -> Path:
        match = DATA_PATH.match(recipe_path)
        assert match is not None, recipe_path
        out = self.root / match["name"]
        if not out.exists():
            recipe_data(match["name"], out)
        file = out / match["file"]
        assert file.exists(), f"recipe_data({match['name']!r}) wrote no {match['file']} (a recipe reads {recipe_path})"
        return file


# ---------------------------------------------------------------------------------------------- loopback servers


def judge_reply(messages: list[dict[str, Any]]) -> str:
    """A well-formed answer to each judge prompt the recipes send, told apart by the reply format it asks for."""
    text = "\n".join(str(message.get("content")) for message in messages)
    if "<final_score>" in text:  # PPR principle process judge
        return "Analysis: fine.\nScores: <final_score>1,2</final_score>"
    if "R2:" in text:  # MedGRPO caption rubric
        return "R2: 4\nR3: 3\nR8: 4\nR5: 5\nR4: 3"
    if "Image 1 is better" in text:  # Pref-GRPO pairwise judge
        return "<think>compared</think><answer>Image 1 is better</answer>"
    count = re.search(r"exactly (\d+) elements", text)
    if count is not None:  # UniGenBench testpoint judge
        n = int(count.group(1))
        return f"<analysis>{json.dumps(['ok'] * n)}</analysis><score>{[i % 2 for i in range(n)]}</score>"
    raise ValueError(f"the fake judge does not know this prompt: {text[:300]!r}")


class FakeJudge(BaseHTTPRequestHandler):
    """POST /v1/chat/completions -> {"choices": [{"message": {"content": judge_reply(messages)}}]}; an unknown
    prompt gets HTTP 400, which the client does not retry (the run then stops on the judge's failure rate)."""

    def do_POST(self) -> None:  # noqa: N802 - http.server naming
        request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        try:
            status, reply = 200, {"choices": [{"message": {"content": judge_reply(request["messages"])}}]}
        except ValueError as error:
            status, reply = 400, {"error": {"message": str(error)}}
        body = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence the access log
        pass


@pytest.fixture(scope="module")
def judge_url() -> Iterator[str]:
    for server in serve(ThreadingHTTPServer(("127.0.0.1", 0), FakeJudge)):
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"


@pytest.fixture(scope="module")
def retriever_url() -> Iterator[str]:
    for server in serve(make_server(BM25Search(str(shipped_file("corpus.jsonl")), top_k=1), "127.0.0.1", 0)):
        yield server.url


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> RecipeData:
    return RecipeData(tmp_path_factory.mktemp("recipe_data"))


# ---------------------------------------------------------------------------------------------- overrides


def model_swaps(models: RecipeModels) -> dict[str, str]:
    """Every hub id / checkpoint path a recipe names -> the tiny stand-in of the same class."""
    lm = str(models.causal_lm)
    return {
        "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": lm,
        "nvidia/DLER-R1-1.5B-Research": lm,
        "Qwen/Qwen2.5-Math-7B": lm,
        "Qwen/Qwen2.5-3B-Instruct": lm,
        "Qwen/Qwen2.5-3B": lm,
        "Qwen/Qwen2.5-VL-7B-Instruct": str(models.video_lm),
        "stabilityai/stable-diffusion-3.5-medium": str(models.sd3),
        "black-forest-labs/FLUX.1-dev": str(models.flux),
        "airkingbd/dplm_150m": str(models.esm),
        "checkpoints/mdlm.ckpt": str(models.mdlm),
        "gpt2": str(models.gpt2_tokenizer),
        "HPS_v2.1_compressed.pt": str(models.hps),
        "ViT-H-14-378-quickgelu": f"local-dir:{models.open_clip}",
    }


def component_swaps(models: RecipeModels, judge_url: str, retriever_url: str) -> dict[str, dict[str, Any]]:
    """Arguments set on every node of a component: hub defaults the YAML leaves implicit, and the endpoints."""
    return {
        "rewards.image.pickscore.PickScore": {"model": models.clip_model, "tokenizer": models.clip_model},
        "rewards.image.hps.HPSv2Score": {"model": f"local-dir:{models.open_clip}"},  # its `pretrained` is then unused
        "rewards.judges.client.OpenAIChatClient": {"base_url": judge_url, "use_env_proxy": False, "timeout_s": 10.0},
        "modalities.text_agent.tools.search.RetrieverClient": {"url": retriever_url},
    }


TRAINER_SHRINK = {
    "num_steps": 1,
    "save_every": 1,
    "eval_every": 0,
    "progress": False,
    "num_threads": 1,
    "num_minibatches": 1,
    "gradient_accumulation_steps": 1,
    "num_log_samples": 1,
}
# Batch sizes are capped, not set: the tiny recipes already ship CPU sizes their rewards vary at.
TRAINER_CAPS = {"prompts_per_step": 4, "group_size": 4}
# Sizes per component: batch sizes, lengths, denoising steps, image size, pixels per frame.
SHRINK: dict[str, dict[str, Any]] = {
    "toolkit.train.schedules.Scheduler": {"warmup_steps": 0},  # a warm-up's first step has lr 0: nothing would move
    "modalities.text_agent.policy.CausalLMPolicy": {"micro_batch_size": 8},
    "modalities.text_agent.critic.CausalLMCritic": {},
    "modalities.text_agent.sampler.SingleTurnSampler": {"max_new_tokens": 8, "generation_batch_size": 8},
    "modalities.text_agent.tool_sampler.ToolLoopSampler": {
        "max_new_tokens_per_turn": 4,
        "max_observation_tokens": 16,
        "max_response_tokens": 48,
    },
    "modalities.text_agent.reasoning_eval.ReasoningEvaluator": {"num_samples": 2, "batch_size": 8},
    "modalities.text_agent.qa_data.SearchQADataset": {"max_per_dataset": 2},
    "modalities.text_to_image.policy.FlowMatchingPolicy.from_pretrained": {"max_sequence_length": 8},
    "modalities.text_to_image.sampler.FlowSDESampler": {"num_steps": 3, "height": 32, "width": 32},
    "modalities.text_to_image.unigenbench.UniGenBenchEvaluator": {"num_images": 1},
    "modalities.medical_video.sampler.VideoSampler": {"max_new_tokens": 8, "generation_batch_size": 8},
    "modalities.medical_video.evaluation.MedVidEvaluator": {"batch_size": 8},
    "modalities.diffusion_lm.discriminator.discriminator_from_teacher": {"num_trainable_blocks": 1},  # of 2
    "modalities.diffusion_lm.text_data.TokenDataset": {"seq_len": 16},
    "modalities.diffusion_lm.nfe_table.NFETableEvaluator": {"steps": [2], "num_samples": 2, "evaluator_steps": 1},
    "modalities.diffusion_lm.protein.evaluation.ProteinNFEEvaluator": {"steps": [2], "num_samples": 2},
    "modalities.diffusion_lm.protein.data.ProteinDataset": {"seq_len": 16},
}
EVAL_SHRINK = {"num_prompts": 2, "num_samples": 1, "batch_size": 2}


def leaves(node: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every mapping / list entry under `node`, depth first."""
    items = node.items() if isinstance(node, Mapping) else enumerate(node) if isinstance(node, list) else ()
    for k, value in items:
        dotted = f"{key}.{k}" if key else str(k)
        yield dotted, value
        yield from leaves(value, dotted)


def override(key: str, value: Any) -> str:
    return f"{key}={json.dumps(str(value) if isinstance(value, Path) else value)}"


def recipe_overrides(
    config: Mapping[str, Any],
    swaps: Mapping[str, str],
    components: Mapping[str, Mapping[str, Any]],
    data: RecipeData,
) -> list[str]:
    """key=value overrides: hub ids and checkpoints swapped (`swaps`), `data/NAME/...` files written and pointed
    at, component arguments set, sizes shrunk."""
    out = [override(f"trainer.{k}", v) for k, v in TRAINER_SHRINK.items()]
    trainer = config.get("trainer") or {}
    out += [override(f"trainer.{k}", min(cap, trainer[k])) for k, cap in TRAINER_CAPS.items() if k in trainer]
    out += [override(f"{'' if 'eval' in config else '+'}eval.{k}", v) for k, v in EVAL_SHRINK.items()]
    for key, value in leaves(config):
        if isinstance(value, str) and value in swaps:
            out.append(override(key, swaps[value]))
        elif isinstance(value, str) and DATA_PATH.match(value):
            out.append(override(key, data.path(value)))
        elif isinstance(value, Mapping) and "_component_" in value:
            component = value["_component_"]
            for arg, new in {**SHRINK.get(component, {}), **components.get(component, {})}.items():
                out.append(override(f"{key}.{arg}", new))
    return out


def unswapped(config: Mapping[str, Any]) -> list[str]:
    """Keys still naming recipe data or checkpoint folders (relative `data/...`, `checkpoints/...` paths)."""
    return [k for k, v in leaves(config) if isinstance(v, str) and v.startswith(("data/", "checkpoints/"))]


# ---------------------------------------------------------------------------------------------- the test


@pytest.fixture(autouse=True)
def fresh_accelerator_state() -> Iterator[None]:
    """accelerate keeps one process-wide state and the recipes differ in mixed precision: reset it around each."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def trainable(trainer: Any) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in trainer.policy.module.named_parameters() if p.requires_grad}


@pytest.mark.timeout(180)  # a hung endpoint or loader fails the recipe instead of the suite
@pytest.mark.parametrize("path", RECIPES, ids=recipe_name)
def test_recipe_trains_checkpoints_and_evaluates(
    path: Path,
    tmp_path: Path,
    recipe_models: RecipeModels,
    data: RecipeData,
    judge_url: str,
    retriever_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")  # the fake judge ignores it; the client needs one
    monkeypatch.chdir(tmp_path)  # relative paths a recipe keeps (runs/...) stay in tmp
    # Overrides apply to the resolved config, so a section copied by interpolation (`${data.tokenizer}`) is
    # swapped where it is used too; the run dir is set first, so `${trainer.run_dir}/...` follows it.
    config = load_config(path, [f"trainer.run_dir={tmp_path / 'run'}", *FAST.get(recipe_name(path), [])])
    components = component_swaps(recipe_models, judge_url, retriever_url)
    apply_overrides(config, recipe_overrides(config, model_swaps(recipe_models), components, data))
    assert not unswapped(config), f"{recipe_name(path)} names files with no tiny stand-in: {unswapped(config)}"

    trainer = build_trainer(config)
    before = trainable(trainer)
    last = fit(trainer)
    after = trainable(trainer)
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1]
    assert math.isfinite(records[0]["loss/policy"]) and math.isfinite(records[0]["optim/grad_norm"]), records[0]
    # The stand-ins' rewards vary within a group (tests/recipe_models.py), so a recipe's step has a signal to
    # train on; a shipped tiny recipe may draw a first batch with none (its own test runs two steps).
    signal = records[0].get("advantage/abs_max", 0.0) > 0
    assert signal or is_tiny(path), f"every advantage is zero: {records[0]}"
    assert not signal or any(not torch.equal(before[k], after[k]) for k in before), "the step moved no weight"
    assert last is not None and load_checkpoint(last).step == 1
    if config["trainer"].get("export"):
        assert any((tmp_path / "run" / "export").iterdir()), "trainer.export wrote nothing"

    report = evaluate(config, checkpoint=str(last), output=str(tmp_path / "eval.json"))
    assert report.table().strip()
