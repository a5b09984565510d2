"""Fed-SB uploads in the delta parser: ``<module>.lora_R.weight`` alone, square; anything else refused clearly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from chorus_mq.adapters import load_adapter
from chorus_mq.adapters.delta import DeltaFile
from chorus_mq.adapters.index import build_index
from chorus_mq.errors import IncompatibleDelta, InvalidAdapter
from chorus_mq.workers.frozen import check_upload_kind

torch.set_num_threads(1)
M = "base_model.model.layer.q"
CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q"], "task_type": "CAUSAL_LM"}


def _dir(tmp_path, tensors):
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps(CONFIG))
    return tmp_path


def test_an_r_upload_is_parsed_and_indexed_as_r(tmp_path):
    r = torch.randn(4, 4)
    adapter = load_adapter(_dir(tmp_path, {f"{M}.lora_R.weight": r}))
    assert set(adapter.tensors) == {f"{M}.lora_R.weight"} and torch.equal(adapter.tensors[f"{M}.lora_R.weight"], r)
    from chorus_mq.adapters import write_delta

    path = tmp_path / "delta.safetensors"
    write_delta(adapter, path)
    with DeltaFile.open(path, max_header_bytes=1 << 20) as delta:
        assert delta.structure.sandwich == {M}
        index = build_index(delta)
    entry = index.modules[M]
    assert entry.a == entry.b and entry.rank == 4 and entry.a.shape == (4, 4)
    assert abs(entry.norm - 2.0 * float(torch.linalg.vector_norm(r.double()))) < 1e-9  # |s| ||R||, s = 8 / 4


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({f"{M}.lora_R.weight": torch.zeros(4, 4), f"{M}.lora_A.weight": torch.zeros(4, 8)}, "has lora_R and lora_A"),
        ({f"{M}.lora_R.weight": torch.zeros(4, 3)}, r"lora_R has shape \[4, 3\]; it is square"),
        (
            {
                f"{M}.lora_R.weight": torch.zeros(4, 4),
                "base_model.model.layer.k.lora_A.weight": torch.zeros(4, 8),
                "base_model.model.layer.k.lora_B.weight": torch.zeros(8, 4),
            },
            "mixes lora_R modules with lora_A/lora_B ones",
        ),
    ],
)
def test_malformed_r_uploads_are_refused(tmp_path, tensors, message):
    with pytest.raises(InvalidAdapter, match=message):
        load_adapter(_dir(tmp_path, tensors))


def test_the_upload_kind_must_match_the_strategy():
    check_upload_kind("fed-sb", frozenset({M}), 1)
    check_upload_kind("ffa-lora", frozenset(), 1)
    with pytest.raises(IncompatibleDelta, match="this fed-sb federation trains lora_R only"):
        check_upload_kind("fed-sb", frozenset(), 1)
    with pytest.raises(IncompatibleDelta, match=r"lora_R \(module .*\) is Fed-SB's; this federation uses fedex-lora"):
        check_upload_kind("fedex-lora", frozenset({M}), 1)
