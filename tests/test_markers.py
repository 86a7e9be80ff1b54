"""The markers `make test` and `-m` selections rely on."""


def test_every_test_that_starts_a_broker_carries_the_mosquitto_marker(request):
    """tests/conftest.py marks each user of the ``mosquitto`` fixture, so ``-m "not mosquitto"``
    leaves out every test that needs a broker (the check covers the tests collected with this one)."""
    users = [item for item in request.session.items if "mosquitto" in getattr(item, "fixturenames", ())]
    assert all(item.get_closest_marker("mosquitto") is not None for item in users)
