"""`bem-fleet users sync`'s reading of .env (the FAB side runs for real in tests/deploy/test_fab_auth.py)."""

from __future__ import annotations

import pytest

from bem_tasks.fleet.users import ADMIN_ROLE, CI_ROLE, ci_permissions, wanted_users

ENV = {"BEM_FLEET_ADMIN_PASSWORD": "a", "BEM_FLEET_CI_USERNAME": "ci", "BEM_FLEET_CI_PASSWORD": "c"}


def test_the_admin_and_the_ci_user_come_from_the_environment() -> None:
    assert wanted_users(ENV) == [("admin", "a", ADMIN_ROLE), ("ci", "c", CI_ROLE)]
    named = wanted_users({**ENV, "BEM_FLEET_ADMIN_USERNAME": "root"})
    assert named[0] == ("root", "a", ADMIN_ROLE)


@pytest.mark.parametrize("name", sorted(ENV))
def test_every_secret_is_required(name: str) -> None:
    with pytest.raises(ValueError, match=f"empty required setting.*{name}"):
        wanted_users({**ENV, name: ""})


def test_the_ci_user_is_not_the_admin() -> None:
    with pytest.raises(ValueError, match="must differ"):
        wanted_users({**ENV, "BEM_FLEET_CI_USERNAME": "admin"})


def test_the_ci_role_reaches_one_dag_only() -> None:
    perms = ci_permissions()
    dag_resources = {r for _, r in perms if r.startswith("DAG")}
    # Per-DAG permission only on bem_fleet; the run/task-instance ones are global resource
    # types that FAB combines with the DAG's own permission.
    assert {r for r in dag_resources if ":" in r} == {"DAG:bem_fleet"}
    assert ("can_edit", "DAG:bem_fleet") in perms and ("can_create", "DAG Runs") in perms
    assert not any(a == "can_delete" for a, _ in perms)
    assert ("can_read", "DAGs") not in perms  # not every DAG
