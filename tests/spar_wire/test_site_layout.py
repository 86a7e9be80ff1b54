import copy
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spar_wire.errors import WireError
from spar_wire.site_layout import load_site_layout, parse_site_layout

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

SITES = Path(__file__).resolve().parents[2] / "configs" / "sites"


def test_parking_lot():
    site = load_site_layout(SITES / "parking_lot.toml")
    assert site.site_id == "parking_lot" and len(site.nodes) == 8 and site.position_dim == 2
    assert site.modalities["microphone"].sample_rate_hz == 16000
    assert site.modalities["geophone"].sample_rate_hz == 200
    assert all(n.modalities == ("microphone", "geophone") for n in site.nodes)
    assert all(n.description for n in site.nodes)
    assert site.positions().shape == (8, 2)


def test_ridgecrest_like():
    site = load_site_layout(SITES / "ridgecrest_like.toml")
    assert len(site.nodes) == 16 and site.position_dim == 3
    spec = site.modalities["seismometer"]
    assert (spec.sample_rate_hz, spec.channels, spec.features.window_s) == (100, 3, 30.72)
    assert spec.features.bandpass_hz == (2.0, 35.0)
    extent = np.ptp(site.positions()[:, :2], axis=0)
    assert extent.min() > 50_000  # a regional network: tens of kilometres across


def test_body_har():
    site = load_site_layout(SITES / "body_har.toml")
    assert len(site.nodes) == 6
    assert set(site.modalities) == {"acc", "gyro", "mag"}
    assert all(m.sample_rate_hz == 50 and m.channels == 3 for m in site.modalities.values())
    assert site.node("thigh").modalities == ("acc", "gyro", "mag")


def test_feature_hashes_follow_the_config():
    site = load_site_layout(SITES / "parking_lot.toml")
    assert site.feature_hashes()["microphone"] == site.modalities["microphone"].features.hash


def base_layout():
    return tomllib.loads((SITES / "parking_lot.toml").read_text())


def mutate(path_and_value):
    data = base_layout()
    path, value = path_and_value
    target = data
    for key in path[:-1]:
        target = target[key]
    if value is DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return data


DELETE = object()


@pytest.mark.parametrize("change, must_mention", [
    ((("nodes", 2, "position"), [1.0]), ["node 'n03'", "nodes[2]", "'position'"]),
    ((("nodes", 2, "position"), [1.0, 2.0, 3.0]), ["node 'n03'", "'position'", "same dimension"]),
    ((("nodes", 1, "position"), DELETE), ["node 'n02'", "'position'"]),
    ((("nodes", 4, "modalities"), ["microphone", "lidar"]), ["node 'n05'", "'modalities'", "lidar"]),
    ((("nodes", 4, "modalities"), []), ["node 'n05'", "'modalities'"]),
    ((("nodes", 3, "id"), "n01"), ["node 'n01'", "nodes[3]", "duplicate"]),
    ((("nodes", 3, "id"), "n 4"), ["nodes[3]", "'id'"]),
    ((("nodes", 3, "id"), "aggregator"), ["nodes[3]", "reserved"]),
    ((("nodes", 3, "id"), "aggregator-results"), ["nodes[3]", "reserved"]),
    ((("nodes", 0, "height"), 3), ["node 'n01'", "'height'", "unknown"]),
    ((("modalities", "microphone", "preset"), "nope"), ["modality 'microphone'", "'preset'"]),
    ((("modalities", "microphone", "hop"), 0), ["modality 'microphone'", "'hop'"]),
    ((("modalities", "geophone", "patch_freq"), 999), ["modality 'geophone'", "'patch_freq'"]),
    ((("modalities", "geophone", "colour"), "red"), ["modality 'geophone'", "colour"]),
    ((("site", "id"), "parking lot"), ["[site]", "'id'"]),
    ((("site", "frame"), DELETE), ["[site]", "'frame'"]),
    ((("nodes",), []), ["[[nodes]]"]),
    ((("modalities",), {}), ["[modalities]"]),
])
def test_errors_name_file_node_and_field(tmp_path, change, must_mention):
    import json

    path = tmp_path / "broken.toml"
    data = mutate(change)
    # Write it back as TOML through JSON-compatible inline tables (tomllib has no writer).
    path.write_text(_to_toml(data))
    with pytest.raises(WireError) as info:
        load_site_layout(path)
    message = str(info.value)
    assert info.value.reason == "bad_layout"
    assert str(path) in message
    for fragment in must_mention:
        assert fragment in message, (fragment, message, json.dumps(change, default=str))


def _to_toml(data) -> str:
    def value(v):
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f'"{k}" = {value(x)}' for k, x in v.items()) + "}"
        raise TypeError(v)

    return "\n".join(f'"{k}" = {value(v)}' for k, v in data.items()) + "\n"


def test_file_problems(tmp_path):
    with pytest.raises(WireError, match="cannot read"):
        load_site_layout(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[site\nid=")
    with pytest.raises(WireError, match="invalid TOML"):
        load_site_layout(bad)
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(WireError, match="UTF-8"):
        load_site_layout(binary)


def test_unknown_node_lookup():
    site = parse_site_layout(base_layout(), source="x.toml")
    with pytest.raises(WireError, match="n99"):
        site.node("n99")


VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                      lambda inner: (st.lists(inner, max_size=3)
                                     | st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=10)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_mutation_gives_a_layout_or_wire_error(data):
    layout = copy.deepcopy(base_layout())
    section = data.draw(st.sampled_from(["site", "modalities", "nodes", "root"]))
    if section == "root":
        layout[data.draw(st.text(max_size=6))] = data.draw(VALUES)
    elif section == "nodes":
        node = layout["nodes"][data.draw(st.integers(0, 7))]
        key = data.draw(st.sampled_from(["id", "position", "modalities", "description", "x"]))
        node[key] = data.draw(VALUES)
    elif section == "modalities":
        table = layout["modalities"]["microphone"]
        table[data.draw(st.sampled_from(["preset", "hop", "n_fft", "bandpass_hz", "transform",
                                         "channels", "window_s", "quant_range_db"]))] = data.draw(VALUES)
    else:
        layout["site"][data.draw(st.sampled_from(["id", "frame", "description"]))] = data.draw(VALUES)
    try:
        parse_site_layout(layout)
    except WireError:
        pass


def test_window_length_is_one_per_site_and_mismatches_are_refused():
    import dataclasses

    from spar_wire.feature_config import PRESETS

    layout = load_site_layout(Path(__file__).resolve().parents[2] / "configs" / "sites" / "ridgecrest_like.toml")
    assert layout.window_s() == 30.72
    name, spec = next(iter(layout.modalities.items()))
    short = dataclasses.replace(spec, features=PRESETS["parking_lot_microphone"])  # a 2 s window
    mixed = dataclasses.replace(layout, modalities={**layout.modalities, "extra": short})
    assert mixed.window_s((name,)) == 30.72
    assert mixed.window_s(("extra",)) == 2.0
    with pytest.raises(WireError, match="different window lengths"):
        mixed.window_s()
    with pytest.raises(WireError, match="no modality"):
        layout.window_s(("nope",))
