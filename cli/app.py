"""The `mmrec` command line. Each command lives in its own module; heavy imports (torch, dask) happen
inside the commands that need them, so `mmrec inspect` answers without loading torch."""

from __future__ import annotations

import re
from typing import Optional

from . import interrupts

if interrupts.launched_as_command():  # before the heavy imports: a Ctrl-C during them is one line too
    interrupts.install()

import typer  # noqa: E402
from typer.core import TyperArgument, TyperCommand, TyperGroup

from . import convert_cmd, demo_cmd, distill_cmd, finetune_cmd, inspect_cmd, plan_cmd, verify_cmd  # noqa: E402

_HYPHEN = "\u2011"  # a non-breaking hyphen while help is wrapped; back to "-" in the text printed


def _keep_whole(text: str) -> str:
    return re.sub(r"(?<=\w)-(?=\w)", _HYPHEN, text)


class _Formatter(typer.Context.formatter_class):
    """click's help formatter, except that wrapping never breaks a line inside a hyphenated word: an option
    name (`--seq-len`), a command (`shard-convert`) or a default (`demo-out`) stays whole at any width."""

    def write_text(self, text: str) -> None:
        super().write_text(_keep_whole(text))

    def write_dl(self, rows, *args, **kwargs) -> None:
        super().write_dl([(first, _keep_whole(second)) for first, second in rows], *args, **kwargs)

    def getvalue(self) -> str:
        return super().getvalue().replace(_HYPHEN, "-")


class _Context(typer.Context):
    formatter_class = _Formatter


class _Group(TyperGroup):
    context_class = _Context


class _Command(TyperCommand):
    """Help in the classic click form, whatever the typer version's own rendering: an argument is named by
    its metavar or its name in capitals, in the usage line (`mmrec verify [OPTIONS] OUTPUT`, not
    `{output}`) and in the Arguments section (`OUTPUT  help`, not `output <path>  help`), and the command
    list shows each command's whole first sentence, wrapped, instead of cutting it at 45 characters."""

    context_class = _Context

    @staticmethod
    def _argument_name(param: TyperArgument) -> str:
        return (param.metavar or (param.name or "").upper()) + ("..." if param.nargs != 1 else "")

    def collect_usage_pieces(self, ctx: typer.Context) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                name = self._argument_name(param)
                pieces.append(name if param.required else f"[{name}]")
            else:
                pieces.extend(param.get_usage_pieces(ctx))
        return pieces

    def format_options(self, ctx: typer.Context, formatter) -> None:
        arguments, options = [], []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if isinstance(param, TyperArgument):  # `DIR  help`, not `output <path>  help`
                arguments.append((self._argument_name(param), record[1]))
            else:
                options.append(record)
        for title, rows in (("Arguments", arguments), ("Options", options)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)

    def get_short_help_str(self, limit: int = 45) -> str:
        return super().get_short_help_str(limit=10_000)


# rich_markup_mode=None: click's plain help. The rich panels of this typer version print `<bool>` after
# every flag (--help included) and cut long option names (`--num-steps,--num_st…`) to fit their column.
app = typer.Typer(name="mmrec", cls=_Group, no_args_is_help=True, add_completion=False, rich_markup_mode=None,
                  context_settings={"max_content_width": 100},
                  help="Convert Transformer checkpoints to MM-Rec, and run the result.")
for _name, _function in (("demo", demo_cmd.demo), ("inspect", inspect_cmd.inspect), ("plan", plan_cmd.plan),
                         ("shard-convert", convert_cmd.shard_convert), ("verify", verify_cmd.verify),
                         ("synth", demo_cmd.synth), ("finetune", finetune_cmd.finetune),
                         ("distill", distill_cmd.distill)):
    app.command(_name, cls=_Command)(_function)


def _print_version(value: bool) -> None:
    if value:
        from mmrec import __version__

        typer.echo(f"mmrec {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(None, "--version", callback=_print_version, is_eager=True,
                                           help="Print the version and exit."),
) -> None:
    """Convert Transformer checkpoints to MM-Rec, and run the result."""


def main() -> None:
    interrupts.install()
    interrupts.start()
    try:
        app()
    finally:
        interrupts.ignore_from_now()  # done: a Ctrl-C during the interpreter's shutdown changes nothing
        if interrupts.interrupted():  # once the command's clean-up is done (journal, lock): the one line,
            interrupts.exit_interrupted()  # exit 130, no interpreter shutdown racing live native threads


if __name__ == "__main__":
    main()
