"""BEM Fleet: the library behind the Airflow pipelines. Importable and testable without Airflow."""

__version__ = "0.1.0"
