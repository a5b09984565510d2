import math
import time

import pytest
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key

from chorus_mq.adapters.spec import LoraSpec, pattern_fit
from chorus_mq.errors import InvalidAdapter

from ._util import P, peft_config, save_peft, tiny_llama

NAMES = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.1.self_attn.q_proj",
    "model.layers.11.self_attn.q_proj",
    "model.layers.0.mlp.up_proj",
    "transformer.h.0.attn.c_attn",
]


def test_round_trip_through_peft_config():
    d = peft_config(
        r=8,
        alpha=16,
        targets=("v_proj", "q_proj"),
        use_rslora=True,
        task_type="CAUSAL_LM",
        base_model_name_or_path="/home/a/llama",
        rank_pattern={"layers.1.self_attn.q_proj": 2},
        alpha_pattern={"up_proj": 3.5},
        modules_to_save=["lm_head"],
        fan_in_fan_out=False,
        lora_dropout=0.05,
        layers_to_transform=None,
    )
    spec = LoraSpec.from_peft_config(d)
    assert spec.target_modules == ("q_proj", "v_proj") and spec.modules_to_save == ("lm_head",)
    assert LoraSpec.from_peft_config(spec.to_peft_config()) == spec
    cfg = LoraConfig(**{k: v for k, v in spec.to_peft_config().items() if k != "peft_type"})
    assert cfg.r == 8 and cfg.rank_pattern == {"layers.1.self_attn.q_proj": 2}


def test_regex_target_modules_kept_as_string():
    spec = LoraSpec.from_peft_config(peft_config() | {"target_modules": r".*\.(q|v)_proj"})
    assert spec.target_modules == r".*\.(q|v)_proj"
    assert spec.targets(P + "model.layers.0.self_attn.q_proj")
    assert not spec.targets(P + "model.layers.0.mlp.up_proj")


@pytest.mark.parametrize(
    "patterns",
    [
        {"layers.1.self_attn.q_proj": 2, "q_proj": 3},
        {"q_proj": 3, "layers.1.self_attn.q_proj": 2},  # first match wins, as in peft
        {"^model.layers.0.self_attn.q_proj": 5},
        {r"layers\.1\d?\.self_attn\.q_proj": 6},
        {"up_proj": 7, "c_attn": 9},
    ],
)
def test_rank_pattern_matches_like_peft(patterns):
    spec = LoraSpec(r=4, lora_alpha=4, rank_pattern=patterns, alpha_pattern=patterns)
    for name in NAMES:
        expected = patterns.get(get_pattern_key(patterns.keys(), name), 4)
        assert spec.rank_for(P + name) == spec.rank_for(name) == expected
        assert spec.scaling(P + name, 2) == expected / 2


@pytest.mark.parametrize(
    "targets", [["q_proj"], ["self_attn.q_proj"], ["c_attn", "up_proj"], ["proj"], "model.*q_proj", r".*\.(up|q)_proj"]
)
def test_targets_match_like_peft(targets):
    spec = LoraSpec(r=4, lora_alpha=4, target_modules=targets)
    cfg = LoraConfig(target_modules=targets)
    for name in NAMES:
        assert spec.targets(P + name) == bool(check_target_module_exists(cfg, name)), name


def test_scaling_rslora_and_patterns():
    spec = LoraSpec(r=16, lora_alpha=32, use_rslora=True, alpha_pattern={"v_proj": 8})
    assert spec.scaling(P + "model.layers.0.self_attn.q_proj") == 32 / 4
    assert spec.scaling(P + "model.layers.0.self_attn.v_proj", 4) == 8 / 2
    assert LoraSpec(r=8, lora_alpha=16).scaling("x.q_proj", 8) == 2.0


def test_scaling_agrees_with_a_real_peft_model(tmp_path):
    save_peft(
        tiny_llama(),
        tmp_path,
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        use_rslora=True,
        rank_pattern={"layers.1.self_attn.q_proj": 2},
        alpha_pattern={"v_proj": 3},
    )
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    from chorus_mq.adapters import load_adapter

    spec = load_adapter(tmp_path).spec
    model = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert len(layers) == 4
    for name, layer in layers.items():
        assert spec.rank_for(name) == layer.r["default"]
        assert math.isclose(spec.scaling(name), layer.scaling["default"])


def test_saves_uses_peft_suffix_rule():
    spec = LoraSpec(r=1, lora_alpha=1, modules_to_save=("lm_head", "score"))
    assert spec.saves(P + "lm_head.weight") and spec.saves(P + "model.score.bias")
    assert not spec.saves(P + "model.norm.weight") and not spec.saves(P + "lm_head")


def test_compatibility_ignores_ranks_alphas_and_paths():
    a = LoraSpec.from_peft_config(peft_config(r=8, alpha=16, base_model_name_or_path="/home/a/models/llama-3/"))
    b = LoraSpec.from_peft_config(
        peft_config(
            r=4, alpha=4, use_rslora=True, targets=("v_proj", "q_proj"), base_model_name_or_path="C:\\models\\llama-3"
        )
    )
    assert a.compatible_with(b) and a.compatible_with(a.replace(base_model=None))
    assert not a.compatible_with(a.replace(base_model="mistral"))
    assert a.incompatibilities(a.replace(target_modules=("q_proj",))) == [
        "target_modules differs: ('q_proj', 'v_proj') vs ('q_proj',)"
    ]
    assert not a.compatible_with(a.replace(task_type="SEQ_CLS"))
    assert not a.compatible_with(a.replace(fan_in_fan_out=True))


def test_pattern_fit():
    assert pattern_fit({"a.x": 4, "a.y": 4, "a.z": 2}) == (4, {r"a\.z": 2})
    assert pattern_fit({"m.a": 2, "m.b": 4}) == (2, {r"m\.b": 4})  # tie: smaller value is the default


@pytest.mark.parametrize("pattern", ["(a+)+$", "(x|y)*z", ".*a.*b", "(?:ab){2,}", "a{1,99}b+"])
def test_catastrophic_patterns_refused(pattern):
    with pytest.raises(InvalidAdapter, match="too complex"):
        LoraSpec(r=1, lora_alpha=1, rank_pattern={pattern: 2})
    with pytest.raises(InvalidAdapter, match="too complex"):
        LoraSpec(r=1, lora_alpha=1, target_modules=pattern + ".*")


def test_allowed_patterns_stay_fast_on_hostile_names():
    spec = LoraSpec(r=1, lora_alpha=1, rank_pattern={"[a.]*x": 2}, target_modules="[a.]*[a.]*x")
    start = time.perf_counter()
    for _ in range(100):
        assert spec.rank_for("a." * 199) == 1 and not spec.targets("a." * 199)
    assert time.perf_counter() - start < 5  # three quantifiers already take ~50 ms a call here


def test_specs_are_hashable_values():
    a = LoraSpec(r=4, lora_alpha=8, rank_pattern={"q_proj": 2}, target_modules=["v_proj", "q_proj"])
    b = LoraSpec(r=4, lora_alpha=8, rank_pattern={"q_proj": 2}, target_modules=("q_proj", "v_proj"))
    assert a == b and len({a, b}) == 1 and a != a.replace(r=8)
