"""Work accounting (mechscope.core.work): the meter counts the blocks a pass really runs, the floors the techniques
claim are what their answers need, and `circuit` reports each stage against its floor."""

import json

import pytest
import torch

from mechscope import HookedModel
from mechscope.circuits.discovery import find_circuit
from mechscope.circuits.faithfulness import Ablator
from mechscope.core import work
from mechscope.core.work import WorkMeter, add_floor
from mechscope.datasets import TaskDataset
from tiny import V, tiny_hf

CLEAN = torch.randint(0, V, (8, 6), generator=torch.Generator().manual_seed(1))
CORR = CLEAN.clone()
CORR[:, 2] = (CORR[:, 2] + 7) % V


@pytest.fixture(scope="module")
def model():
    return HookedModel(tiny_hf("llama"))


def test_the_meter_counts_the_blocks_each_pass_runs(model):
    L = model.cfg.n_layers
    with WorkMeter(model) as m:
        with torch.no_grad():
            model(CLEAN)  # 8 x 6 tokens through every block
            assert m.token_layers == 48 * L
            model(CLEAN, stop_at_layer=1)  # stops before block 1: one block run
            assert m.token_layers == 48 * L + 48
            resid = model(CLEAN, stop_at_layer=L - 1)
            model.run_from(L - 1, resid)  # the last block only
            assert m.token_layers == 48 * L + 48 + 48 * (L - 1) + 48
        add_floor(5)
        assert m.floor == 5
    assert all(not b._forward_hooks for b in model.parts.layers)  # closed: nothing left on the model
    with torch.no_grad():
        model(CLEAN)
    assert m.token_layers == 48 * L + 48 + 48 * (L - 1) + 48 and m.log.token_layers == m.token_layers
    add_floor(7)  # no meter open: nothing counts
    assert m.floor == 5


def test_stages_split_the_work_and_a_nested_stage_is_not_counted_twice(model):
    L = model.cfg.n_layers
    with WorkMeter(model) as m, torch.no_grad():
        with work.stage("outer"):
            model(CLEAN)
            with work.stage("inner"):
                model(CLEAN[:2])
                add_floor(12 * L)
        with work.stage("after"):
            pass
        with work.stage("after"):  # the same stage straight after (one run in parts): the same row
            model(CLEAN[:1])
            add_floor(6 * L)
    assert [s.name for s in m.log.stages] == ["inner", "outer", "after"]
    by = {s.name: s for s in m.log.stages}
    assert by["after"].token_layers == 6 * L and by["after"].floor == 6 * L
    assert by["inner"].token_layers == 12 * L and by["inner"].ratio == 1.0
    assert by["outer"].token_layers == 48 * L and by["outer"].floor == 0
    assert sum(s.token_layers for s in m.log.stages) == m.token_layers
    assert "n/a" in m.log.summary() and "total" in m.log.summary()
    with work.stage("no meter"):  # a stage with no meter open is a no-op
        pass


def test_an_ablator_claims_each_set_from_its_first_ablated_block(model):
    L = model.cfg.n_layers
    ds = TaskDataset("toy", CLEAN, CORR, torch.full((8,), 3), torch.full((8,), 5), ["x"] * 8, ["y"] * 8)
    pool = [f"L{L - 1}H0", f"L{L - 1}H1", "L0H0"]
    with WorkMeter(model) as m:
        abl = Ablator(model, ds, ds.metric, pool, "cf")
        # the reference (corrupted) pass, the full model and the empty circuit (L0H0 ablated: every block)
        assert m.floor == 48 * L + 48 * L + 48 * L
        f0 = m.floor
        abl.ablated([f"L{L - 1}H0"])  # from the last block on
        assert m.floor - f0 == 48 * 1
        f1 = m.floor
        # kept circuits: the rest is ablated, {L2H1} and {L2H0, L2H1}: both from the last block on, one stacked pass
        abl.kept_many([[f"L{L - 1}H0", "L0H0"], ["L0H0"]])
        assert m.floor - f1 == 48 + 48
        abl.ablated([f"L{L - 1}H0"])  # memoised: no pass, no floor
        abl.kept([f"L{L - 1}H1", "L0H0"])  # the same set as {L2H0} ablated: memoised too
        assert m.floor - f1 == 48 + 48


def test_find_circuit_stages_report_their_work_against_their_floors(model):
    ds = TaskDataset("toy", CLEAN, CORR, torch.full((8,), 3), torch.full((8,), 5), ["x"] * 8, ["y"] * 8)
    with WorkMeter(model) as m:
        res = find_circuit(model, ds, node_threshold=0.0, max_nodes=3, n_random=2)
    names = [s.name for s in m.log.stages]
    assert names == ["patching: residual stream [split 0]", "patching: heads and MLPs [split 0]",
                     "choice: search curve [split 0]", "edge attribution [split 0]", "validation: held-out [split 0]"]
    by = {s.name.split(" [")[0]: s for s in m.log.stages}
    L, (N, P) = model.cfg.n_layers, (4, 6)  # the search split: 4 of the 8 prompts
    # two independent counts agree: the meter's blocks and the engine's own token-layers, plus the pair's two runs
    assert by["patching: residual stream"].token_layers == res.resid.stats["token_layers"] + 2 * N * P * L
    assert by["patching: residual stream"].floor == res.resid.stats["floor_token_layers"] + 2 * N * P * L
    # EAP reads the pair's runs and runs one forward (with its backward): exactly its floor
    assert by["edge attribution"].ratio == 1.0 and by["choice: search curve"].token_layers == 0  # threshold rule
    assert all(s.token_layers >= s.floor for s in m.log.stages)  # a floor is never above the work
    assert all(s.seconds >= 0 for s in m.log.stages)
    res.extra["work"] = m.log
    assert "work per stage" in res.summary()
    assert json.dumps(res.to_dict()["work"])  # JSON-ready
