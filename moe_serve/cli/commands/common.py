"""What every `moe-serve` command shares: the Typer app, the console, option types, settings building.

The service commands' flags are made from their settings classes (settings_options), as vLLM makes its
flags from its config classes: one flag per field, named after it, its help the field's description.
Every flag has an environment variable twin with the MOE_SERVE_ prefix (e.g. --redis-url and
MOE_SERVE_REDIS_URL); a flag given on the command line wins.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import inspect
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import typer
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from rich.console import Console
from rich.markup import escape

from moe_serve.config import CommonSettings, PublicEndpointSettings, inherited_settings, is_secret
from moe_serve.runtime import eventloop
from moe_serve.runtime.errors import ConfigurationError
from moe_serve.runtime.eventloop import EventLoopName

app = typer.Typer(
    name="moe-serve",
    help="Distributed serving of Mixture-of-Experts layers over gRPC (KServe v2 API).",
    no_args_is_help=True,
    add_completion=False,
)
console = Console(stderr=True)
SettingsT = TypeVar("SettingsT", bound=BaseModel)
DISTRIBUTION = "moe-serve"


def _print_version(value: bool) -> None:
    if value:
        # the installed distribution's version, the one `pip show moe-serve` reports
        typer.echo(f"{DISTRIBUTION} {importlib.metadata.version(DISTRIBUTION)}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", is_eager=True, callback=_print_version, help="Print the version and exit.")
    ] = False,
) -> None:
    """Distributed serving of Mixture-of-Experts layers over gRPC (KServe v2 API)."""


def require_extra(command: str, extra: str, modules: tuple[str, ...]) -> None:
    """Exit 2 with a one-line hint when a module of an optional extra is not installed.

    Checked up front (find_spec imports nothing) so that a missing extra reads as what to install,
    not as a ModuleNotFoundError traceback minutes into a run.
    """
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        console.print(
            f"moe-serve {command} needs the {extra} extra (missing: {', '.join(missing)}): "
            f"pip install 'moe-serve[{extra}]'",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(2)


# flags of client commands (health, top) that also read their MOE_SERVE_ variables, so container
# health checks of internal services work unchanged when mutual TLS is switched on by environment;
# the service commands take theirs from the settings classes (settings_options)
CheckpointDir = Annotated[
    str | None,
    typer.Option(
        help="Hugging Face checkpoint: a directory (safetensors), or a Hub id org/name[@revision] fetched into the "
        "Hugging Face cache (config.json and safetensors only; HF_HOME, HF_HUB_OFFLINE apply)."
    ),
]
InternalTlsCa = Annotated[
    Path | None,
    typer.Option(
        envvar="MOE_SERVE_INTERNAL_TLS_CA", help="Mutual TLS between services: the internal CA certificate (PEM)."
    ),
]
InternalTlsCert = Annotated[
    Path | None, typer.Option(envvar="MOE_SERVE_INTERNAL_TLS_CERT", help="This service's internal certificate (PEM).")
]
InternalTlsKey = Annotated[
    Path | None,
    typer.Option(envvar="MOE_SERVE_INTERNAL_TLS_KEY", help="Private key of the internal certificate (PEM)."),
]
ClusterSecretFile = Annotated[
    Path | None,
    typer.Option(
        envvar="MOE_SERVE_CLUSTER_SECRET_FILE",
        help="File (mode 0600) holding the stack's cluster secret, which authenticates every internal call "
        "(or set MOE_SERVE_CLUSTER_SECRET; `moe-serve up` makes its own).",
    ),
]
InsecureInternal = Annotated[
    bool | None,
    typer.Option(
        "--insecure-internal",
        help="Debugging only: internal RPCs accept any caller, registry records are not authenticated.",
    ),
]


def internal_security_flags(
    ca: Path | None, cert: Path | None, key: Path | None, secret_file: Path | None, insecure: bool | None
) -> dict[str, Any]:
    return {
        "internal_tls_ca": ca,
        "internal_tls_cert": cert,
        "internal_tls_key": key,
        "cluster_secret_file": secret_file,
        "insecure_internal": insecure,
    }


def tool_credentials(
    ca: Path | None, cert: Path | None, key: Path | None, secret_file: Path | None, cluster_file: Path
) -> Any:
    """Credentials of a command-line tool calling internal services: the secret from
    MOE_SERVE_CLUSTER_SECRET, --cluster-secret-file, or the stack's cluster file (`moe-serve up`)."""
    from moe_serve.cli.cluster_commands import ClusterInfo
    from moe_serve.config import CommonSettings
    from moe_serve.runtime.security import ClusterCredentials

    if secret_file is None and cluster_file.is_file():
        secret_file = Path(ClusterInfo.read(cluster_file).secret_file or "") or None
    flags = internal_security_flags(ca, cert, key, secret_file, None)
    try:
        return ClusterCredentials.from_settings(build_settings(CommonSettings, **flags))
    except ValueError as error:
        console.print(f"[red]error[/red]: {error}")
        raise typer.Exit(2) from None


def settings_options(
    settings_class: type[SettingsT],
) -> Callable[[Callable[[SettingsT], None]], Callable[..., None]]:
    """Decorator: the command `run(settings)` as one with a flag per field of `settings_class`.

    A field `batch_window_ms` is `--batch-window-ms`; one in seconds drops its unit (`registry_ttl_s`:
    `--registry-ttl`); a bool is `--name/--no-name`; a field's json_schema_extra `cli_flags` adds
    spellings. The flags given (and the settings a parent process handed down, moe_serve.config.
    settings_json) override MOE_SERVE_* variables, which override the field's default. Secret fields
    have no flag: they come from the environment only."""

    def decorate(run: Callable[[SettingsT], None]) -> Callable[..., None]:
        parameters = [
            inspect.Parameter(
                name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=option(settings_class, name, field)
            )
            for name, field in settings_class.model_fields.items()
            if not is_secret(field)
        ]

        def command(**flags: Any) -> None:
            run(build_settings(settings_class, inherited_settings(), **flags))

        command.__name__, command.__qualname__ = run.__name__, run.__qualname__
        command.__doc__, command.__module__ = run.__doc__, run.__module__
        command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        command.__annotations__ = {parameter.name: parameter.annotation for parameter in parameters}
        return command

    return decorate


def flag_names(name: str, field: FieldInfo) -> list[str]:
    """The command-line spellings of a settings field, the first made from its name."""
    stem = name.removesuffix("_s").replace("_", "-")
    extra = (field.json_schema_extra or {}) if isinstance(field.json_schema_extra, dict) else {}
    return [f"--{stem}", *extra.get("cli_flags", [])]  # type: ignore[misc]


def option(settings_class: type[BaseModel], name: str, field: FieldInfo) -> Any:
    """The typer option of a settings field: `Annotated[type | None, typer.Option(...)]`, default None
    (unset: the environment or the field's default). Choices (Literal fields) are listed in --help and
    checked by pydantic, so that a wrong one is one line naming them, exit status 2."""
    value_type, choices = _flag_type(field.annotation)
    flags = flag_names(name, field)
    declarations = [f"{flags[0]}/--no-{flags[0][2:]}"] if value_type is bool else flags
    default = None if field.is_required() else field.get_default(call_default_factory=True)
    shown_default = "" if default is None else f" [default: {default}]"
    help_text = f"{field.description or ''} [env var: MOE_SERVE_{name.upper()}]{shown_default}"
    return Annotated[
        value_type | None,
        typer.Option(
            *declarations,
            help=escape(help_text.strip()),  # descriptions hold brackets (org/name[@revision]), not markup
            show_default=False,
            rich_help_panel=_panel(settings_class, name),
            **({"metavar": f"[{'|'.join(choices)}]"} if choices else {}),
        ),
    ]


def _panel(settings_class: type[BaseModel], name: str) -> str | None:
    """The --help panel of a field: the command's own settings first, then those every service shares."""
    declared_by = next(cls for cls in settings_class.__mro__ if name in inspect.get_annotations(cls))
    return {CommonSettings: "Every service", PublicEndpointSettings: "Public endpoint security"}.get(declared_by)


def _flag_type(annotation: Any) -> tuple[type, list[str]]:
    """The command-line type of a field (bool, int, float; str for the rest, which pydantic parses as it
    does an environment variable) and its choices when it has fixed ones."""
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) in (Union, types.UnionType):
        (annotation,) = [arg for arg in get_args(annotation) if arg is not type(None)]
        return _flag_type(annotation)
    if get_origin(annotation) is Literal:
        return str, [str(choice) for choice in get_args(annotation)]
    return (annotation if annotation in (bool, int, float) else str), []


def build_settings(settings_class: type[SettingsT], inherited: dict[str, Any] | None = None, **flags: Any) -> SettingsT:
    """Settings from the environment, overridden by the `inherited` ones (a parent's: every field,
    None included), overridden by the flags that were given (not None)."""
    given = {key: value for key, value in flags.items() if value is not None}
    try:
        return settings_class(**{**(inherited or {}), **given})
    except ValidationError as error:
        for problem in error.errors():
            field = ".".join(str(part) for part in problem["loc"]) or "settings"
            # a validator's own ValueError says what to do; pydantic's "Value error, " prefix adds nothing
            message = str(problem.get("ctx", {}).get("error") or problem["msg"])
            console.print(f"[red]invalid {field}[/red]: {message}", soft_wrap=True)
        raise typer.Exit(2) from None


@contextlib.contextmanager
def configuration_errors_reported() -> Iterator[None]:
    """A ConfigurationError becomes its message and exit code 1, never a stack trace."""
    try:
        yield
    except ConfigurationError as error:
        console.print(f"[red]error[/red]: {error}")
        raise typer.Exit(1) from None


def run_service(coroutine: Any, event_loop: EventLoopName = "auto") -> None:
    with configuration_errors_reported():
        eventloop.run(coroutine, event_loop)
