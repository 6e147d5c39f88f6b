"""Per-expert aggregation, update validation and the utility table (flux_engine.aggregation)."""

import dataclasses
import math

import pytest
import torch

from flux_engine.aggregation import (
    ClientUpdate,
    UpdateError,
    UtilityTable,
    aggregate,
    expert_shapes,
    user_shares,
    validate_update,
)

L, E, H, I, R = 2, 4, 6, 5, 2
LORA = expert_shapes(H, I, R)
FULL = expert_shapes(H, I)


def _tensors(shapes, fill: float):
    return {name: torch.full(shape, fill) for name, shape in shapes.items()}


def _update(client, experts, shapes=FULL):
    """``experts``: {key: (fill value, tokens)}."""
    return ClientUpdate(
        client, {k: _tensors(shapes, v) for k, (v, _) in experts.items()}, {k: n for k, (_, n) in experts.items()}
    )


def test_shapes():
    assert FULL == {"gate_up": (2 * I, H), "down": (H, I)}
    assert LORA == {"gate_up_A": (R, H), "gate_up_B": (2 * I, R), "down_A": (R, I), "down_B": (H, R)}


def test_weighted_average_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    a = {n: torch.randn(s, generator=g) for n, s in LORA.items()}
    b = {n: torch.randn(s, generator=g) for n, s in LORA.items()}
    c = {n: torch.randn(s, generator=g) for n, s in LORA.items()}
    updates = [
        ClientUpdate("a", {(0, 1): a, (1, 3): c}, {(0, 1): 30, (1, 3): 5}),
        ClientUpdate("b", {(0, 1): b}, {(0, 1): 10}),
    ]
    new, changed = aggregate({}, updates)
    assert changed == [(0, 1), (1, 3)]
    for n in LORA:
        torch.testing.assert_close(new[(0, 1)][n], 0.75 * a[n] + 0.25 * b[n])
        torch.testing.assert_close(new[(1, 3)][n], c[n])  # one trainer: its value, whatever its weight


def test_untrained_experts_keep_their_value_and_dtype():
    old = {(0, 0): _tensors(FULL, 7.0), (0, 2): {n: t.double() for n, t in _tensors(FULL, 1.0).items()}}
    new, changed = aggregate(old, [_update("a", {(0, 2): (3.0, 4)}), _update("b", {(0, 2): (5.0, 12)})])
    assert changed == [(0, 2)]
    assert new[(0, 0)] is old[(0, 0)]
    assert new[(0, 2)]["down"].dtype == torch.float64
    assert torch.all(new[(0, 2)]["down"] == 4.5)  # (3 * 4 + 5 * 12) / 16
    assert torch.all(old[(0, 2)]["down"] == 1.0)  # the input state is not modified


def test_zero_tokens_everywhere_gives_plain_mean():
    new, _ = aggregate({}, [_update("a", {(1, 1): (2.0, 0)}), _update("b", {(1, 1): (4.0, 0)})])
    assert torch.all(new[(1, 1)]["gate_up"] == 3.0)


def test_zero_token_client_gets_no_weight():
    new, _ = aggregate({}, [_update("a", {(1, 1): (2.0, 0)}), _update("b", {(1, 1): (4.0, 9)})])
    assert torch.all(new[(1, 1)]["gate_up"] == 4.0)


def test_validate_accepts_good_update():
    validate_update(_update("a", {(0, 1): (1.0, 3), (1, 3): (2.0, 0)}, LORA), LORA, L, E)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda u: u.tensors[(0, 1)].__setitem__("down", torch.zeros(I, H)), "down has shape (5, 6), expected (6, 5)"),
        (lambda u: u.tensors[(0, 1)].pop("gate_up"), "missing tensors ['gate_up']"),
        (lambda u: u.tensors[(0, 1)].__setitem__("extra", torch.zeros(1)), "unexpected tensors ['extra']"),
        (lambda u: u.tensors[(0, 1)]["down"].__setitem__((0, 0), math.nan), "down has non-finite values"),
        (lambda u: u.tensors[(0, 1)]["down"].__setitem__((0, 0), math.inf), "down has non-finite values"),
        (lambda u: u.token_counts.__setitem__((0, 1), -1), "token count must be a non-negative int"),
        (lambda u: u.token_counts.pop((0, 1)), "token counts and tensors name different experts"),
        (lambda u: setattr(u, "utilities", torch.zeros(L, E + 1)), "utilities have shape"),
    ],
)
def test_validate_rejects_bad_updates(mutate, message):
    u = _update("client-7", {(0, 1): (1.0, 3)})
    mutate(u)
    with pytest.raises(UpdateError, match="client client-7") as e:
        validate_update(u, FULL, L, E)
    assert message in str(e.value)


def _routed(counts):
    """``[L, E]`` int64 routed counts from ``{key: tokens}``."""
    r = torch.zeros(L, E, dtype=torch.int64)
    for k, n in counts.items():
        r[k] = n
    return r


@pytest.mark.parametrize(
    "routed, message",
    [
        (torch.zeros(L, E), "routed counts must be an integer tensor"),
        (torch.zeros(L, E + 1, dtype=torch.int64), "routed counts have shape (2, 5), expected (2, 4)"),
        (_routed({(0, 1): 3, (1, 2): -1}), "routed counts must lie in [0, 100]"),
        (_routed({(0, 1): 3, (1, 2): 101}), "routed counts must lie in [0, 100]"),
        (_routed({(0, 1): 4}), "routed counts disagree with the token counts of trained experts [(0, 1)]"),
    ],
)
def test_validate_rejects_bad_routed_counts(routed, message):
    u = _update("client-7", {(0, 1): (1.0, 3)})
    validate_update(dataclasses.replace(u, routed=_routed({(0, 1): 3, (1, 2): 100})), FULL, L, E, max_tokens=100)
    with pytest.raises(UpdateError, match="client client-7") as e:
        validate_update(dataclasses.replace(u, routed=routed), FULL, L, E, max_tokens=100)
    assert message in str(e.value)


def test_average_over_users_damps_by_the_trainers_share_of_routed_tokens():
    """Client a trains (0, 1) on 30 tokens, b trains it on 10, c routes 40 tokens to it without training it and d
    reports no routing: over users (a, b, c) the expert moves by (30 + 10) / 80 of the trainers' average step."""
    g = torch.Generator().manual_seed(1)
    glob, a, b = ({n: torch.randn(s, generator=g) for n, s in LORA.items()} for _ in range(3))
    updates = [
        ClientUpdate("a", {(0, 1): a}, {(0, 1): 30}, routed=_routed({(0, 1): 30, (1, 0): 7})),
        ClientUpdate("b", {(0, 1): b}, {(0, 1): 10}, routed=_routed({(0, 1): 10})),
        ClientUpdate("c", {}, {}, routed=_routed({(0, 1): 40, (1, 0): 9})),
        ClientUpdate("d", {}, {}),
    ]
    assert user_shares(updates) == {(0, 1): 0.5}
    trainers, _ = aggregate({(0, 1): glob}, updates)
    users, changed = aggregate({(0, 1): glob}, updates, over="users")
    assert changed == [(0, 1)]
    for n in LORA:
        torch.testing.assert_close(trainers[(0, 1)][n], 0.75 * a[n] + 0.25 * b[n])
        torch.testing.assert_close(users[(0, 1)][n], glob[n] + 0.5 * (trainers[(0, 1)][n] - glob[n]))
    # No global value yet: the users hold the start every client gives the expert (initial); without one, the
    # trainers' average.
    start = {n: torch.full(s, 2.0) for n, s in LORA.items()}
    first, _ = aggregate({}, updates, over="users", initial=lambda key: start)
    alone, _ = aggregate({}, updates, over="users")
    for n in LORA:
        torch.testing.assert_close(first[(0, 1)][n], 2.0 + 0.5 * (trainers[(0, 1)][n] - 2.0))
        assert torch.equal(alone[(0, 1)][n], trainers[(0, 1)][n])


def test_average_over_users_is_the_trainers_rule_when_every_user_trains():
    """FedAvg's case (every client trains every expert it routes to): bit-identical to the trainers' rule."""
    g = torch.Generator().manual_seed(2)
    glob = {(0, 1): {n: torch.randn(s, generator=g) for n, s in LORA.items()}}
    updates = [ClientUpdate(c, {(0, 1): {n: torch.randn(s, generator=g) for n, s in LORA.items()}}, {(0, 1): n},
                            routed=_routed({(0, 1): n})) for c, n in (("a", 3), ("b", 17))]  # fmt: skip
    for method in ("weighted", "trimmed-mean", "norm-clip"):
        trainers, _ = aggregate(glob, updates, method)
        users, _ = aggregate(glob, updates, method, over="users")
        assert all(torch.equal(users[(0, 1)][n], trainers[(0, 1)][n]) for n in LORA)
    with pytest.raises(ValueError, match="average-over must be one of"):
        aggregate(glob, updates, over="everyone")


@pytest.mark.parametrize("key", [(L, 0), (0, E), (-1, 0)])
def test_validate_rejects_unknown_expert(key):
    with pytest.raises(UpdateError, match=rf"unknown expert \({key[0]}, {key[1]}\)"):
        validate_update(_update("a", {key: (1.0, 1)}), FULL, L, E)


def test_validate_rejects_wrong_mode():
    with pytest.raises(UpdateError, match="expert \\(0, 0\\): missing tensors"):
        validate_update(_update("a", {(0, 0): (1.0, 1)}, FULL), LORA, L, E)


def test_utility_table_stale_semantics():
    t = UtilityTable(L, E)
    assert torch.equal(t.for_client("new"), torch.zeros(L, E, dtype=torch.float64))
    t.update("a", torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]))
    nan = math.nan
    t.update("a", torch.tensor([[nan, 20.0, nan, nan], [nan, nan, nan, 80.0]]))  # only measured entries change
    assert t.for_client("a").tolist() == [[1.0, 20.0, 3.0, 4.0], [5.0, 6.0, 7.0, 80.0]]
    t.update("b", torch.tensor([[3.0, nan, nan, nan], [nan, nan, nan, nan]]))
    # b's unmeasured experts fall back to the mean over clients that reported them
    assert t.for_client("b").tolist() == [[3.0, 20.0, 3.0, 4.0], [5.0, 6.0, 7.0, 80.0]]
    # a client that measured nothing takes the mean of the measurements
    assert t.for_client("c").tolist() == [[2.0, 20.0, 3.0, 4.0], [5.0, 6.0, 7.0, 80.0]]
    with pytest.raises(UpdateError, match="client a: utilities have shape"):
        t.update("a", torch.zeros(E, L))


# ------------------------------------------------------------------------------------------------ robustness


def test_screening_rejects_a_tensor_far_above_its_reference():
    from flux_engine.aggregation import screen_updates

    honest = [_update(c, {(0, 1): (v, 10), (1, 2): (v, 10)}) for c, v in (("a", 1.0), ("b", 1.5), ("c", 2.0))]
    hostile = _update("h", {(0, 1): (1e30, 10)})
    kept, rejected = screen_updates({}, honest + [hostile], norm_bound=10.0)
    assert [u.client for u in kept] == ["a", "b", "c"] and list(rejected) == ["h"]
    assert "expert (0, 1): down has norm 5.48e+30, over 10x its reference 8.22" in rejected["h"]  # 1.5 * sqrt(30)
    # The global tensor raises the reference: an expert trained for long may have grown.
    big = {(0, 1): _tensors(FULL, 100.0)}
    assert screen_updates(big, honest + [_update("g", {(0, 1): (900.0, 10)})], 10.0)[1] == {}
    # Off, and a round whose tensors are all zero (LoRA B factors before training) rejects nothing.
    assert screen_updates({}, honest + [hostile], 0.0) == (honest + [hostile], {})
    zeros = [_update(c, {(0, 1): (0.0, 1)}) for c in "xyz"]
    assert screen_updates({}, zeros, 10.0) == (zeros, {})


def test_screening_median_counts_each_client_once():
    """A hostile client training many experts cannot move the reference: medians are per client first."""
    from flux_engine.aggregation import screen_updates

    honest = [_update(c, {(0, 0): (1.0, 10)}) for c in "ab"]
    hostile = _update("h", {(l, e): (50.0, 10) for l in range(L) for e in range(E)})
    kept, rejected = screen_updates({}, honest + [hostile], 10.0)
    assert [u.client for u in kept] == ["a", "b"] and list(rejected) == ["h"]


def test_implausible_token_count_is_rejected():
    u = _update("a", {(0, 1): (1.0, 2**62)})
    with pytest.raises(UpdateError, match=r"client a, expert \(0, 1\): token count 4611686018427387904 is implausible"):
        validate_update(u, FULL, L, E, max_tokens=4096)
    validate_update(_update("a", {(0, 1): (1.0, 4096)}), FULL, L, E, max_tokens=4096)


def test_trimmed_mean_drops_the_extremes_per_coordinate():
    updates = [_update(c, {(0, 0): (v, n)}) for c, v, n in (("a", 1.0, 1), ("b", 2.0, 1), ("c", 3.0, 1),
                                                             ("h", 1e6, 10**6))]  # fmt: skip
    new, _ = aggregate({}, updates, method="trimmed-mean", trim=0.25)
    assert torch.all(new[(0, 0)]["down"] == 2.5)  # mean of 2 and 3: 1 and 1e6 trimmed, token counts unused
    new, _ = aggregate({}, updates[:3], method="trimmed-mean", trim=0.25)
    assert torch.all(new[(0, 0)]["down"] == 2.0)  # floor(0.75) = 0 trimmed of three


def test_norm_clip_bounds_each_client_to_the_median_distance():
    g = {(0, 0): _tensors(FULL, 1.0)}
    updates = [_update(c, {(0, 0): (v, 1)}) for c, v in (("a", 2.0), ("b", 3.0), ("h", 1e6))]
    new, _ = aggregate(g, updates, method="norm-clip")
    # Distances to the global tensor: 1, 2 and ~1e6 per coordinate; the median, 2, caps h's at 2.
    assert torch.allclose(new[(0, 0)]["down"], torch.tensor((1.0 + 2.0 + 2.0) / 3 + 1.0))
    # Without a global tensor the centre is the coordinate-wise median (b's 3.0).
    new, _ = aggregate({}, updates, method="norm-clip")
    assert torch.allclose(new[(0, 0)]["down"], torch.tensor(3.0 + (-1.0 + 0.0 + 1.0) / 3))
    # One trainer: its own value.
    new, _ = aggregate(g, updates[:1], method="norm-clip")
    assert torch.all(new[(0, 0)]["down"] == 2.0)


def test_utilities_must_be_finite_and_non_negative():
    t = UtilityTable(L, E)
    for bad in (torch.full((L, E), math.inf), torch.full((L, E), -1.0), torch.zeros(L, E, dtype=torch.long)):
        with pytest.raises(UpdateError, match="client a: utilities must be"):
            t.update("a", bad)
    t.update("a", torch.full((L, E), math.nan))  # NaN: not measured
