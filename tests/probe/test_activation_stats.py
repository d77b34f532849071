"""Activation statistics (probes/activations.py): hooked only for the forward passes of sampled steps, counted per
unit on the device, exactly what the inputs say; evaluation passes left out, micro-batches added up, convolution
channels as units, the record's bounds held at decode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import gradwatch
from gradwatch.spool.records import MAX_UNIT_SHARES, ActivationsRecord, decode, encode


def _activations(home: Path, run: str = "r") -> list[ActivationsRecord]:
    return [r for r in gradwatch.read_run(run, home).rank(0).records if isinstance(r, ActivationsRecord)]


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, micro: int = 1) -> None:
    opt.zero_grad()
    for part in x.chunk(micro):
        model(part).pow(2).mean().backward()
    opt.step()


def _global_hooks() -> int:
    return len(torch.nn.modules.module._global_forward_pre_hooks)


def test_hooked_only_for_the_forward_passes_of_sampled_steps(tmp_path: Path) -> None:
    """Step 1 and every 10th step (the layer samples' cadence) are sampled: the probe's pre-hook is registered
    during their forward passes and not during the others'; no module carries a hook of its own."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    hooked = []
    before = _global_hooks()  # (a probe another test left open may hold one)
    with gradwatch.attach(model, opt, run="r", home=tmp_path, autostart_agent=False, layer_stats_every=10):
        for step in range(1, 31):
            hooked.append((step, _global_hooks() > before))
            # (the root has the probe's data-wait hook)
            assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.children())
            _step(model, opt, torch.randn(16, 4))
    assert [step for step, on in hooked if on] == [1, 10, 20, 30]
    assert _global_hooks() == before  # closed: none left
    assert [r.step for r in _activations(tmp_path)] == [1, 10, 20, 30]


def test_a_copy_made_during_a_sampled_step_pickles_and_is_not_counted(tmp_path: Path) -> None:
    """An EMA copy made before the first step (a sampled one): torch.save of the whole copy works, and the copy's
    forward passes do not count as the model's."""
    import copy

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.attach(model, opt, run="r", home=tmp_path, autostart_agent=False, layer_stats_every=10):
        ema = torch.optim.swa_utils.AveragedModel(model)
        torch.save(copy.deepcopy(model), tmp_path / "model.pt")
        ema(torch.randn(100, 4))  # the copy in training mode, with gradients: not the probe's model
        _step(model, opt, torch.randn(16, 4))
        torch.save(ema, tmp_path / "ema.pt")
    [record] = _activations(tmp_path)
    assert record.samples == [16]


def test_counts_are_what_the_inputs_say(tmp_path: Path) -> None:
    """The ReLU's input is the Linear's output: per unit, the share of samples where it is positive (sorted), its
    mean and its (population) variance, as computed here from the same input."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3), torch.nn.Tanh())
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights stay: the input can be recomputed
    x = torch.randn(64, 4) * 3
    with gradwatch.attach(model, opt, run="r", home=tmp_path, autostart_agent=False, layer_stats_every=10):
        _step(model, opt, x)
    [record] = _activations(tmp_path)
    with torch.no_grad():
        relu_in = model[0](x)
        tanh_in = model[2](model[1](relu_in))
    assert (record.modules, record.kinds, record.feeders, record.units) == (["1", "3"], ["relu", "tanh"], ["0", "2"],
                                                                             [6, 3])
    assert record.samples == [64, 64]
    assert record.shares[0] == pytest.approx(sorted((relu_in > 0).float().mean(0).tolist()))
    assert record.shares[1] == [0.0, 0.0, 0.0]  # no tanh input beyond +-9.4999
    assert record.input_mean[0] == pytest.approx(relu_in.mean().item(), rel=1e-5)
    assert record.input_var == pytest.approx([relu_in.var(unbiased=False).item(),
                                              tanh_in.var(unbiased=False).item()], rel=1e-4)


def test_evaluation_passes_are_left_out_and_micro_batches_add_up(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.attach(model, opt, run="r", home=tmp_path, autostart_agent=False, layer_stats_every=10):
        model.eval()
        with torch.no_grad():
            model(torch.randn(1000, 4))  # an evaluation before the first step: not counted
        model.train()
        _step(model, opt, torch.randn(32, 4), micro=4)  # gradient accumulation: four micro-batches of 8
    [record] = _activations(tmp_path)
    assert record.samples == [32]


def test_a_convolutions_units_are_its_channels_and_wide_layers_keep_256_shares(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(5 * 36, 1000), torch.nn.ReLU(), torch.nn.Linear(1000, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.attach(model, opt, run="r", home=tmp_path, autostart_agent=False, layer_stats_every=10):
        _step(model, opt, torch.randn(2, 3, 8, 8))
    [record] = _activations(tmp_path)
    assert record.units == [5, 1000]
    assert record.samples == [2 * 6 * 6, 2]  # a channel's (sample, position) pairs; a feature's samples
    assert len(record.shares[0]) == 5 and len(record.shares[1]) == MAX_UNIT_SHARES
    assert record.shares[1] == sorted(record.shares[1])


def test_a_sequence_of_channels_after_conv1d_and_of_tokens_after_linear(tmp_path: Path) -> None:
    """A 3-D input is (batch, channels, length) after a Conv1d and (batch, tokens, features) after a Linear."""

    class Both(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.conv_act = torch.nn.Conv1d(3, 4, 3), torch.nn.ReLU()
            self.proj, self.proj_act = torch.nn.Linear(3, 7), torch.nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, 3, 10)
            return self.conv_act(self.conv(x)).mean() + self.proj_act(self.proj(x.transpose(1, 2))).mean()
    model = Both()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.attach(model, opt, run="r", home=tmp_path, autostart_agent=False, layer_stats_every=10):
        _step(model, opt, torch.randn(2, 3, 10))
    [record] = _activations(tmp_path)
    assert dict(zip(record.modules, record.units, strict=True)) == {"conv_act": 4, "proj_act": 7}
    assert dict(zip(record.modules, record.samples, strict=True)) == {"conv_act": 2 * 8, "proj_act": 2 * 10}


def test_functional_activations_are_counted_when_the_script_opts_in(tmp_path: Path) -> None:
    torch.manual_seed(0)
    layer, head = torch.nn.Linear(4, 8), torch.nn.Linear(8, 1)
    model = torch.nn.ModuleDict({"layer": layer, "head": head})
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.attach(model, opt, run="r", home=tmp_path, autostart_agent=False, layer_stats_every=10) as probe:
        for _ in range(3):
            opt.zero_grad()
            h = layer(torch.randn(16, 4))
            probe.watch_activation(h, "layer.act")
            head(torch.nn.functional.relu(h)).pow(2).mean().backward()
            opt.step()
        with pytest.raises(ValueError, match="kind 'softplus' is not one of"):
            probe._activations.arm()  # type: ignore[union-attr]
            probe.watch_activation(h, "x", kind="softplus")
    [record] = _activations(tmp_path)
    assert (record.step, record.modules, record.feeders, record.samples) == (1, ["layer.act"], ["layer"], [16])


def test_a_hostile_activations_line_keeps_what_is_valid() -> None:
    """Shares outside 0..1 or not numbers are dropped, short lists are padded, names bounded: one odd value never
    costs the record."""
    line = {"kind": "activations", "step": 5, "t": 1.0, "seq": 3, "modules": ["a", "b", "c"], "kinds": ["relu"],
            "feeders": "x", "units": [4, -1, True], "samples": [10], "shares": [[0.0, 0.5, 2.0, "x", None], "y"],
            "input_mean": [1.0, "z"], "input_var": [float("nan"), 2.0, 3.0, 4.0]}
    record = decode(json.loads(json.dumps(line)))
    assert isinstance(record, ActivationsRecord)
    assert record.modules == ["a", "b", "c"] and record.kinds == ["relu", "", ""] and record.feeders == ["", "", ""]
    assert record.units == [4, 0, 0] and record.samples == [10, 0, 0]
    assert record.shares == [[0.0, 0.5], [], []]
    assert record.input_mean == [1.0, None, None]
    assert record.input_var[1:] == [2.0, 3.0] and record.input_var[0] != record.input_var[0]  # NaN kept: flagged
    again = decode(json.loads(encode(record)))
    assert again is not None and encode(again) == encode(record)  # what is kept round-trips


def test_an_input_the_counting_cannot_read_costs_the_forward_nothing(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """A nested (jagged) tensor into a ReLU in training mode: the forward pass and the run go on, the probe says
    once that its activation statistics failed, and samples no more activations."""

    class Jagged(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.act = torch.nn.Linear(4, 4), torch.nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc(x)
            nested = torch.nested.nested_tensor([h[:2], h[2:]], layout=torch.jagged)
            return self.act(nested).values().sum() + h.sum()
    model = Jagged()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.attach(model, opt, run="r", home=tmp_path, autostart_agent=False, layer_stats_every=2) as probe:
        for _ in range(6):
            _step(model, opt, torch.randn(5, 4))
    assert probe.internal_errors == 1 and probe.step == 6
    assert [r.getMessage() for r in caplog.records if "activation_stats" in r.getMessage()]
    assert _activations(tmp_path) == []
