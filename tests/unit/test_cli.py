"""The command line: check-config names every problem; render prints a valid transaction."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from enforcer.cli import main

SECRET = "whsec_" + base64.b64encode(b"s" * 32).decode()


def _setup(tmp_path: Path, config_extra: str = "", listing: str | None = None) -> Path:
    (tmp_path / "secret").write_text(SECRET + "\n")
    (tmp_path / "list.yaml").write_text(listing if listing is not None else
                                        "subscribers:\n  - {id: C-1, addresses: [100.64.0.10, '2001:db8:1::/56']}\n")
    config = tmp_path / "config.yaml"
    config.write_text(f"state_dir: {tmp_path}/state\nsubscribers:\n  source: list.yaml\n"
                      f"api:\n  webhook_secret_file: {tmp_path}/secret\n{config_extra}")
    return config


def test_check_config_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--config", str(_setup(tmp_path))]) == 0
    assert "OK" in capsys.readouterr().out


def test_check_config_names_every_config_error_by_key_and_line(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    config = _setup(tmp_path, "portal:\n  url: ftp://x\n  lisen: 1\ngateway:\n  table: 'bad name'\n")
    assert main(["check-config", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"portal.url ({config}:7)" in err
    assert f"portal.lisen ({config}:8)" in err and "unknown key" in err
    assert f"gateway.table ({config}:10)" in err


def test_check_config_names_list_lines_and_secret_problems(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    config = _setup(tmp_path, listing="subscribers:\n  - id: C-1\n    addresses: [100.64.0.300]\n")
    (tmp_path / "secret").write_text("not-a-secret\n")
    assert main(["check-config", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path}/list.yaml:2" in err and "100.64.0.300" in err
    assert "whsec_" in err


def test_config_path_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("WALLED_GARDEN_CONFIG", str(_setup(tmp_path)))
    assert main(["check-config"]) == 0


def test_render_prints_one_atomic_transaction(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render", "--config", str(_setup(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert out.startswith("add table inet walled_garden\ndelete table inet walled_garden\n")
    assert "add element inet walled_garden portal4_32 { 100.64.0.10 }" in out
    assert "add element inet walled_garden portal6_56 { 2001:db8:1:: }" in out
    assert "\t\tip saddr @portal4_32 goto garden\n" in out
    assert "vmap" not in out and "mode4_32" not in out, "the mode view is not part of the ruleset"
    assert not (tmp_path / "state").exists(), "render must touch nothing"


def test_check_config_reports_portal_text_overrides(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _setup(tmp_path, "portal:\n  texts:\n    cs:\n      heading_restriced: Pozor\n")
    assert main(["check-config", "--config", str(config)]) == 1
    assert "portal.texts.cs.heading_restriced" in capsys.readouterr().err
