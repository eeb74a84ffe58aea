"""``torchcore fleet ...``: the fleet database's schema, nodes and tasks (docs/fleet.md).

Every fleet command reads the database alone, so it works from any node or from a laptop with
the task file (``-c``) and the URL: ``--database``, else ``$TORCHCORE_DATABASE_URL``, else the
file's ``settings.fleet.database``.  psycopg is imported by fleetdb on first use.
"""

import os

from torchcore import config, fleetdb, fleetspec
from torchcore.commands import common
from torchcore.errors import ConfigError, TorchcoreError


def register(subparsers):
    fleet = subparsers.add_parser(
        "fleet", help="the fleet database: its schema, the nodes, the tasks across nodes",
        description="The fleet database (settings.fleet): create or upgrade its schema, and see "
                    "the nodes and the tasks across the fleet.")
    sub = fleet.add_subparsers(dest="fleet_command", metavar="SUBCOMMAND")
    init = sub.add_parser("init", help="create or upgrade the fleet database's schema",
                          description="Create the schema in the fleet database, or apply the "
                                      "migrations it lacks; safe to run on many nodes at once.")
    add_database_options(init)
    init.set_defaults(func=cmd_init)
    fleet.set_defaults(func=lambda args: _usage(fleet))


def _usage(parser):
    parser.print_help()
    return common.EXIT_USAGE


def add_database_options(parser):
    common.add_config_option(parser)
    parser.add_argument("--database", metavar="URL", default=None,
                        help="the fleet database's libpq URL (default: $TORCHCORE_DATABASE_URL, "
                             "then settings.fleet.database of the task file)")
    common.add_json_option(parser)


def database_url(args):
    """The URL a fleet command uses, or ConfigError saying where to set one."""
    if getattr(args, "database", None):
        return args.database
    url = (os.environ.get(fleetspec.ENV_DATABASE) or "").strip()
    if url:
        return url
    path = common.task_file_path(args)
    try:
        settings = config.load_settings(path)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}; name the fleet database with "
                          f"--database or ${fleetspec.ENV_DATABASE}") from None
    if settings.fleet is None:
        raise ConfigError(f"{settings.path}: settings: fleet: not set; add settings.fleet.database, "
                          f"or name the database with --database or ${fleetspec.ENV_DATABASE}")
    return settings.fleet.database


def cmd_init(args):
    url = database_url(args)
    try:
        conn = fleetdb.connect(url)
    except fleetdb.FleetError as exc:
        raise TorchcoreError(str(exc)) from None
    with conn:
        before, after = fleetdb.migrate(conn, url)
    applied = [what for number, what, _ in fleetdb.MIGRATIONS if before < number <= after]
    if args.json:
        common.print_json({"database": fleetspec.redact(url), "before": before, "after": after,
                           "applied": applied})
    elif applied:
        print(f"fleet database {fleetspec.redact(url)}: schema version {before} -> {after} "
              f"({', '.join(applied)})")
    else:
        print(f"fleet database {fleetspec.redact(url)}: schema version {after}, up to date")
    return common.EXIT_OK
