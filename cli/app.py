"""The `mmrec` command line. Each command lives in its own module; heavy imports (torch, dask) happen
inside the commands that need them, so `mmrec inspect` answers without loading torch."""

from __future__ import annotations

import typer

from . import convert_cmd, demo_cmd, distill_cmd, finetune_cmd, inspect_cmd, plan_cmd, verify_cmd

app = typer.Typer(name="mmrec", no_args_is_help=True, add_completion=False,
                  help="Convert Transformer checkpoints to MM-Rec, and run the result.")
app.command("demo")(demo_cmd.demo)
app.command("inspect")(inspect_cmd.inspect)
app.command("plan")(plan_cmd.plan)
app.command("shard-convert")(convert_cmd.shard_convert)
app.command("verify")(verify_cmd.verify)
app.command("synth")(demo_cmd.synth)
app.command("finetune")(finetune_cmd.finetune)
app.command("distill")(distill_cmd.distill)


@app.callback()
def _root() -> None:
    """Convert Transformer checkpoints to MM-Rec, and run the result."""


def main() -> None:
    app()


if __name__ == "__main__":
    main()
