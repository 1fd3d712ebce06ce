"""The training plan: one budget shared by the phases, sized from the data."""

from __future__ import annotations

import numpy as np
import pytest

from lab.datasets import Dataset, Interaction, Item
from lab.plan import (
    BUDGET_MINUTES,
    EASE_ARRAYS,
    EASE_MEMORY_BYTES,
    JUDGE_SHARE,
    MIN_GEN_SECONDS,
    PRESET_GEN_MINUTES,
    SEARCH_SHARE,
    ease_bound,
    plan_training,
)
from lab.protocol import Split, leave_one_out


@pytest.fixture(scope="module")
def split() -> Split:
    rng = np.random.default_rng(1)
    rows = [
        Interaction(f"u{u}", f"i{int(item)}", float(u * 100 + step))
        for u in range(40)
        for step, item in enumerate(rng.choice(50, size=6, replace=False))
    ]
    items = {f"i{i}": Item(f"i{i}", f"i{i}") for i in range(50)}
    return leave_one_out(Dataset("shop", rows, items))


def test_a_named_set_keeps_its_preset_plan(split: Split) -> None:
    plan = plan_training(split, preset=True)
    assert plan.source == "preset"
    assert plan.budget_s is None
    assert plan.search_s == 0.0
    assert plan.gen_s == plan.judge_s == PRESET_GEN_MINUTES * 60
    assert plan.gen_deadline(elapsed_s=500.0) == PRESET_GEN_MINUTES * 60
    # Without the hybrid there is no recent-popularity blend to judge.
    assert plan_training(split, preset=True, hybrid=False).judge_s == 0.0
    assert plan.ease_max_items == split.n_items  # a small catalog stays exact
    assert plan.negatives == 0


def test_a_dataset_without_preset_shares_one_budget(split: Split) -> None:
    plan = plan_training(split, preset=False)
    assert plan.budget_s == BUDGET_MINUTES * 60
    assert 0 < plan.search_s <= SEARCH_SHARE * plan.budget_s
    assert plan.search_s + plan.gen_s + plan.judge_s + plan.fit_s == pytest.approx(plan.budget_s)
    # The transformer's second training (judging recent popularity as served) takes its share.
    assert plan.judge_s == pytest.approx(JUDGE_SHARE * (plan.gen_s + plan.judge_s))
    # Time the search leaves unused goes to the transformer; the fits and the judge keep theirs.
    deadline = plan.budget_s - plan.fit_s - plan.judge_s - 10.0
    assert plan.gen_deadline(elapsed_s=10.0) == pytest.approx(deadline)
    assert plan.gen_deadline(elapsed_s=plan.budget_s) == MIN_GEN_SECONDS
    record = plan.to_json()
    assert record["source"] == "budget"
    assert plan.describe().startswith("plan (budget)")


def test_what_the_command_line_gives_overrides_its_part(split: Split) -> None:
    plan = plan_training(
        split,
        preset=False,
        budget_minutes=5.0,
        gen_minutes=2.0,
        tune_minutes=0.0,
        ease_max_items=7,
        negatives=16,
    )
    assert plan.budget_s == 300.0
    assert (plan.search_s, plan.gen_s, plan.ease_max_items, plan.negatives) == (0.0, 120.0, 7, 16)
    assert plan.gen_deadline(elapsed_s=100.0) == 120.0
    # A budget given for a named set replaces its preset plan.
    assert plan_training(split, preset=True, budget_minutes=5.0).budget_s == 300.0


def test_ease_bound_follows_the_catalog_memory_and_time() -> None:
    by_memory = int((EASE_MEMORY_BYTES / (4 * EASE_ARRAYS)) ** 0.5)
    assert ease_bound(1_682) == 1_682
    assert ease_bound(10 * by_memory) == by_memory
    bounds = [ease_bound(10 * by_memory, seconds=s) for s in (3.0, 30.0, 300.0, 3000.0)]
    assert bounds == sorted(bounds)
    assert bounds[0] < by_memory
    assert bounds[-1] == by_memory


def test_transformer_trials_too_short_to_say_anything_leave_their_time_to_training(
    split: Split, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lab import tuning

    roomy = plan_training(split, preset=False)
    assert roomy.search_gen_s > 0
    monkeypatch.setattr(tuning, "SOFTMAX_CELLS_PER_S", 1.0)  # an epoch now "takes" hours
    tight = plan_training(split, preset=False)
    assert tight.search_gen_s == 0.0
    assert tight.search_cf_s == roomy.search_cf_s
    # The time goes to the transformer's two trainings, in their shares.
    assert tight.gen_s + tight.judge_s == pytest.approx(
        roomy.gen_s + roomy.judge_s + roomy.search_gen_s
    )
    assert tight.gen_s > roomy.gen_s
