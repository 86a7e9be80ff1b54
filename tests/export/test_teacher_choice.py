"""Choosing the shipped teacher between frozen heads and full fine-tuning by validation metrics."""

from __future__ import annotations

import pytest

from export.errors import ExportError
from export.teacher_choice import Candidate, choice_markdown, choose, parse_candidate, task_error


def cand(name, acc, mse):
    return Candidate(name, (), {"classify": {"accuracy": acc}, "localize": {"mse": mse, "mean_distance": 1.0}})


def test_the_better_candidate_on_both_tasks_wins():
    winner, scores = choose([cand("frozen", 0.90, 40.0), cand("full", 0.99, 30.0)])
    assert winner.name == "full" and scores["full"] == 0.0 and scores["frozen"] > 0


def test_ratios_not_raw_differences_decide():
    # ten times fewer classification errors outweighs 20 % more localization error
    winner, _ = choose([cand("a", 0.99, 36.0), cand("b", 0.90, 30.0)])
    assert winner.name == "a"


def test_perfect_accuracy_stays_finite_and_mismatched_tasks_refused():
    assert task_error("classify", {"accuracy": 1.0}) > 0
    with pytest.raises(ExportError, match="different tasks"):
        choose([cand("a", 0.9, 1.0), Candidate("b", (), {"classify": {"accuracy": 0.9}})])
    with pytest.raises(ExportError, match="NAME=DIR"):
        parse_candidate("frozen")


def test_report_marks_the_choice():
    cands = [cand("frozen", 0.90, 40.0), cand("full", 0.99, 30.0)]
    winner, scores = choose(cands)
    text = choice_markdown(cands, winner, scores)
    assert "| full (chosen) |" in text and "| frozen |" in text


def test_hypocentre_candidates_are_chosen_by_mse_and_reported_in_km():
    """The seismic model's teacher: one quake task, metres in the checkpoints, km in the report."""
    def quake(name, mean_m, mse):
        return Candidate(name, (), {"quake": {"mse": mse, "hypocentre_mean": mean_m, "epicentral_mean": mean_m * 0.8,
                                              "depth_mean": mean_m * 0.4}})

    cands = [quake("frozen", 9000.0, 1.2e8), quake("full", 6000.0, 6.0e7)]
    winner, scores = choose(cands)
    assert winner.name == "full" and scores["frozen"] == pytest.approx(0.693, abs=0.01)  # log(2)
    text = choice_markdown(cands, winner, scores)
    assert "hypocentre mean 6.00 km (epicentral 4.80, depth 2.40)" in text and "| full (chosen) |" in text
