"""Widget wrappers: the control is built over the static plot function; guarded import falls back clearly."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402

from fdistill_lab.gaussian1d import widgets


def test_static_fit_and_control():
    fit = widgets.show_mode_seeking_fit("rkl", 4.0, 0.5, steps=20)
    assert fit.divergence == "rkl" and len(fit.mean) == 21
    control = widgets.mode_seeking_widget("jensen-shannon", 4.0, 0.8, steps=5)
    assert control.children[0].value == "js" and control.children[2].value == 0.8
    heavy = widgets.mode_seeking_widget("js", 4.0, 0.97, steps=5)  # the notebook accepts weights up to < 1
    assert heavy.children[2].value == 0.97  # shown as given, not clamped to the slider's range


def test_bad_divergence_and_missing_ipywidgets(monkeypatch, capsys):
    with pytest.raises(ValueError, match="paper divergences"):
        widgets.mode_seeking_widget("pearson")
    with pytest.raises(ValueError, match="unknown divergence"):
        widgets.mode_seeking_widget("nope")
    monkeypatch.setattr(widgets, "_ipywidgets", lambda: None)
    assert widgets.mode_seeking_widget("js") is None
    assert "ipywidgets is not installed" in capsys.readouterr().out
