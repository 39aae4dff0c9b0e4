"""The A/B assignment and the holdout (pure): stable per client and mailing, shared by weight."""

from __future__ import annotations

from collections import Counter

from chalicelib.domain.variants import Variant, in_holdout, variant_of

AB = (Variant("A"), Variant("B"))


def test_a_client_gets_the_same_variant_and_holdout_every_time():
    first = [(variant_of("m1", f"c{n}", AB), in_holdout("m1", f"c{n}", 20)) for n in range(200)]
    again = [(variant_of("m1", f"c{n}", AB), in_holdout("m1", f"c{n}", 20)) for n in range(200)]
    assert first == again


def test_another_mailing_draws_its_own_assignment():
    one = [variant_of("m1", f"c{n}", AB) for n in range(200)]
    other = [variant_of("m2", f"c{n}", AB) for n in range(200)]
    assert one != other


def test_the_holdout_takes_about_its_share_and_none_at_zero():
    held = sum(in_holdout("m1", f"c{n}", 10) for n in range(10_000))
    assert 900 < held < 1100
    assert not any(in_holdout("m1", f"c{n}", 0) for n in range(1000))


def test_weights_share_the_clients():
    shares = Counter(
        variant_of("m1", f"c{n}", (Variant("A", 1), Variant("B", 2), Variant("C", 1)))
        for n in range(8000)
    )
    assert 1800 < shares[0] < 2200
    assert 3800 < shares[1] < 4200
    assert 1800 < shares[2] < 2200


def test_a_single_text_is_variant_zero():
    assert variant_of("m1", "c1", ()) == 0
    assert variant_of("m1", "c1", (Variant("only"),)) == 0
