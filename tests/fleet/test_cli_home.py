"""`bem-fleet status` / `pools sync` read the metadata DB that `make run` used."""

from __future__ import annotations

from pathlib import Path

from bem_tasks.cli import use_embedded_airflow_home


def test_unset_home_points_at_the_embedded_engine_once_it_exists(tmp_path: Path) -> None:
    environ: dict[str, str] = {}
    assert use_embedded_airflow_home(tmp_path, environ) is None  # `make run` never ran here
    assert environ == {}
    (tmp_path / ".airflow").mkdir()
    (tmp_path / ".airflow" / "airflow.cfg").write_text("[core]\n")
    assert use_embedded_airflow_home(tmp_path, environ) == str(tmp_path / ".airflow")
    assert environ == {"AIRFLOW_HOME": str(tmp_path / ".airflow")}


def test_a_home_set_by_the_shell_wins(tmp_path: Path) -> None:
    (tmp_path / ".airflow").mkdir()
    (tmp_path / ".airflow" / "airflow.cfg").write_text("[core]\n")
    environ = {"AIRFLOW_HOME": "/opt/airflow"}
    assert use_embedded_airflow_home(tmp_path, environ) is None
    assert environ == {"AIRFLOW_HOME": "/opt/airflow"}
