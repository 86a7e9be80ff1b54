from pathlib import Path

import numpy as np
import pytest
from scipy.io import wavfile

from node_firmware_sim.errors import NodeError
from node_firmware_sim.scenarios.recording_replay import load_recordings
from spar_wire.site_layout import load_site_layout


def write_recordings(tmp_path, entries):
    lines = []
    for entry in entries:
        lines.append("[[recordings]]")
        lines += [f'{k} = {v!r}'.replace("'", '"') if isinstance(v, str) else f"{k} = {v}"
                  for k, v in entry.items()]
    path = tmp_path / "recordings.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_wav_is_resampled_and_cut_into_windows(tmp_path, parking_lot):
    rate, seconds, tone = 8000, 5.0, 1000.0
    t = np.arange(int(rate * seconds)) / rate
    wavfile.write(tmp_path / "n01.wav", rate, (0.5 * np.sin(2 * np.pi * tone * t) * 32767).astype(np.int16))
    source = load_recordings(write_recordings(tmp_path, [
        {"node": "n01", "modality": "microphone", "path": "n01.wav"}]), parking_lot)
    assert source.windows == 2  # 5 s -> two whole 2 s windows
    window = source.window(1)
    samples = window.signals[("n01", "microphone")]
    assert samples.shape == (1, 32000)  # 16 kHz now
    spectrum = np.abs(np.fft.rfft(samples[0]))
    peak_hz = np.argmax(spectrum) * 16000 / samples.shape[1]
    assert peak_hz == pytest.approx(tone, abs=1.0)
    assert np.max(np.abs(samples)) == pytest.approx(0.5, abs=0.02)
    assert ("n02", "microphone") not in window.signals  # no recording -> missing trace
    assert window.truth.label == -1
    with pytest.raises(NodeError, match="past the end"):
        source.window(2)


def test_miniseed_components_are_ordered_and_resampled(tmp_path):
    import obspy  # in the dev extras; a missing obspy is a failure, not a skip

    layout = load_site_layout("configs/sites/ridgecrest_like.toml")
    rate = 200.0
    n = int(rate * 70)
    traces = []
    for i, comp in enumerate("ZNE"):  # stored in another order than E, N, Z
        t = np.arange(n) / rate
        data = np.sin(2 * np.pi * (2 + 3 * i) * t).astype(np.float64)  # Z 2 Hz, N 5 Hz, E 8 Hz
        traces.append(obspy.Trace(data=data, header={"network": "CI", "station": "CLC",
                                                     "channel": f"HH{comp}", "sampling_rate": rate,
                                                     "starttime": obspy.UTCDateTime(2019, 7, 6)}))
    obspy.Stream(traces).write(str(tmp_path / "clc.mseed"), format="MSEED")
    source = load_recordings(write_recordings(tmp_path, [
        {"node": "CLC", "modality": "seismometer", "path": "clc.mseed"}]), layout)
    assert source.windows == 2  # 70 s -> two 30.72 s windows
    samples = source.window(0).signals[("CLC", "seismometer")]
    assert samples.shape == (3, 3072)  # 100 Hz
    peaks = [np.argmax(np.abs(np.fft.rfft(ch))) * 100 / 3072 for ch in samples]
    assert peaks == pytest.approx([8.0, 5.0, 2.0], abs=0.1)  # E, N, Z


@pytest.mark.parametrize("entry, fragment", [
    ({"node": "n01", "modality": "microphone", "path": "missing.wav"}, "does not exist"),
    ({"node": "n99", "modality": "microphone", "path": "x.wav"}, "n99"),
    ({"node": "n01", "modality": "lidar", "path": "x.wav"}, "lidar"),
    ({"node": "n01", "modality": "microphone", "path": "x.txt"}, "unknown format"),
    ({"node": "n01", "modality": "microphone"}, "required"),
    ({"node": "n01", "modality": "microphone", "path": "x.wav", "gain": 2}, "unknown field"),
    ({"node": "n01", "modality": "microphone", "path": "stereo.wav"}, "channel"),
    ({"node": "n01", "modality": "microphone", "path": "short.wav"}, "shorter than one"),
])
def test_bad_recordings(tmp_path, parking_lot, entry, fragment):
    wavfile.write(tmp_path / "x.wav", 16000, np.zeros(40000, np.int16))
    (tmp_path / "x.txt").write_text("hello")
    wavfile.write(tmp_path / "stereo.wav", 16000, np.zeros((40000, 2), np.int16))
    wavfile.write(tmp_path / "short.wav", 16000, np.zeros(100, np.int16))
    with pytest.raises(NodeError, match=fragment):
        load_recordings(write_recordings(tmp_path, [entry]), parking_lot)


def test_a_replay_ends_with_its_recordings_and_nodes_without_one_send_nothing(tmp_path, parking_lot):
    """Recordings for 2 of the 8 nodes (microphone only), a trial asked for longer than they last:
    the replay stops at the end of the shortest recording, the other nodes send nothing and are
    counted as missing traces, and no node's statistics are missing (this raised KeyError)."""
    from node_firmware_sim.field_runner import FieldConfig, SourceSpec, run_field

    rate = 16000
    for node, seconds in (("n01", 9.0), ("n02", 5.0)):
        t = np.arange(int(rate * seconds)) / rate
        wavfile.write(tmp_path / f"{node}.wav", rate, (0.3 * np.sin(2 * np.pi * 900 * t) * 32767).astype(np.int16))
    path = write_recordings(tmp_path, [{"node": n, "modality": "microphone", "path": f"{n}.wav"}
                                       for n in ("n01", "n02")])
    summary = run_field(FieldConfig(layout=parking_lot, source=SourceSpec(recordings=str(path)), duration_s=60.0))
    assert summary.windows == 2  # 5 s of n02 -> two whole 2 s windows, not the 30 asked for
    assert summary.nodes["n01"].messages == summary.nodes["n02"].messages == 2
    for node in parking_lot.node_ids[2:]:
        assert summary.nodes[node].messages == 0 and summary.nodes[node].link.lost == 0
        assert summary.nodes[node].missing_traces == 2 * len(parking_lot.modalities)
    text = summary.format_table()
    assert "ended with the recordings after 2 of 30 windows" in text and "sent nothing" in text and "n08" in text


def obspy_file(relative: str):
    from node_firmware_sim.obspy_recordings import obspy_folder

    return obspy_folder() / relative


def test_a_vertical_only_station_replays_into_three_channels_with_flat_horizontals(tmp_path, caplog):
    layout = load_site_layout("configs/sites/ridgecrest_like.toml")
    path = write_recordings(tmp_path, [{"node": "SRT", "modality": "seismometer",
                                        "path": str(obspy_file("io/mseed/tests/data/test.mseed"))}])
    with caplog.at_level("WARNING"):
        source = load_recordings(path, layout)
    samples = source.window(0).signals[("SRT", "seismometer")]
    assert samples.shape == (3, 3072)  # 40 Hz resampled to the site's 100 Hz
    assert not samples[0].any() and not samples[1].any() and samples[2].std() > 0  # E, N flat; Z recorded
    assert source.absent_components == {("SRT", "seismometer"): "EN"}
    assert any("E, N not in test.mseed" in r.getMessage() for r in caplog.records)


def test_a_one_channel_modality_takes_the_station_s_only_component(tmp_path):
    site = tmp_path / "vertical.toml"
    site.write_text(Path("configs/sites/ridgecrest_like.toml").read_text().replace("channels = 3", "channels = 1"))
    layout = load_site_layout(site)
    path = write_recordings(tmp_path, [{"node": "WBM", "modality": "seismometer",
                                        "path": str(obspy_file("io/mseed/tests/data/timingquality.mseed"))}])
    source = load_recordings(path, layout)  # an east component only: no "Z" needed for one channel
    assert source.window(0).signals[("WBM", "seismometer")].shape == (1, 3072)
    assert source.absent_components == {}


def test_a_corrupt_last_record_warns_once_and_the_rest_replays(tmp_path, caplog):
    layout = load_site_layout("configs/sites/ridgecrest_like.toml")
    path = write_recordings(tmp_path, [{"node": "TOW2", "modality": "seismometer", "components": "Z",
                                        "path": str(obspy_file("io/mseed/tests/data/brokenlastrecord.mseed"))}])
    with pytest.raises(NodeError, match="give 1 channel"):  # "Z" alone cannot fill a three-channel modality
        load_recordings(path, layout)
    path = write_recordings(tmp_path, [{"node": "TOW2", "modality": "seismometer",
                                        "path": str(obspy_file("io/mseed/tests/data/brokenlastrecord.mseed"))}])
    with caplog.at_level("WARNING"):
        source = load_recordings(path, layout)
    corrupt = [r for r in caplog.records if "unreadable part" in r.getMessage()]
    assert len(corrupt) == 1 and "brokenlastrecord.mseed" in corrupt[0].getMessage()
    assert source.windows == 4  # the 149.5 s that could be read: four whole 30.72 s windows
    assert any("unreadable" in note for note in source.notes)
