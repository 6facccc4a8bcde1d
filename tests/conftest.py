"""Test-session setup: offline Hugging Face, a modest torch thread count, no hypothesis deadlines, `gpu` skips."""

from __future__ import annotations

import os
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

from tests.wandb_stand_in import fake_wandb  # noqa: E402, F401 - a fixture for every test module

# No per-example deadline: on a loaded 2-core CI machine the first example (imports, warm-up) can take
# seconds, and a timing-flaky failure says nothing about correctness. Speed belongs in bench/.
settings.register_profile("renorm", deadline=None)
settings.load_profile("renorm")

# Tiny models are slower with many threads on a shared 2-core machine (oversubscription), not faster.
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // 2)))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked `gpu` when CUDA is not available."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def recipe_models(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Tiny stand-ins of every hub model the shipped recipes name, saved once per session (tests/recipe_models.py)."""
    from tests.recipe_models import build_recipe_models

    return build_recipe_models(tmp_path_factory.mktemp("recipe_models"))
