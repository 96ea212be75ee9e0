"""The cluster's Airflow users, from the environment (FAB auth manager; airflow-init runs it).

`bem-fleet users sync` makes the metadata DB hold exactly what .env says:

- the admin (``BEM_FLEET_ADMIN_USERNAME``, default ``admin``) with role ``Admin`` and the password
  ``BEM_FLEET_ADMIN_PASSWORD``;
- the CI user (``BEM_FLEET_CI_USERNAME`` / ``BEM_FLEET_CI_PASSWORD``) with role ``bem_fleet_ci``,
  which may read and trigger ``bem_fleet`` and follow its runs, and nothing else.

Passwords come from the environment, never from a command line (where ``ps`` would show them,
as ``airflow users create --password`` does). Run again, it resets the passwords and roles to
.env's, so rotating a secret in .env and rerunning airflow-init takes effect.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from bem_tasks.fleet.runs import FLEET_DAG_ID

CI_ROLE = "bem_fleet_ci"
ADMIN_ROLE = "Admin"  # FAB's built-in role with every permission


def ci_permissions(dag_id: str = FLEET_DAG_ID) -> list[tuple[str, str]]:
    """(action, resource) pairs of the CI role.

    FAB asks for a DAG-level permission on top of each run-level one: creating a run of a DAG is
    "can_create on DAG Runs" *and* "can_edit on DAG:<id>"; reading one, the two "can_read". So the
    global run and task-instance permissions below reach only ``dag_id``, the one DAG the role
    may read and edit. can_edit also lets CI pause and unpause it (README: trigger a paused DAG,
    then unpause); it does not let it delete the DAG or clear, mark or delete task instances.
    """
    from airflow.providers.fab.www.security import permissions as p

    dag = p.resource_name(dag_id, p.RESOURCE_DAG)  # "DAG:bem_fleet"
    return [
        (p.ACTION_CAN_READ, dag),
        (p.ACTION_CAN_EDIT, dag),
        (p.ACTION_CAN_READ, p.RESOURCE_DAG_RUN),
        (p.ACTION_CAN_CREATE, p.RESOURCE_DAG_RUN),
        (p.ACTION_CAN_READ, p.RESOURCE_TASK_INSTANCE),
        # FAB gives every custom role the UI's home page whenever it syncs its roles; listed so
        # that a second sync finds the role as it left it.
        (p.ACTION_CAN_READ, p.RESOURCE_WEBSITE),
    ]


def wanted_users(env: Mapping[str, str]) -> list[tuple[str, str, str]]:
    """(username, password, role) of each user .env asks for; ValueError naming what is missing."""
    required = ["BEM_FLEET_ADMIN_PASSWORD", "BEM_FLEET_CI_USERNAME", "BEM_FLEET_CI_PASSWORD"]
    missing = [name for name in required if not env.get(name)]
    if missing:
        raise ValueError(f"empty required setting(s): {', '.join(missing)} (see .env.example)")
    admin = env.get("BEM_FLEET_ADMIN_USERNAME") or "admin"
    ci = env["BEM_FLEET_CI_USERNAME"]
    if ci == admin:
        raise ValueError(f"BEM_FLEET_CI_USERNAME must differ from the admin's ({admin!r})")
    return [
        (admin, env["BEM_FLEET_ADMIN_PASSWORD"], ADMIN_ROLE),
        (ci, env["BEM_FLEET_CI_PASSWORD"], CI_ROLE),
    ]


def sync_users(env: Mapping[str, str] | None = None) -> list[str]:
    """Create or update the CI role and the users of ``wanted_users``; one line per action.

    Needs AIRFLOW__CORE__AUTH_MANAGER set to FAB's and a migrated metadata DB (FAB's tables are
    created by ``airflow db migrate`` when FAB is the auth manager).
    """
    users = wanted_users(os.environ if env is None else env)
    from airflow.providers.fab.auth_manager.cli_commands.utils import get_application_builder

    actions = []
    with get_application_builder() as appbuilder:
        sm: Any = appbuilder.sm
        role = sm.add_role(CI_ROLE)  # returns the existing one if there is one
        wanted = {sm.create_permission(action, resource) for action, resource in ci_permissions()}
        # Exactly these: a permission added by hand in the UI is taken away again.
        if set(role.permissions) != wanted:
            role.permissions = sorted(wanted, key=lambda perm: perm.id)
            sm.session.merge(role)
            sm.session.commit()
            actions.append(f"role {CI_ROLE}: permissions set ({len(wanted)})")
        for username, password, role_name in users:
            user_role = sm.find_role(role_name)
            if user_role is None:
                raise RuntimeError(f"FAB role {role_name!r} is missing: is the DB migrated?")
            user = sm.find_user(username=username)
            if user is None:
                created = sm.add_user(
                    username, username, "bem-fleet", f"{username}@localhost", user_role, password
                )
                if not created:
                    raise RuntimeError(f"could not create user {username!r} (see the log above)")
                actions.append(f"user {username}: created with role {role_name}")
                continue
            user.roles = [user_role]
            user.active = True
            if not sm.update_user(user) or not sm.reset_password(user.id, password):
                raise RuntimeError(f"could not update user {username!r} (see the log above)")
            actions.append(f"user {username}: password and role {role_name} reset from .env")
    return actions
