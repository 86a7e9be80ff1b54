import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spar_wire.errors import WireError
from spar_wire.feature_config import PRESETS, FeatureConfig, feature_preset

# Pinned so that an accidental change to a preset or to the hashing breaks loudly: every
# deployed model's manifest refers to these.
PINNED_HASHES = {
    "parking_lot_microphone": "dace08dddfa4ecdf",
    "parking_lot_geophone": "b1614c8eca678997",
    "ridgecrest_seismic": "a372d492084a2c0f",
    "har_imu": "971fab294e997d3d",
    "indoor_csi": "e841e31d59cfcbeb",
}

EXPECTED_SHAPES = {  # (image H, image W, m tokens, D)
    "parking_lot_microphone": (64, 64, 32, 128),
    "parking_lot_geophone": (32, 16, 16, 32),
    "ridgecrest_seismic": (120, 48, 30, 192),
    "har_imu": (48, 20, 16, 60),
    "indoor_csi": (32, 25, 20, 40),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_hash_is_pinned(name):
    assert PRESETS[name].hash == PINNED_HASHES[name]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_shapes(name):
    cfg = PRESETS[name]
    assert (*cfg.image_shape, cfg.n_tokens, cfg.token_dim) == EXPECTED_SHAPES[name]


def test_paper_defaults():
    assert PRESETS["parking_lot_microphone"].window_s == 2.0
    assert PRESETS["parking_lot_microphone"].transform == "logmel"
    assert PRESETS["parking_lot_geophone"].transform == "stft"
    seismic = PRESETS["ridgecrest_seismic"]
    assert (seismic.window_s, seismic.bandpass_hz, seismic.sample_rate_hz) == (30.72, (2.0, 35.0), 100)
    assert (PRESETS["har_imu"].window_s, PRESETS["har_imu"].sample_rate_hz) == (4.0, 50)


def test_hash_changes_with_every_field():
    base = PRESETS["parking_lot_geophone"]
    changes = {"hop": 20, "n_fft": 80, "patch_time": 2, "window_s": 4.0, "fmax_hz": 90.0,
               "power_floor_db": -150.0,
               "quant_mode": "fixed", "dynamic_range_db": 60.0, "detrend": False,
               "bandpass_hz": (1.0, 90.0), "quant_range_db": (-100.0, 0.0), "channels": 2}
    for name, value in changes.items():
        assert base.replace(**{name: value}).hash != base.hash, name
    assert base.replace().hash == base.hash


def test_dict_round_trip_keeps_hash():
    for cfg in PRESETS.values():
        again = FeatureConfig.from_dict(cfg.to_dict())
        assert again == cfg and again.hash == cfg.hash


@pytest.mark.parametrize("change, field", [
    ({"hop": 0}, "hop"),
    ({"hop": 2000}, "hop"),
    ({"transform": "wavelet"}, "transform"),
    ({"window_s": 0.03125}, "n_fft"),
    ({"window_s": 2.0001}, "window_s"),
    ({"fmax_hz": 20000.0}, "fmax_hz"),
    ({"bandpass_hz": (50.0, 10.0)}, "bandpass_hz"),
    ({"patch_freq": 1000}, "patch_freq"),
    ({"quant_mode": "auto"}, "quant_mode"),
    ({"quant_range_db": (10.0, -10.0)}, "quant_range_db"),
    ({"channels": True}, "channels"),
    ({"sample_rate_hz": float("nan")}, "sample_rate_hz"),
])
def test_invalid_values_name_the_field(change, field):
    data = {**PRESETS["parking_lot_microphone"].to_dict(), **change}
    with pytest.raises(WireError) as info:
        FeatureConfig.from_dict(data)
    assert f"'{field}'" in str(info.value)


def test_unknown_and_missing_fields():
    with pytest.raises(WireError, match="hopp"):
        FeatureConfig.from_dict({**PRESETS["har_imu"].to_dict(), "hopp": 3})
    with pytest.raises(WireError, match="sample_rate_hz"):
        FeatureConfig.from_dict({"channels": 1, "window_s": 1.0})


def test_unknown_preset_lists_known_ones():
    with pytest.raises(WireError, match="har_imu"):
        feature_preset("nope")


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        PRESETS["har_imu"].hop = 3


ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(), st.text(max_size=6),
    st.lists(st.one_of(st.floats(), st.integers(-5, 5), st.none(), st.text(max_size=3)), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@settings(max_examples=500, deadline=None)
@given(changes=st.dictionaries(st.sampled_from(sorted(FeatureConfig.__dataclass_fields__)),
                               ANY_VALUE, min_size=1, max_size=3))
def test_any_field_values_give_a_config_or_wire_error(changes):
    try:
        cfg = FeatureConfig.from_dict({**PRESETS["har_imu"].to_dict(), **changes})
    except WireError:
        return
    assert cfg.n_tokens >= 1 and cfg.token_dim >= 1 and len(cfg.hash) == 16
