"""``torusctl``: administer a torus cluster (mirrors the original's commands, inventory §2.3)."""

from __future__ import annotations

import click

from torus_core import __version__
from torus_core.cli.common import CliContext, build_context, config_options, handle_errors
from torus_core.plugins import make_plugin_manager


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@config_options
@click.version_option(__version__, prog_name="torusctl")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, **overrides: object) -> None:
    """Administer a torus cluster: format it, manage volumes, rings, peers and snapshots."""
    ctx.obj = build_context(config_path, **overrides)
    ctx.call_on_close(ctx.obj.close)


@cli.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def plugins_cmd(as_json: bool) -> None:
    """List plugins, their distributions and versions, what each registered, and load failures."""
    import json

    pm = make_plugin_manager()
    pm.collect_registries()
    infos = sorted(pm.plugin_info.values(), key=lambda i: (i.distribution, i.name))
    if as_json:
        click.echo(json.dumps([i.__dict__ for i in infos], indent=2))
        return
    for info in infos:
        status = f"FAILED: {info.error}" if info.error else ""
        click.echo(f"{info.name:<16} {info.distribution:<24} {info.version:<8} {status}")
        for kind, names in sorted(info.registered.items()):
            click.echo(f"    {kind}: {', '.join(names)}")


def get_ctx() -> CliContext:
    """The :class:`CliContext` of the running command."""
    obj = click.get_current_context().find_root().obj
    assert isinstance(obj, CliContext)
    return obj


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="torusctl")


if __name__ == "__main__":
    main()
