"""The ``ddfm-fast`` command line (click).

This file lives at the repository root and is installed as ``ddfm_fast.cli`` through the symlink
``ddfm_fast/cli.py``; ``python -m ddfm_fast`` runs it too. Commands are thin: they map flags onto the
package's API and leave the work to it.

Each command's module is imported only when that command runs (or shows its ``--help``): ``ddfm-fast --help``
lists the commands from :data:`COMMANDS` without importing any of them, and none of them imports torch at its
top level, so help answers at once.

How every command fails (:class:`DDFMGroup`): click's usage errors (exit 2) and one-line errors (exit 1) as
click prints them; any other exception becomes one line naming its type (an ``OSError`` names the file), exit
1, and the traceback is shown only with ``ddfm-fast --debug`` (or ``DDFM_FAST_DEBUG=1``). Ctrl-C, SIGTERM and
SIGHUP end a command through ``KeyboardInterrupt`` (so atomic writes are cleaned up and a folder run writes its
summary) with exit code 128 + the signal's number (130, 143, 129) and a line saying what was done.
"""

from __future__ import annotations

import importlib
import os
import signal
import traceback
from collections.abc import Iterator, MutableMapping
from typing import Any, Optional

import click

# name -> (module, attribute, the command's first help paragraph: ``ddfm-fast --help`` shows it shortened)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "bench": ("ddfm_fast.cli_bench", "bench_command",
              "Check and time the fast path: the GPU correctness tests, then rows in priority order (fp32 "
              "reference, fp16 + compile + Triton tail + CUDA graphs at 480x640, without graphs, fp16 eager, the "
              "step tail alone, TF32, 256x256, 1280x1024, batch 8), each with its time, rate, compile time, peak "
              "memory and PSNR against true fp32."),
    "compare": ("ddfm_fast.cli_eval", "compare_command",
                "Compare two output sets paired by stem: PSNR, SSIM, max-abs."),
    "download": ("ddfm_fast.cli_download", "download_command",
                 "Download the weights of PRESET (default adm256-uncond), resumable and verified."),
    "eval": ("ddfm_fast.cli_eval", "eval_command",
             "Score fused images against their sources with the 12 fusion metrics, for one or several methods."),
    "fuse": ("ddfm_fast.cli_fuse", "fuse_command", "Fuse image pairs with DDFM."),
    "info": ("ddfm_fast.cli_fuse", "info_command",
             "Versions, devices with the execution plan a default run and --fast get on each (and why), and "
             "presets."),
    "report": ("ddfm_fast.cli_report", "report_command",
               "Write one self-contained HTML page of an eval or score result."),
    "score": ("ddfm_fast.cli_score", "score_command",
              "Fuse a dataset folder and score it next to the paper's numbers."),
    "serve": ("ddfm_fast.cli_serve", "serve_command",
              "Serve a local web page to fuse two images and watch the diffusion."),
    "train-prior": ("ddfm_fast.cli_train", "train_prior_command",
                    "Train an unconditional epsilon-prediction DDPM prior on random crops of the images in --data."),
}

DEBUG_KEY = "ddfm_fast.debug"
DEBUG_ENV = "DDFM_FAST_DEBUG"
_CLICK_EXITS = (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort)


def load_command(name: str) -> click.Command:
    """The click command ``name`` (imports its module)."""
    module, attr, _ = COMMANDS[name]
    return getattr(importlib.import_module(module), attr)


def _signal_to_interrupt(signum: int, _frame: Any) -> None:
    """SIGTERM / SIGHUP as ``KeyboardInterrupt`` (:class:`ddfm_fast.runner.Interrupted`), once: a second one of the
    same signal ends the process the default way."""
    from ddfm_fast.runner import Interrupted, note_signal

    signal.signal(signum, signal.SIG_DFL)
    note_signal(signum)  # if the exception below lands in a finalizer and is dropped, the folder run still stops
    raise Interrupted(signum)


def _install_signal_handlers() -> list[tuple[int, Any]]:
    """Route SIGTERM and SIGHUP through :func:`_signal_to_interrupt` where they have the default action (an
    ignored signal, e.g. under ``nohup``, stays ignored); returns what to restore."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return []
    saved = []
    for name in ("SIGTERM", "SIGHUP"):
        signum = getattr(signal, name, None)
        if signum is not None and signal.getsignal(signum) is signal.SIG_DFL:
            saved.append((signum, signal.signal(signum, _signal_to_interrupt)))
    return saved


def _interrupt_exit(exc: KeyboardInterrupt) -> int:
    """Say what an interrupt stopped and return 128 + its signal."""
    signum = int(getattr(exc, "signum", signal.SIGINT))
    message = getattr(exc, "message", None)
    if not message:
        from ddfm_fast.runner import signal_name

        message = f"interrupted by {signal_name(signum)}; nothing half-written was left behind"
    click.echo("", err=True)  # ends the terminal's ^C on its own line
    click.echo(message, err=True)
    return 128 + signum


class LazyCommands(MutableMapping):
    """The group's ``commands``: every name of :data:`COMMANDS` is listed at once, and its module is imported the
    first time the command is looked up (``main.commands["serve"]`` works as for an eager group)."""

    def __init__(self) -> None:
        self._loaded: dict[str, click.Command] = {}

    def loaded(self, name: str) -> bool:
        return name in self._loaded

    def __getitem__(self, name: str) -> click.Command:
        if name not in self._loaded:
            if name not in COMMANDS:
                raise KeyError(name)
            self._loaded[name] = load_command(name)
        return self._loaded[name]

    def __setitem__(self, name: str, command: click.Command) -> None:
        self._loaded[name] = command

    def __delitem__(self, name: str) -> None:
        del self._loaded[name]

    def __iter__(self) -> Iterator[str]:
        return iter(sorted({*COMMANDS, *self._loaded}))

    def __len__(self) -> int:
        return len({*COMMANDS, *self._loaded})

    def __contains__(self, name: object) -> bool:
        return name in COMMANDS or name in self._loaded


class DDFMGroup(click.Group):
    """The ``ddfm-fast`` group: commands imported on demand, and one line for every failure (see the module)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        lazy = LazyCommands()
        for name, command in self.commands.items():
            lazy[name] = command
        self.commands = lazy

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(len(n) for n in names)
        rows = []
        for name in names:  # a stand-in command with the same first paragraph shortens it as click would
            loaded = not isinstance(self.commands, LazyCommands) or self.commands.loaded(name) or name not in COMMANDS
            stand_in = self.commands[name] if loaded else click.Command(name, help=COMMANDS[name][2])
            rows.append((name, stand_in.get_short_help_str(limit)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx: click.Context) -> Any:
        from ddfm_fast.cli_options import reporter

        saved = _install_signal_handlers()
        code: Optional[int] = 0
        error: Optional[str] = None
        try:
            return super().invoke(ctx)
        except click.exceptions.Exit as exc:
            code = exc.exit_code
            raise
        except click.exceptions.ClickException as exc:
            code, error = exc.exit_code, exc.format_message()
            if ctx.meta.get(DEBUG_KEY) and exc.__cause__ is not None:
                traceback.print_exception(exc.__cause__)
            raise
        except click.exceptions.Abort:
            code = 1
            raise
        except KeyboardInterrupt as exc:
            if ctx.meta.get(DEBUG_KEY):
                traceback.print_exception(exc)
            code = _interrupt_exit(exc)
            error = "interrupted"
            raise click.exceptions.Exit(code) from None
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
            raise
        except Exception as exc:  # noqa: BLE001 - the one place an unforeseen error becomes one line
            if ctx.meta.get(DEBUG_KEY):
                raise
            from ddfm_fast.cli_options import one_line

            code, error = 1, one_line(exc)
            raise click.ClickException(f"{error} (run `ddfm-fast --debug ...` to see the traceback)") from exc
        finally:
            for signum, handler in saved:
                signal.signal(signum, handler)
            rep = reporter(ctx)
            if rep.json_lines and not rep.ended and os.environ.get("RANK", "0") == "0":  # one end line (rank 0)
                rep.event({"event": "end", "exit_code": code, **({"error": error} if error else {})})


def _debug(ctx: click.Context, _param: Any, value: bool) -> None:
    if value:
        ctx.meta[DEBUG_KEY] = True


@click.group(cls=DDFMGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ddfm-fast")
@click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=_debug, envvar=DEBUG_ENV,
              help="Show the Python traceback of an error (also DDFM_FAST_DEBUG=1); without it every error is one "
                   "line.")
def main() -> None:
    """ddfm-fast: DDFM image fusion (Zhao et al., ICCV 2023), faithful and fast.

    \b
    Exit codes: 0 success, 1 error, 2 usage error, 3 some pairs failed
    (folder runs), 130 Ctrl-C (128 + the signal: SIGTERM 143, SIGHUP 129).
    """
    from ddfm_fast._alloc import keep_freed_memory; keep_freed_memory(announce=True)  # noqa: E702 (glibc malloc)


if __name__ == "__main__":  # pragma: no cover
    main()
