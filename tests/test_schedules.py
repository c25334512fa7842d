import pytest

from growprune.schedules import Constant, Cubic, Exponential, Linear, OneShot, Steps


def targets(schedule, horizon=20):
    return {t: round(schedule.target_at(t), 6) for t in range(horizon) if schedule.target_at(t) is not None}


def test_one_shot_acts_once():
    assert targets(OneShot(amount=0.9, at=3)) == {3: 0.9}


def test_constant_targets_never_compound():
    # Lightning's ModelPruning(amount=0.5) each epoch gives 50, 75, 87.5 %; ours stays at 50 % of the original.
    assert targets(Constant(amount=0.5, start=1, end=4)) == {1: 0.5, 2: 0.5, 3: 0.5, 4: 0.5}


def test_linear_every_k_reaches_final_target_at_end():
    assert targets(Linear(amount=0.8, start=2, end=10, every=2)) == {2: 0.0, 4: 0.2, 6: 0.4, 8: 0.6, 10: 0.8}
    # an end not on the grid is still an action, with the final target
    assert targets(Linear(amount=0.6, start=0, end=5, every=2)) == {0: 0.0, 2: 0.24, 4: 0.48, 5: 0.6}


def test_cubic_is_zhu_and_gupta():
    schedule = Cubic(amount=0.9, start=0, end=10, every=5, initial=0.1)
    # s_t = s_f + (s_i - s_f) * (1 - t / (n dt))^3
    expected = {t: round(0.9 + (0.1 - 0.9) * (1 - t / 10) ** 3, 6) for t in (0, 5, 10)}
    assert targets(schedule) == expected


def test_exponential_removes_same_share_of_remaining():
    schedule = Exponential(amount=0.875, start=0, end=3)
    values = targets(schedule)
    assert values == {0: 0.0, 1: 0.5, 2: 0.75, 3: 0.875}


def test_explicit_steps():
    schedule = Steps(steps=[100, 200, 300], amounts=[0.5, 0.75, 0.9], unit="step")
    assert targets(schedule, 400) == {100: 0.5, 200: 0.75, 300: 0.9}
    assert schedule.final_target == 0.9
    assert targets(Steps(steps=[1, 3], amounts=0.3)) == {1: 0.3, 3: 0.3}


def test_end_none_resolves_to_end_of_training_in_a_copy():
    schedule = Linear(amount=0.5, start=0)
    resolved = schedule.resolved(4)
    assert targets(resolved) == {0: 0.0, 1: 0.125, 2: 0.25, 3: 0.375, 4: 0.5}
    assert schedule.end is None  # the configured schedule is never changed
    assert targets(schedule.resolved(8))[8] == 0.5
    late = Linear(amount=0.5, start=10)
    with pytest.raises(ValueError, match="training ends"):
        late.resolved(4)


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: Linear(amount=0.5, start=5, end=2), "end .* before its start"),
        (lambda: Linear(amount=-0.1), "amount"),
        (lambda: Linear(amount=0.5, every=0), "every"),
        (lambda: Linear(amount=0.5, unit="batch"), "unit"),
        (lambda: Steps(steps=[3, 1], amounts=0.5), "increasing"),
        (lambda: Steps(steps=[1, 2], amounts=[0.5]), "2 steps but 1 amounts"),
        (lambda: Steps(steps=[], amounts=0.5), "at least one"),
    ],
)
def test_bad_schedules_fail_clearly(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()


def test_compressed_copies_end_by_the_given_time_for_every_schedule():
    cases = [
        (OneShot(amount=0.9, at=10), {4: 0.9}),
        (Constant(amount=0.5, start=2, end=8, every=2), {1: 0.5, 2: 0.5, 3: 0.5, 4: 0.5}),
        # 2, 4, 6, 8, 10 -> 1, 2, 2, 3, 4 (4 and 6 merge); targets along the new start..end
        (Linear(amount=0.8, start=2, end=10, every=2), {1: 0.0, 2: 0.8 / 3, 3: 1.6 / 3, 4: 0.8}),
        (Cubic(amount=0.9, start=0, end=8, every=2), {t: 0.9 * (1 - (1 - t / 4) ** 3) for t in range(5)}),
        (Exponential(amount=0.875, start=0, end=6, every=2), {t: 1 - 0.125 ** (t / 4) for t in (0, 1, 3, 4)}),
        (Steps(steps=[3, 6, 9], amounts=[0.5, 0.75, 0.9]), {1: 0.5, 3: 0.75, 4: 0.9}),
    ]
    for schedule, expected in cases:
        before = schedule.describe()
        compressed = schedule.compressed(4)
        assert schedule.describe() == before  # the configured schedule is never changed
        got = {t: compressed.target_at(t) for t in range(12) if compressed.target_at(t) is not None}
        assert got == pytest.approx(expected), type(schedule).__name__
        assert compressed.times() == sorted(expected)
        assert schedule.compressed(10).times() == schedule.times()  # already fits: unchanged


def test_compressed_steps_merge_with_the_later_amount():
    merged = Steps(steps=[3, 6, 9], amounts=[0.5, 0.75, 0.9]).compressed(1)
    assert merged.steps == [0, 1] and merged.amounts == [0.5, 0.9]
    assert Steps(steps=[8, 9], amounts=[0.2, 0.4]).compressed(2).amounts == [0.4]
