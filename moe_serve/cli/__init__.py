"""The `moe-serve` command line and what its commands run.

- `main`: the Typer app and `main()`; `commands/`: the commands, one module per help panel;
- back-ends of the longer commands: `stack_command` (`up`, `workers`), `cluster_commands` (`scale`,
  `status`), `infer_command` (`infer`), `top` (`top`), `demo` (the built-in demo checkpoint).

This is the composition root: the one place that names the services (gateway, router_service,
expert_service) and hands them to the core (e.g. the worker actor class to `moe_serve.cluster`).
"""

from __future__ import annotations


def main() -> None:
    """The `moe-serve` console script (pyproject's entry point `moe_serve.cli:main`, kept stable so
    installed scripts keep working). Imported here, not at the top: importing a back-end such as
    `moe_serve.cli.demo` does not build the whole command line."""
    from moe_serve.cli.main import main as run_command_line

    run_command_line()
