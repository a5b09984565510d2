"""PEFT as the oracle: add_weighted_adapter(combination_type="cat") is exact.

In peft 0.21.2 "cat" puts ``weight * scaling`` on each client's A and leaves B alone (so
it does not matter how sqrt(w s) is split), gives the new adapter lora_alpha = r (scaling
1.0) and does not normalise the weights: we pass it our normalised weights.
"""

from __future__ import annotations

import math

import pytest
import torch
from agg_oracle import FREE, adapter_delta, rel, total_delta
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

from chorus_mq.aggregation import ClientUpdate, aggregate_module

# (name, r, lora_alpha, weight): mixed ranks and scalings (rsLoRA merges are off in peft)
CLIENTS = [("c0", 4, 8, 3.0), ("c1", 8, 8, 1.0), ("c2", 6, 24, 2.0)]
WEIGHTS = [w / sum(c[3] for c in CLIENTS) for *_, w in CLIENTS]


def peft_with_clients(model, targets, *, fan_in_fan_out=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for i, (name, r, alpha, _) in enumerate(CLIENTS):
        config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, fan_in_fan_out=fan_in_fan_out)
        if i == 0:
            model = get_peft_model(model, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    for layer in lora_layers(model).values():
        for name, *_ in CLIENTS:
            a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
            a.data = torch.randn(a.shape, generator=gen) / math.sqrt(a.shape[1])
            b.data = torch.randn(b.shape, generator=gen)  # nonzero, unlike PEFT's init
    model.add_weighted_adapter([c[0] for c in CLIENTS], WEIGHTS, "cat", combination_type="cat")
    return model


def lora_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def client_updates(layer):
    return [
        ClientUpdate(
            A=layer.lora_A[name].weight.detach().clone(),
            B=layer.lora_B[name].weight.detach().clone(),
            scaling=layer.scaling[name],
            weight=w,
        )
        for (name, *_, w) in CLIENTS
    ]


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(32, 40)
        self.down = torch.nn.Linear(40, 32)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


@pytest.mark.parametrize("strategy", [str(s) for s in FREE])
def test_linear_layers_match_peft_cat(strategy):
    torch.manual_seed(0)
    model = peft_with_clients(Tiny(), ["up", "down"])
    for name, layer in lora_layers(model).items():
        assert layer.scaling["cat"] == 1.0
        expected = layer.get_delta_weight("cat").detach().double()
        res = aggregate_module(client_updates(layer), strategy)
        if strategy == "fedavg":
            assert rel(total_delta(res), expected) > 0.1, name
        else:
            assert rel(total_delta(res), expected) < 1e-6, name
        if strategy == "stack":  # same factors as peft's cat up to how sqrt(w s) is split
            assert rel(adapter_delta(res), expected) < 1e-6 and res.A.shape == layer.lora_A["cat"].weight.shape


def test_gpt2_conv1d_folds_the_transposed_residual():
    """GPT-2 Conv1D (fan_in_fan_out): global adapter + residual.T in the base == PEFT's exact cat."""
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=16)
    base = GPT2Model(config).eval()
    model = peft_with_clients(base, ["c_attn", "c_proj"], fan_in_fan_out=True)
    ids = torch.randint(0, 64, (2, 7))
    model.set_adapter("cat")
    with torch.no_grad():
        ideal = model(input_ids=ids).last_hidden_state

    layers = lora_layers(model)
    results = {name: aggregate_module(client_updates(layer), "fedex-lora") for name, layer in layers.items()}
    scaling = {res.scaling for res in results.values()}.pop()
    model.add_adapter(
        "global",
        LoraConfig(r=8, lora_alpha=8 * scaling, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
    )
    for name, layer in layers.items():
        res = results[name]
        # PEFT's own Conv1D delta is (B @ A).T: the engine's B @ A layout needs the transpose.
        square = layer.base_layer.weight.shape[0] == layer.base_layer.weight.shape[1]
        if square:
            cat = layer.get_delta_weight("cat").detach().double()
            assert rel(cat, total_delta(res).T) < 1e-6 and rel(cat, total_delta(res)) > 0.5
        layer.lora_A["global"].weight.data = res.A.clone()
        layer.lora_B["global"].weight.data = res.B.clone()
        layer.base_layer.weight.data = res.residual.fold_into(layer.base_layer.weight.data, fan_in_fan_out=True)
    model.set_adapter("global")
    with torch.no_grad():
        ours = model(input_ids=ids).last_hidden_state
    assert torch.allclose(ours, ideal, atol=1e-5, rtol=1e-5)
