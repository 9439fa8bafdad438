"""The champion gate's decision on real evaluations: the demo recipe trained with different seeds.

tests/data/gate/ holds the scores.npz of `python -m pipeline.compare --seeds` runs of the demo
profile (1,200 steps, 120 synthetic test images; tests/data/README.md): the DFC-VAE at five seeds and
the plain VAE at seed 0. The decision is `registry.decide` on `uncertainty.paired_objective`, with
params.yaml's registry settings and the demo's bootstrap, as `register_model` makes it.
"""

from __future__ import annotations

import dataclasses
from itertools import permutations
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from dfcvae.config import Config, RegistryConfig
from dfcvae.registry import decide
from dfcvae.uncertainty import Difference, Scores, paired_objective

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "gate"
# The demo profile the scores were measured with (its eval.bootstrap_resamples) over params.yaml.
CFG = Config.load(ROOT / "params.yaml").with_overrides(yaml.safe_load((ROOT / "pipeline" / "demo.yaml").read_text()))
BOOTSTRAP_SEEDS = range(2)  # the decision must not hang on the bootstrap's own draw


def difference(challenger: Scores, champion: Scores, seed: int = 0) -> Difference:
    return paired_objective(
        challenger, champion, CFG.eval.objective, CFG.registry.min_confidence, CFG.eval.bootstrap_resamples, seed
    )


def decide_on(measured: Difference, gate: RegistryConfig = CFG.registry) -> tuple[str, str]:
    tags = {
        "objective": CFG.eval.objective,
        "objective_value": repr(measured.challenger),
        "min_active_fraction": repr(gate.min_active_fraction),
        "active_fraction": "1.0",
    }
    return decide(SimpleNamespace(version=1), tags, 2, measured, gate)


def loose(minimum: float) -> RegistryConfig:
    return dataclasses.replace(CFG.registry, min_improvement=minimum)


@pytest.fixture(scope="module")
def dfc() -> list[Scores]:
    found = [Scores.load(path) for path in sorted(DATA.glob("dfc_seed*.npz"))]
    assert len(found) >= 5
    return found


@pytest.fixture(scope="module")
def pairs(dfc) -> dict[tuple[int, int], Difference]:
    """Every ordered pair of seeds (challenger, champion): its paired difference (about 1.5 s each)."""
    return {(a, b): difference(dfc[a], dfc[b]) for a, b in permutations(range(len(dfc)), 2)}


@pytest.mark.slow
def test_a_retrain_of_the_same_recipe_with_another_seed_is_never_promoted(pairs):
    """Every ordered pair of the five seeds: 20 decisions, all kept. The widest gap, seed 2 over
    seed 3, is 11.9% lower with a paired bound of -9.8%: the bootstrap covers the test images, not
    the training seed."""
    outcomes = [decide_on(measured) for measured in pairs.values()]
    assert len(outcomes) == 20
    promoted = [reason for verdict, reason in outcomes if verdict == "promoted"]
    assert not promoted, promoted[0]
    minimum = f"promotion needs fid_sum lower by more than {CFG.registry.min_improvement:.0%}"
    assert all(minimum in reason for _, reason in outcomes)


@pytest.mark.slow
def test_a_clearly_better_model_is_promoted_and_a_worse_one_kept(dfc):
    """The DFC-VAE over the plain VAE of the same shards and steps (`fid_sum` 34% lower): promoted,
    at two bootstrap draws; the other way round, kept."""
    plain = Scores.load(DATA / "plain_seed0.npz")
    for challenger in dfc[:2]:
        for seed in BOOTSTRAP_SEEDS:
            verdict, reason = decide_on(difference(challenger, plain, seed))
            assert verdict == "promoted", reason
            assert decide_on(difference(plain, challenger, seed))[0] == "kept"


@pytest.mark.slow
def test_a_5_percent_minimum_promotes_three_retrains_of_one_recipe(pairs):
    promoted = {pair for pair, measured in pairs.items() if decide_on(measured, loose(0.05))[0] == "promoted"}
    assert promoted == {(2, 1), (2, 3), (4, 3)}


def test_the_check_can_fail_a_smaller_minimum_promotes_the_luckiest_seed(dfc):
    """Seed 2 over seed 3: the minimum effect is what keeps it. At 9.5% it is promoted, which is why
    the minimum is 15% and not the 10% that the nearest recipe's spread (8.3% at most) had called for."""
    measured = difference(dfc[2], dfc[3])
    assert decide_on(measured, loose(0.095))[0] == "promoted"
    assert decide_on(measured)[0] == "kept"
