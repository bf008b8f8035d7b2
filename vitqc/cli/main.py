"""``vitqc``: compile, eval, export, generate, report, and listings of what is registered.

The commands are thin shells over the library (``vitqc.compile``, ``vitqc.evaluate.evaluate``,
``vitqc.backends.export``, ``vitqc.calib.spec.generate``, ``vitqc.report``): each parses its flags, calls one
function and prints. Every user error is one line on stderr and exit code 2 (``vitqc.errors.VitqcError``);
nothing is written unless the whole command succeeds.
"""
from __future__ import annotations

import sys

import typer

from vitqc.cli.compile import compile_command
from vitqc.cli.eval import eval_command
from vitqc.cli.export import export_command
from vitqc.cli.generate import generate_command
from vitqc.cli.listing import backends_command, passes_command, pipelines_command, sources_command
from vitqc.cli.report import report_command
from vitqc.console import err, error
from vitqc.errors import VitqcError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Post-training quantization of Vision Transformers, as a compiler over torch.fx graphs.")
app.command("compile")(compile_command)
app.command("eval")(eval_command)
app.command("export")(export_command)
app.command("generate")(generate_command)
app.command("report")(report_command)
app.command("pipelines")(pipelines_command)
app.command("passes")(passes_command)
app.command("sources")(sources_command)
app.command("backends")(backends_command)


def main(argv: list[str] | None = None) -> int:
    try:
        # without standalone mode typer returns the exit code of typer.Exit and of Ctrl-C (130)
        code = app(args=argv, standalone_mode=False)
        if code == 130:
            err.print("interrupted; nothing was written (continue with --resume where the pass checkpoints)")
        return code if isinstance(code, int) else 0
    except VitqcError as exc:
        error(str(exc))
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except KeyboardInterrupt:
        err.print("interrupted; nothing was written (continue with --resume where the pass checkpoints)")
        return 130
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            return exc.exit_code
        raise


if __name__ == "__main__":
    sys.exit(main())
