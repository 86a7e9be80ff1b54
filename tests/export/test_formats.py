"""The formats table (export/formats.py) is the single source of artifact file names: the exporter
writes exactly the files it lists, the naming rules for user-named artifacts reproduce it, the CLI
help names every format, no other module of export/ spells a file name of its own, and
docs/formats.md holds exactly its Markdown."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from export import cli, exporter
from export import tensorrt_engine as te
from export.formats import (
    FORMATS,
    build_record_name,
    dynamic_name,
    engine_name,
    export_format,
    format_of_file,
    formats_markdown,
    int8_name,
    main,
    manifest_name,
    report_name,
)
from export.manifests import manifest_path_for
from tests.export.conftest import build_deploy_model, data_info

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "formats.md"
START, END = "<!-- formats:start -->", "<!-- formats:end -->"


@pytest.fixture
def classifier(tiny_window_set, monkeypatch):
    """``exporter.load_deployable`` answers a tiny one-head model trained on the tiny dataset's configs."""
    model = build_deploy_model(tiny_window_set, tasks=("classify",))
    monkeypatch.setattr(exporter, "load_deployable", lambda paths: (model, data_info(tiny_window_set)))
    return model


def test_the_exporter_writes_exactly_the_files_of_its_formats(classifier, tiny_parking_dataset, tmp_path):
    """Default (fused) attention: onnx + onnx-plain, each with manifest and parity report; plain
    attention: onnx alone. Nothing else lands in the folder."""
    both = exporter.export_checkpoints(["unused"], tmp_path / "fused", name="tiny", version="0.0.1",
                                       data=str(tiny_parking_dataset), max_windows=16)
    assert sorted(os.listdir(tmp_path / "fused")) == sorted(export_format("onnx").files
                                                            + export_format("onnx-plain").files)
    assert (both.onnx.name, both.manifest.name) == export_format("onnx").files[:2]
    assert (both.plain.name, both.plain_manifest.name) == export_format("onnx-plain").files[:2]
    exporter.export_checkpoints(["unused"], tmp_path / "plain", name="tiny", version="0.0.1",
                                data=str(tiny_parking_dataset), max_windows=16, attention="plain")
    assert sorted(os.listdir(tmp_path / "plain")) == sorted(export_format("onnx").files)


def test_the_naming_rules_reproduce_the_table():
    """``--out``-free quantize and engine builds name their files by rule; on the table's own sources
    the rules must give the table's names (and manifests, reports and build records likewise)."""
    for fmt in FORMATS:
        assert format_of_file(fmt.file) is fmt
        assert manifest_path_for(Path("m") / fmt.file).name == manifest_name(fmt.file) == fmt.manifest
        if fmt.report is not None:
            assert report_name(fmt.file) == fmt.report
    onnx, plain = export_format("onnx").file, export_format("onnx-plain").file
    assert int8_name(onnx) == export_format("onnx-int8").file
    assert int8_name(plain) == export_format("onnx-int8-plain").file
    assert dynamic_name(int8_name(onnx)) == export_format("onnx-int8-dynamic").file
    assert dynamic_name(int8_name(plain)) == export_format("onnx-int8-plain-dynamic").file
    assert engine_name(plain, "fp16") == export_format("engine-fp16").file
    assert engine_name(int8_name(plain), "int8") == export_format("engine-int8").file
    for name in ("engine-fp16", "engine-int8"):
        engine = export_format(name)
        assert te.build_info_path(Path("m") / engine.file).name == build_record_name(engine.file)
        assert engine.files == (engine.file, engine.manifest, engine.build_record)
    assert te.default_engine_path(Path("m") / plain, "fp16").name == export_format("engine-fp16").file
    # names outside the table
    assert manifest_name("student.onnx") == "student.manifest.json"
    assert report_name("auto.onnx") == "parity-auto.md"
    assert int8_name("student.onnx") == "student.int8.onnx"
    assert len({f.name for f in FORMATS}) == len({f.file for f in FORMATS}) == len(FORMATS)


def test_cli_help_names_every_format(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for fmt in FORMATS:
        assert f"  {fmt.name} " in text and fmt.file in text


def _code_strings(tree: ast.AST) -> list[str]:
    """Every string constant of a module except docstrings (f-string parts included)."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def test_no_other_export_module_spells_an_artifact_file_name():
    names = {name for fmt in FORMATS for name in fmt.files}
    found = {}
    for path in sorted((REPO / "export").glob("*.py")):
        if path.name == "formats.py":
            continue
        hits = sorted({n for s in _code_strings(ast.parse(path.read_text())) for n in names if n in s})
        if hits:
            found[path.name] = hits
    assert found == {}


def test_docs_formats_md_holds_the_rendered_table():
    text = DOC.read_text()
    assert text.count(START) == 1 and text.count(END) == 1, f"{DOC} needs one {START} and one {END}"
    between = text.split(START, 1)[1].split(END, 1)[0]
    assert between.strip("\n") == formats_markdown(), (
        f"{DOC} is out of date: put the output of `python -m export.formats --markdown` between the markers")


def test_python_m_export_formats_prints_the_markdown(capsys):
    assert main(["--markdown"]) == 0
    assert capsys.readouterr().out == formats_markdown() + "\n"
    done = subprocess.run([sys.executable, "-m", "export.formats", "--markdown"], cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=True)
    assert done.stdout == formats_markdown() + "\n"
