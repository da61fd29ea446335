"""The registry of unfamiliar-photo kinds (training/unfamiliar.py): one record per kind with its group
as data, and the committed release's reports still read under it."""
from __future__ import annotations

import json

import pytest

from training import unfamiliar


def test_every_kind_has_a_unique_name_and_one_known_group():
    names = [k.name for k in unfamiliar.KINDS]
    assert len(names) == len(set(names)) == len(unfamiliar.ALL_KINDS)
    assert {k.group for k in unfamiliar.KINDS} == set(unfamiliar.GROUPS)  # no unknown group, none empty
    assert sorted(n for g in unfamiliar.GROUPS for n in unfamiliar.kinds_in(g)) == sorted(names)
    assert {k.imitated_by for k in unfamiliar.KINDS} == {"", unfamiliar.COMPOSITES, unfamiliar.DRAWN}
    assert set(unfamiliar.FORMER_GROUP_NAMES.values()) < set(unfamiliar.GROUPS)
    with pytest.raises(KeyError, match="unknown group 'confirmation_2'; groups: tuning, other_pictures"):
        unfamiliar.kinds_in("confirmation_2")


def test_the_committed_reports_name_the_same_kinds_in_the_same_order_and_read_their_groups(release_model_dir):
    """The mixed night draws from the kinds' photos in report order, so the order is part of the figures."""
    trust = json.loads((release_model_dir / "trust.json").read_text())["unfamiliar_kinds"]
    assert list(trust) == list(unfamiliar.ALL_KINDS)
    against = set(unfamiliar.COMPOSITE_KINDS + unfamiliar.DRAWN_KINDS)  # the release is trained against both
    for kind, entry in trust.items():
        expected = unfamiliar.TRAINED_AGAINST if kind in against else unfamiliar.GROUP_OF[kind]
        assert unfamiliar.group_name(entry["group"]) == expected, kind
    metrics = json.loads((release_model_dir / "metrics.json").read_text())
    model = json.loads((release_model_dir / "model.json").read_text())
    for routed in (metrics["trust"]["unfamiliar_kinds_routed"], model["int8"]["trust"]["unfamiliar_kinds_routed"]):
        assert list(routed) == list(unfamiliar.ALL_KINDS)


def test_make_refuses_an_unknown_kind_and_an_empty_request():
    with pytest.raises(KeyError, match="unknown kind 'confirmation'"):
        unfamiliar.make("confirmation", 1)
    with pytest.raises(ValueError, match="at least 1"):
        unfamiliar.make("noise", 0)
    assert len(unfamiliar.make("noise", 3, seed=1)) == 3
