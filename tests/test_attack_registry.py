"""The attack registry: one table for attack names, CLI choices and suite validation."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import robustcaps
from robustcaps.attacks import (
    get_attack,
    list_attacks,
    list_backends,
    native,
    register_attack,
    registry,
)
from robustcaps.cli import cli
from robustcaps.errors import RobustcapsError
from robustcaps.evaluation.config import EvaluationConfig, Targeting, threats
from robustcaps.evaluation.suite import SUITE_KEYS, load_suite
from robustcaps.models.adapter import ModelAdapter


def test_builtin_table():
    assert list_attacks()[:2] == ("fgsm", "bim")
    assert list_backends() == ("native", "torchattacks", "foolbox")
    for name in ("fgsm", "bim"):
        entry = registry.attack_entry(name)
        assert entry.backends == ("native", "torchattacks", "foolbox") and entry.description
    # sweep settings an implementation does not take are dropped, the others kept
    assert get_attack("bim", "torchattacks", steps=3, early_stop=False).steps == 3
    assert get_attack("bim", steps=4, early_stop=False).early_stop is False
    assert set(list_attacks()) >= {"pgd", "apgd-ce", "apgd-dlr", "apgd-t", "pgd-bpda",
                                   "apgd-bpda", "vote-attack", "auto"}
    for name in ("pgd", "apgd-ce", "apgd-dlr", "apgd-t"):
        assert registry.attack_entry(name).backends == ("native", "torchattacks")
    # settings reach a subclass that forwards them to its parent (**settings)
    assert get_attack("apgd-ce", steps=7, seed=5).steps == 7
    assert get_attack("apgd-dlr", "torchattacks", steps=6, seed=2).seed == 2
    with pytest.raises(RobustcapsError, match="unknown attack 'pgd2'; known: fgsm, bim"):
        get_attack("pgd2")
    with pytest.raises(RobustcapsError, match="unknown backend"):
        get_attack("fgsm", backend="cleverhans")
    with pytest.raises(ValueError, match="registered twice"):
        register_attack("fgsm")(native.FGSM)


@pytest.fixture
def copy_of_fgsm():
    """A new attack registered the way a new module would: one decorator."""

    @register_attack("fgsm-copy", description="FGSM again, to test the registry")
    class FGSMCopy(native.FGSM):
        name = "fgsm-copy"

    yield FGSMCopy
    registry._ATTACKS.pop("fgsm-copy")


def test_a_registered_attack_runs_in_evaluate(copy_of_fgsm):
    assert "fgsm-copy" in threats()
    torch.manual_seed(0)
    model = ModelAdapter(nn.Sequential(nn.Flatten(), nn.Linear(16, 3)), input_shape=(1, 4, 4),
                         num_classes=3, device="cpu", name="lin")
    x, y = torch.randn(12, 1, 4, 4), torch.arange(12) % 3
    r = robustcaps.evaluate([model], dataset=(x, y), attack=["fgsm", "fgsm-copy"],
                            epsilons=[0, 0.2, 0.5], progress=False)
    per = {a: g.drop(columns="attack").reset_index(drop=True)
           for a, g in r.records.groupby("attack")}
    assert set(per) == {"fgsm", "fgsm-copy"}
    assert per["fgsm"].equals(per["fgsm-copy"])  # same numbers, another name
    assert per["fgsm"]["success"].any()
    res = CliRunner().invoke(cli, ["attacks", "--json"])
    rows = {row["name"]: row for row in json.loads(res.output)}
    assert rows["fgsm-copy"]["backends"] == ["native"]


def test_attacks_command_lists_names_backends_descriptions():
    res = CliRunner().invoke(cli, ["attacks"])
    assert res.exit_code == 0
    lines = res.output.strip().splitlines()
    assert lines[0].startswith("fgsm") and "[native, torchattacks, foolbox]" in lines[0]
    assert "Kurakin" in lines[1]


def test_config_is_frozen_validated_and_round_trips():
    cfg = EvaluationConfig.from_kwargs(attack="all", targeted=True, epsilons=[0, 0.1],
                                       steps=3, models=["cnn", {"spec": "cnn", "name": "b"}])
    assert cfg.threat.attack == (*list_attacks(), "transfer")
    assert cfg.threat.targeted is Targeting.TARGETED and cfg.threat.targeted.flags == (True,)
    assert cfg.white_box == list_attacks() and cfg.batch_size == 100
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.threat.steps = 4
    again = EvaluationConfig.from_kwargs(**json.loads(json.dumps(cfg.to_manifest())))
    assert again.settings() == cfg.settings()
    assert cfg.replace(steps=5).threat.steps == 5 and cfg.threat.steps == 3
    for bad, needle in [({"steps": 0}, "steps must be an integer >= 1"),
                        ({"targeted": "sideways"}, "unknown mode"),
                        ({"backend": "x"}, "unknown backend"),
                        ({"epsilons": [0.1, 0.1]}, "duplicates"),
                        ({"stepz": 1}, "unknown setting")]:
        with pytest.raises(RobustcapsError, match=needle):
            EvaluationConfig.from_kwargs(**bad)


def test_suite_keys_come_from_the_settings(tmp_path):
    assert {"mode", "targets", "eps_range", "steps", "backend"} <= set(SUITE_KEYS)
    assert "targeted" not in SUITE_KEYS and "transfer_targets" not in SUITE_KEYS
    for text, needle in [('dataset = ""\n', "'dataset' must be a dataset name"),
                         ('source = ""\n', "'source' must be a model spec"),
                         ('backend = ["native", "x"]\n', "native, torchattacks, foolbox, all")]:
        (tmp_path / "s.toml").write_text(text)
        with pytest.raises(RobustcapsError, match=needle):
            load_suite(tmp_path / "s.toml")
