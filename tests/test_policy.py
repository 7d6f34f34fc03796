import pytest

from gnsurgeon import GNSurgeonError, GroupPolicy

CHANNELS = [3, 8, 16, 24, 40, 45, 72, 88, 144, 232, 440, 888, 960]

# The README's policy table (min_group_channels = 2). G = 1 appears only where nothing else divides.
DOCUMENTED_G32 = {
    3: 1,
    8: 4,
    16: 8,
    24: 12,
    40: 20,
    45: 15,
    72: 24,
    88: 22,
    144: 24,
    232: 29,
    440: 22,
    888: 24,
    960: 32,
}
DOCUMENTED_CPG16 = {3: 1, 8: 2, 16: 2, 24: 2, 40: 2, 45: 3, 72: 4, 88: 4, 144: 9, 232: 8, 440: 22, 888: 37, 960: 60}


@pytest.mark.parametrize("c", CHANNELS)
def test_fixed_groups_gives_documented_g(c):
    g, note = GroupPolicy(groups=32).resolve(c)
    assert g == DOCUMENTED_G32[c]
    assert c % g == 0
    assert (note == "") == (g == 32)
    assert g == 1 or c // g >= 2  # never InstanceNorm


@pytest.mark.parametrize("c", CHANNELS)
def test_channels_per_group_gives_documented_g(c):
    g, note = GroupPolicy(groups=None, channels_per_group=16).resolve(c)
    assert g == DOCUMENTED_CPG16[c]
    assert c % g == 0
    assert (note == "") == (c // g == 16 and g >= 2)


def test_layernorm_fallback_only_when_nothing_else_divides():
    for c in CHANNELS:
        for policy in (GroupPolicy(groups=32), GroupPolicy(groups=None, channels_per_group=16)):
            g, note = policy.resolve(c)
            has_alternative = any(c % d == 0 and c // d >= 2 for d in range(2, c + 1))
            assert (g == 1) == (not has_alternative)
            if g == 1:
                assert "LayerNorm" in note


def test_fallbacks_are_errors_when_strict():
    with pytest.raises(GNSurgeonError, match="C=24"):
        GroupPolicy(groups=32, strict=True).resolve(24)
    assert GroupPolicy(groups=32, strict=True).resolve(64) == (32, "")


def test_instance_norm_only_when_asked_for():
    assert GroupPolicy(groups=32).resolve(32)[0] == 16
    assert GroupPolicy(groups=32, min_group_channels=1).resolve(32) == (32, "")
    assert GroupPolicy(groups=1).resolve(45) == (1, "")  # LayerNorm asked for explicitly


def test_larger_channel_floor_is_respected():
    g, _ = GroupPolicy(groups=32, min_group_channels=4).resolve(64)
    assert g == 16


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"groups": 32, "channels_per_group": 16}, "not both"),
        ({"groups": 0}, "positive integer"),
        ({"groups": 32, "min_group_channels": 0}, "positive integer"),
    ],
)
def test_bad_policies_are_rejected(kwargs, match):
    with pytest.raises(GNSurgeonError, match=match):
        GroupPolicy(**kwargs)


def test_one_policy_given_alone_is_that_policy_and_none_is_g32():
    """``GroupPolicy(channels_per_group=16)`` (the README's example) used to fail with "not both"
    because ``groups`` defaulted to 32."""
    assert GroupPolicy(channels_per_group=16).resolve(64) == (4, "")
    assert GroupPolicy(channels_per_group=16).groups is None
    assert GroupPolicy().groups == 32 and GroupPolicy(groups=None).groups == 32
