"""`renorm eval --checkpoint EXPORT`: an export folder loads back into a freshly built policy of the same config
and gives it exactly the weights of the checkpoint it was exported from (shared by the modalities' export tests)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from toolkit.config import instantiate
from toolkit.io.export import is_export_folder, load_export, load_trained_weights


def assert_export_loads_back(config: Mapping[str, Any], checkpoint: Path, out: Path, atol: float = 0.0) -> Any:
    """Load `out` (exported from `checkpoint`) into a new policy; assert its trainable weights equal the checkpoint's.

    Returns the policy that loaded the export. `atol` > 0 for exports cast to another dtype.
    """
    assert is_export_folder(out) and not is_export_folder(checkpoint)
    expected: Any = instantiate(config["policy"], where="policy")
    load_trained_weights(expected, checkpoint)
    policy: Any = instantiate(config["policy"], where="policy")
    load_export(policy, out)
    loaded, wanted = policy.trainable_state_dict(), expected.trainable_state_dict()
    assert loaded.keys() == wanted.keys()
    for name, value in wanted.items():
        torch.testing.assert_close(loaded[name], value, atol=atol, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
    return policy
